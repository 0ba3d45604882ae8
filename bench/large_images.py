"""Memory and time of large images on the service's decode path, before and after issue 24's fix.

Every measurement runs in a fresh process, since malloc arenas live as long as their process:
``transforms.load_crop`` on a pool of two threads (the service's ``CAPTIONER_DECODE_THREADS``),
with the service's malloc tuning (``tune_malloc``) or glibc's defaults, on a 36-megapixel CMYK
JPEG and a 36-megapixel RGB PNG made from a real photo, and on the photo itself. "before" is the
code as it was: Pillow's 16 MiB blocks (``PILLOW_BLOCK_SIZE=16m``) and CMYK JPEGs decoded whole;
"after" is the library as it is. Resident memory (VmRSS, MiB) at the start, after the first decode,
after ``--rounds`` rounds of two decodes at once, and after 2 s idle; per decode (medians) the wall time
and the decoding thread's CPU time (steadier than wall time on a shared machine). Goal: after the first
decode, RSS grows by less than 64 MiB ("growth": the most it rose above its level after the first).

Then the model: ms per photo for decode + caption (the default model on a worker thread, tuned malloc,
as the service runs it), with Pillow's 16 MiB blocks and with whole-image blocks in alternating
rounds of one process. Goal: ratio after / before <= 1.05 (the fix must not cost the model time).

Usage::

    python bench/large_images.py                 # Flickr8k/COCO-mini photos from ../shared/data
    python bench/large_images.py --rounds 2 --no-model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"
LARGE_SIZE = (7360, 4912)  # 36 megapixels, under the service's 40-megapixel limit
GOAL_GROWTH_MIB = 64
GOAL_MODEL_RATIO = 1.05
DECODE_THREADS = 2  # the service's default CAPTIONER_DECODE_THREADS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench/large_images.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of two decodes at once after the first")
    parser.add_argument("--model-rounds", type=int, default=5, help="alternating rounds of the model timing")
    parser.add_argument("--no-model", action="store_true", help="skip the model timing")
    parser.add_argument("--child", choices=["decode", "caption"], help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["tuned", "glibc"], default="tuned", help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    return parser


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024  # type: ignore[union-attr]


def make_images(photo: Path, folder: Path) -> dict[str, Path]:
    """The photo scaled to 36 megapixels as a CMYK JPEG and an RGB PNG (both under the 10 MB upload limit)."""
    from PIL import Image

    big = Image.open(photo).convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
    paths = {"CMYK JPEG 36 MP": folder / "large-cmyk.jpg", "RGB PNG 36 MP": folder / "large.png"}
    big.convert("CMYK").save(paths["CMYK JPEG 36 MP"], "JPEG", quality=85)
    # nearest-neighbour up from 1/16 scale: blocky, so the PNG stays small; its decoded size is what counts
    small = big.resize((LARGE_SIZE[0] // 16, LARGE_SIZE[1] // 16), Image.Resampling.BILINEAR)
    small.resize(LARGE_SIZE, Image.Resampling.NEAREST).save(paths["RGB PNG 36 MP"], "PNG", compress_level=1)
    return {**paths, f"photo {Image.open(photo).size[0]}x{Image.open(photo).size[1]}": photo}


def child_decode(args: argparse.Namespace) -> dict:
    """One process: the first decode, then rounds of two at once (a barrier makes both threads decode)."""
    from PIL import Image, JpegImagePlugin

    from captioner.runtime import tune_malloc
    from captioner.transforms import Preprocess, load_image, resize_crop

    if args.allocator == "tuned":
        tune_malloc()
    preprocess = Preprocess(resize=256, crop=224)
    data = args.image.read_bytes()
    opened = Image.open(args.image)
    # the old code drafted only RGB and grayscale JPEGs
    whole = args.before and (not isinstance(opened, JpegImagePlugin.JpegImageFile) or opened.mode not in ("RGB", "L"))
    both = threading.Barrier(DECODE_THREADS)
    wall_ms: list[float] = []
    cpu_ms: list[float] = []

    def decode(wait: bool) -> None:
        if wait:
            both.wait(timeout=120)
        started, started_cpu = time.perf_counter(), time.thread_time()
        image = load_image(data, min_size=None if whole else preprocess.resize)
        resize_crop(image, preprocess)
        cpu_ms.append((time.thread_time() - started_cpu) * 1000.0)
        wall_ms.append((time.perf_counter() - started) * 1000.0)

    levels = {"start": rss_mib()}
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        pool.submit(decode, False).result()
        levels["after first"] = rss_mib()
        for _ in range(args.rounds):
            list(pool.map(decode, [True] * DECODE_THREADS))
        levels["after rounds"] = rss_mib()
        time.sleep(2.0)
        levels["idle"] = rss_mib()
    return {"levels": levels, "ms": statistics.median(wall_ms), "cpu_ms": statistics.median(cpu_ms)}


def child_caption(args: argparse.Namespace) -> dict:
    """One process, one model: ms per photo with Pillow's 16 MiB blocks and with whole-image blocks, alternating."""
    from PIL import Image

    from captioner.decoding import DecodingOptions
    from captioner.model import Captioner
    from captioner.runtime import tune_malloc
    from captioner.transforms import WHOLE_IMAGE_BLOCK_BYTES, load_crop

    tune_malloc()
    photos = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[:16]]
    model = Captioner.from_checkpoint(None, backend="torch")
    options = DecodingOptions()
    decoder, worker = ThreadPoolExecutor(DECODE_THREADS), ThreadPoolExecutor(1)  # the service's threads

    def per_photo_ms() -> float:
        started = time.perf_counter()
        for data in photos:
            crop = decoder.submit(load_crop, data, model.preprocess_config).result()
            worker.submit(model.caption, [crop], options).result()
        return (time.perf_counter() - started) * 1000.0 / len(photos)

    Image.core.set_block_size(WHOLE_IMAGE_BLOCK_BYTES)
    per_photo_ms()  # warm-up
    ms: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.model_rounds):
        for version, block in (("before", 16 * 1024 * 1024), ("after", WHOLE_IMAGE_BLOCK_BYTES)):
            Image.core.set_block_size(block)
            ms[version].append(per_photo_ms())
    return {"ms": {k: statistics.median(v) for k, v in ms.items()}, "photos": len(photos)}


