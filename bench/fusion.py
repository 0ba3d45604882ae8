"""BatchNorm folded into the encoder's convolutions (``Captioner.optimize_for_inference``) versus not.

Two copies of the same checkpoint in one process, one fused, timed in interleaved rounds on the same
real photos (medians): the encoder alone and encoder + decoder, one photo at a time, and a batch
through ``caption_pixels``. Also counts how many captions differ between the two.

    python bench/fusion.py [--checkpoint C] [--images DIR] [--method beam] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from captioner import Captioner, DecodingOptions
from captioner.runtime import tune_malloc

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "train2017"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos")
    parser.add_argument("--photos", type=int, default=16, help="photos used (each timed once per round)")
    parser.add_argument("--batch", type=int, default=16, help="photos per batched call")
    parser.add_argument("--method", choices=["greedy", "beam"], default="beam")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; medians are reported")
    parser.add_argument("--device", default="cpu")
    return parser


def _ms(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1000.0


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    paths = sorted(args.images.glob("*.jpg"))[: args.photos]
    if not paths:
        raise SystemExit(f"bench/fusion.py: no .jpg photos in {args.images}")
    if min(args.photos, args.batch, args.rounds) < 1:
        raise SystemExit("bench/fusion.py: --photos, --batch and --rounds must be >= 1")
    tune_malloc()  # as the service runs it
    plain = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    fused = Captioner.from_checkpoint(args.checkpoint, device=args.device).optimize_for_inference()
    models = {"unfused": plain, "fused": fused}
    options = DecodingOptions(method=args.method, beam_size=3)
    singles = [plain.preprocess([p]).to(plain.device) for p in paths]
    batch = torch.cat(singles[: args.batch])
    times: dict[tuple[str, str], list[float]] = {}
    texts: dict[str, list[str]] = {}

    def record(name: str, what: str, ms: float) -> None:
        times.setdefault((name, what), []).append(ms)

    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.caption_pixels(singles[0], options)
        for round_ in range(args.rounds):
            order = list(models.items()) if round_ % 2 == 0 else list(models.items())[::-1]
            for pixels in singles:
                for name, model in order:
                    record(name, "encoder, 1 photo", _ms(model.encoder.forward_features, pixels))
                    record(
                        name, f"encoder + {args.method} decoder, 1 photo", _ms(model.caption_pixels, pixels, options)
                    )
            for name, model in order:
                started = time.perf_counter()
                results = model.caption_pixels(batch, options)
                per_photo = (time.perf_counter() - started) * 1000.0 / len(batch)
                record(name, f"encoder + {args.method} decoder, batch of {len(batch)}, per photo", per_photo)
                texts[name] = [r.captions[0].text for r in results]
    rows = list(dict.fromkeys(what for _, what in times))
    source = args.checkpoint or "bundled default"
    print(f"checkpoint: {source}   device: {args.device}   photos: {len(paths)} ({args.images})")
    print(f"| {'what (median ms)':<52} | {'unfused':>8} | {'fused':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for what in rows:
        a, b = statistics.median(times[("unfused", what)]), statistics.median(times[("fused", what)])
        print(f"| {what:<52} | {a:>8.1f} | {b:>8.1f} | {a / b:>7.2f}x |")
    same = sum(x == y for x, y in zip(texts["unfused"], texts["fused"], strict=True))
    print(f"identical captions in the batch: {same} / {len(texts['fused'])}")


if __name__ == "__main__":
    main()