def run_child(args: argparse.Namespace, *extra: str, before: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCK_SIZE"}
    if before:
        env["PILLOW_BLOCK_SIZE"] = "16m"  # Pillow's default, which the library now raises
    command = [sys.executable, __file__, "--rounds", str(args.rounds), "--model-rounds", str(args.model_rounds)]
    command += ["--images", str(args.images), *extra, *(["--before"] if before else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(extra)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child == "decode":
        print(json.dumps(child_decode(args)))
        return 0
    if args.child == "caption":
        print(json.dumps(child_caption(args)))
        return 0
    photos = sorted(args.images.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no JPEG photos in {args.images} (pass --images DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(photos[0], Path(tmp))
        rows = []
        for name, path in images.items():
            for allocator in ("tuned", "glibc"):
                for before in (True, False):
                    child = ["--child", "decode", "--image", str(path), "--allocator", allocator]
                    result = run_child(args, *child, before=before)
                    rows.append((name, allocator, "before" if before else "after", result))
                    print(f"  {name}, {allocator}, {rows[-1][2]}: {result}", file=sys.stderr)
    print(f"\n{DECODE_THREADS} decode threads, RSS in MiB: 1 decode, then {args.rounds} rounds of two at once\n")
    print("| image           | malloc | code   | start | after 1 | after rounds | idle | growth | ms/decode | CPU ms |")
    print("|-----------------|--------|--------|------:|--------:|-------------:|-----:|-------:|----------:|-------:|")
    growths = []
    for name, allocator, version, result in rows:
        lv = result["levels"]
        growth = max(lv["after rounds"], lv["idle"]) - lv["after first"]
        if version == "after":
            growths.append(growth)
        print(
            f"| {name:<15} | {allocator:<6} | {version:<6} | {lv['start']:>5.0f} | {lv['after first']:>7.0f} "
            f"| {lv['after rounds']:>12.0f} | {lv['idle']:>4.0f} | {growth:>+6.0f} | {result['ms']:>9.0f} "
            f"| {result['cpu_ms']:>6.0f} |"
        )
    goals = [(f"RSS growth after the first decode < {GOAL_GROWTH_MIB} MiB", max(growths) < GOAL_GROWTH_MIB)]
    if not args.no_model:
        model = run_child(args, "--child", "caption")
        ratio = model["ms"]["after"] / model["ms"]["before"]
        rounds = args.model_rounds
        print(f"\ndecode + caption, default model, tuned malloc, {model['photos']} photos x {rounds} rounds:")
        print(f"  16 MiB blocks {model['ms']['before']:.1f} ms/photo, whole-image blocks {model['ms']['after']:.1f}")
        print(f"  after / before: {ratio:.3f}")
        goals.append((f"model ratio <= {GOAL_MODEL_RATIO}", ratio <= GOAL_MODEL_RATIO))
    print("\ngoals: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
