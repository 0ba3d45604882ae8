"""COCO scale, simulated: does every stage of the training pipeline grow linearly with the photos, in bounded memory?

For each size N it builds a COCO-format data set of N photos in a temporary folder from the real material
(Flickr8k's photos, linked again and again under COCO file names; 5 captions a photo drawn from Flickr8k's
captions and the COCO caption text; a val split of min(5,000, N/10) photos, as COCO's 5k val is too big for
a small N), then runs the real pipeline on it, stage by stage, each group of stages in a fresh process:

    corpus               load_corpus on the COCO folder (annotations/captions_{train,val}2017.json)
    vocabulary           Vocabulary.build and CaptionRules.learn on the training captions
    feature cache        build_feature_cache for the train and val photos, with a tiny encoder (ResNet-18,
                         random weights, 32 px: the encoder's own cost would hide the pipeline's; the real
                         encoder's cost a photo is measured apart, on a few photos)
    tokenisation         make_pairs: every caption to token ids
    batching             an epoch's caption batches and self-critical image batches
    trainer start        Trainer(...): corpus, caption rules, cached features (found), pairs, batches
    cross-entropy epoch  one whole epoch over every training caption, with a small decoder
    validation           the val split captioned, its loss and CIDEr-D (document frequencies of the val set)
    CIDEr-D reward       the self-critical reward: every training image's references and their frequencies
    self-critical slice  the first --scst-fraction of a self-critical epoch's steps (a fixed share of the
                         epoch, so it grows with N as the whole epoch would)
    checkpoint save/load last.pt and best.pt written and read back

It prints per stage and size the seconds, the peak memory and the disk, and the scaling exponent k of the
time (time ~ N^k, a least-squares fit on log-log over the sizes). Peak memory is the resident memory of the
stage's processes (with its data-loader workers) other than memory-mapped files such as the feature cache:
anonymous and shared memory, summed as proportional set sizes (so a forked worker's pages count once),
sampled every 0.1 s from /proc while the stage runs, plus what the stage's process reports at its start and
end. A stage holds what the trainer holds at that point (a training stage holds the corpus, the pairs and
the model), so the peaks are what the real run needs, stage by stage. Goals: k <= 1.15 (judged for stages
of at least 1 s at the largest size; below that k is noise) and at most 6 GB at any size; a stage that
misses one is marked MISSED.

    python bench/scale.py [--images 8000,32000,128000] [--json FILE] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
COCO_TEXT = Path("coco-caption-text") / "captions.jsonl.gz"  # beside the Flickr8k folder
COCO_MINI = Path("coco-mini") / "train2017"  # COCO photos at their own size, beside it too
CAPTIONS_PER_PHOTO = 5
MAX_VAL_PHOTOS = 5000  # COCO 2017's val split
MIN_PHOTOS = 100  # the smallest size: a val split of 10 photos
GOAL_EXPONENT = 1.15
GOAL_PEAK_MB = 6 * 1024
JUDGED_SECONDS = 1.0  # below this at the largest size, a stage's exponent is noise
SAMPLE_SECONDS = 0.1  # memory sampling interval
GRID_READ_ROWS = 2048  # photos in the cache the input path is timed on: 400 MB of EfficientNet-Lite2 grids
TINY_ENCODER = "resnet18"  # random weights: nothing to download, and the registry's smallest body
MB = 1024 * 1024


# -- the command line ----------------------------------------------------------------------------------------


def photo_counts(text: str) -> list[int]:
    """``--images``: comma-separated photo counts, each at least MIN_PHOTOS, e.g. ``8000,32000,128000``."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated photo counts, got {text!r}") from None
    if any(n < MIN_PHOTOS for n in sizes):
        raise argparse.ArgumentTypeError(f"every size must be at least {MIN_PHOTOS} photos, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"sizes must differ, got {text!r}")
    return sorted(sizes)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=photo_counts, default=[8000, 32000, 128000], help="photo counts N")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where encoding and training run")
    parser.add_argument("--data", type=Path, default=DEFAULT_FLICKR8K, help="the Flickr8k folder (photos, captions)")
    parser.add_argument(
        "--coco-text", type=Path, default=None, help=f"COCO caption text (default: {COCO_TEXT} beside --data)"
    )
    parser.add_argument("--work", type=Path, default=None, help="where the temporary data sets go (default: $TMPDIR)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="captions per cross-entropy step")
    parser.add_argument("--hidden", type=positive_int, default=16, help="the small decoder's embedding and LSTM size")
    parser.add_argument(
        "--decoder-vocab",
        type=positive_int,
        default=1000,
        help="the small decoder's vocabulary: the most frequent words of the real one (the output layer's cost "
        "would hide the pipeline's, as a real encoder's would)",
    )
    parser.add_argument("--tiny-size", type=positive_int, default=32, help="the tiny encoder's input size (px)")
    parser.add_argument("--scst-fraction", type=fraction, default=0.05, help="share of a self-critical epoch run")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader processes for the feature cache")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads in each stage's process (default 1: on a small machine shared with other work, "
        "OpenMP's spinning threads made two threads several times slower than one)",
    )
    parser.add_argument("--real-encoder", default="efficientnet_lite2", help="the encoder whose cost is measured apart")
    parser.add_argument("--encoder-photos", type=int, default=64, help="photos for that measurement (0: skip it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data sets (default: delete each)")
    # the stage processes this script starts
    parser.add_argument("--stage-process", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line refusals of what argparse cannot see: data that is absent, a device that is not there."""
    if not (args.data / "captions.txt").is_file() or not (args.data / "images").is_dir():
        raise SystemExit(f"scale: no Flickr8k at {args.data} (captions.txt and images/): pass --data DIR")
    if args.coco_text is not None and not args.coco_text.is_file():
        raise SystemExit(f"scale: --coco-text {args.coco_text}: no such file")
    if args.num_workers < 0:
        raise SystemExit(f"scale: --num-workers must be >= 0, got {args.num_workers}")
    if args.encoder_photos < 0:
        raise SystemExit(f"scale: --encoder-photos must be >= 0, got {args.encoder_photos}")
    import torch

    from captioner.encoders import ENCODERS

    if args.real_encoder not in ENCODERS:
        raise SystemExit(f"scale: unknown --real-encoder {args.real_encoder!r}; expected one of {', '.join(ENCODERS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"scale: unknown --device {args.device!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scale: --device cuda, but CUDA is not available to this torch")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"scale: --device must be cpu, cuda or cuda:N, got {args.device!r}")


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.stage_process is not None:
        run_stage_process(args.stage_process, args.root)
        return
    check_args(args)
    started = time.perf_counter()
    pool = caption_pool(args.data, args.coco_text)
    photos = flickr_photos(args.data)
    runs = [measure_size(n, args, pool, photos) for n in args.images]
    real = measure_real_encoder(args, photos) if args.encoder_photos else None
    report = Report(args.images, runs, real, settings(args), wall_seconds=time.perf_counter() - started)
    print(report.table())
    print(report.notes())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a stage process needs to know of the command line (written beside the data set)."""
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "decoder_vocab": args.decoder_vocab,
        "tiny_size": args.tiny_size,
        "scst_fraction": args.scst_fraction,
        "num_workers": args.num_workers,
        "threads": args.threads,
        "real_encoder": args.real_encoder,
        "encoder_photos": args.encoder_photos,
    }


# -- the data set ----------------------------------------------------------------------------------------------


def caption_pool(flickr8k: Path, coco_text: Path | None) -> list[str]:
    """Every Flickr8k caption, then every caption of the COCO caption text (when it is there)."""
    lines = (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines()
    pool = [caption.strip() for _, _, caption in (line.partition(",") for line in lines[1:]) if caption.strip()]
    coco_text = coco_text or flickr8k.parent / COCO_TEXT
    if coco_text.is_file():
        with gzip.open(coco_text, "rt", encoding="utf-8") as lines_of_json:
            pool += [json.loads(line)["caption"].strip() for line in lines_of_json if line.strip()]
    return pool


def flickr_photos(flickr8k: Path) -> list[Path]:
    photos = sorted((flickr8k / "images").glob("*.jpg"))
    if not photos:
        raise SystemExit(f"scale: no photos in {flickr8k / 'images'}")
    return photos


def val_photos(n: int) -> int:
    """The val split of an N-photo data set: COCO's 5,000, or a tenth of N when N is under 50,000."""
    return min(MAX_VAL_PHOTOS, n // 10)


@dataclass
class DataSet:
    photos: int
    train: int
    val: int
    captions: int
    distinct_captions: int
    seconds: float
    disk_mb: float


def build_dataset(root: Path, n: int, photos: Sequence[Path], pool: Sequence[str]) -> DataSet:
    """A COCO 2017 layout under ``root``: annotations/captions_{train,val}2017.json and {train,val}2017/ folders
    of links to the Flickr8k photos (photo i links to photo i mod 8,091). The captions run through the pool
    in a fresh seeded order each time round, 5 a photo, so photos that share a Flickr8k photo differ in text."""
    started = time.perf_counter()
    n_val = val_photos(n)
    captions = pooled_captions(pool, n * CAPTIONS_PER_PHOTO)
    (root / "annotations").mkdir(parents=True)
    for split, ids in (("train", range(1, n - n_val + 1)), ("val", range(n - n_val + 1, n + 1))):
        folder = root / f"{split}2017"
        folder.mkdir()
        for image_id in ids:
            (folder / f"{image_id:012d}.jpg").symlink_to(photos[(image_id - 1) % len(photos)])
        write_coco_captions(root / "annotations" / f"captions_{split}2017.json", ids, captions)
    return DataSet(
        photos=n,
        train=n - n_val,
        val=n_val,
        captions=n * CAPTIONS_PER_PHOTO,
        distinct_captions=min(len(pool), n * CAPTIONS_PER_PHOTO),
        seconds=time.perf_counter() - started,
        disk_mb=disk_mb(root),
    )


def pooled_captions(pool: Sequence[str], count: int) -> list[str]:
    """``count`` captions: the pool over and over, each time round in another seeded order."""
    out: list[str] = []
    round_ = 0
    while len(out) < count:
        order = list(range(len(pool)))
        random.Random(round_).shuffle(order)
        out += [pool[i] for i in order[: count - len(out)]]
        round_ += 1
    return out


def write_coco_captions(path: Path, image_ids: range, captions: Sequence[str]) -> None:
    """The official COCO captions schema, written image by image (never the whole file in memory)."""
    with path.open("w", encoding="utf-8") as f:
        f.write('{"info": {"description": "bench/scale.py"}, "licenses": [], "images": [')
        for i, image_id in enumerate(image_ids):
            image = {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 224, "width": 224}
            f.write(("," if i else "") + json.dumps(image))
        f.write('], "annotations": [')
        for i, image_id in enumerate(image_ids):
            for k in range(CAPTIONS_PER_PHOTO):
                index = (image_id - 1) * CAPTIONS_PER_PHOTO + k
                annotation = {"image_id": image_id, "id": index + 1, "caption": captions[index]}
                f.write(("," if i or k else "") + json.dumps(annotation))
        f.write("]}\n")


def disk_mb(*paths: Path) -> float:
    """Bytes under ``paths`` (links counted as links, not as what they point to), in MB."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
            continue
        for folder, _, files in os.walk(path):
            total += sum(os.lstat(os.path.join(folder, name)).st_size for name in files)
    return total / MB


def check_free_disk(where: Path, n: int, args: argparse.Namespace) -> None:
    """Refuse a size whose data set, cache and checkpoints would leave less than 1 GB free."""
    grid_bytes = 512 * max(1, args.tiny_size // 32) ** 2 * 2  # ResNet-18's fp16 grid at --tiny-size
    needed = n * (grid_bytes + CAPTIONS_PER_PHOTO * 150 + 300) + 300 * MB
    free = shutil.disk_usage(where).free
    if free - needed < 1024 * MB:
        raise SystemExit(
            f"scale: {n:,} photos need about {needed / MB:,.0f} MB in {where}, which has {free / MB:,.0f} MB free"
        )


# -- measuring a size ----------------------------------------------------------------------------------------


@dataclass
class StageResult:
    seconds: float
    peak_rss_mb: float  # anonymous + shared memory of the stage's processes: memory-mapped files excluded
    peak_rss_with_files_mb: float  # the same with file-backed pages (the mapped feature cache, libraries)
    cpu_seconds: float
    disk_mb: float | None
    gpu_peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SizeRun:
    photos: int
    dataset: DataSet
    stages: dict[str, StageResult]
    seconds: float


def measure_size(n: int, args: argparse.Namespace, pool: Sequence[str], photos: Sequence[Path]) -> SizeRun:
    """Build the N-photo data set in a temporary folder, run every stage process on it, delete it."""
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"captioner-scale-{n}-", dir=args.work))
    started = time.perf_counter()
    try:
        check_free_disk(root, n, args)
        dataset = build_dataset(root / "coco", n, photos, pool)
        (root / "settings.json").write_text(json.dumps(settings(args)))
        say(f"{n:,} photos: data set built in {dataset.seconds:.0f} s ({root})")
        stages: dict[str, StageResult] = {}
        for process in STAGE_PROCESSES:
            stages.update(run_stage_process_measured(process, root, n))
        return SizeRun(n, dataset, stages, time.perf_counter() - started)
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def say(message: str) -> None:
    print(f"scale: {message}", file=sys.stderr, flush=True)


def run_stage_process_measured(process: str, root: Path, n: int) -> dict[str, StageResult]:
    """Run one stage process on the data set at ``root``, sampling its memory; its stages' results."""
    name = process.replace(" ", "-")
    log, events = root / f"{name}.log", EventReader(root / f"{name}.events")
    command = [sys.executable, str(Path(__file__).resolve()), "--stage-process", process, "--root", str(root)]
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=stage_environment())
    watcher = MemoryWatcher(child.pid)
    status = None
    while status is None:
        pid, wait_status, _ = os.wait4(child.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(wait_status)
            child.returncode = status  # reaped here: Popen must not wait for it again
        for event in events.read():
            watcher.handle(event)
        watcher.sample()
        if status is None:
            time.sleep(SAMPLE_SECONDS)
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"scale: {n:,} photos: the {process} process failed (status {status}):\n{tail}")
    for stage, result in watcher.results.items():
        say(f"{n:,} photos: {stage}: {result.seconds:.1f} s, peak {result.peak_rss_mb:,.0f} MB")
    return watcher.results


def stage_environment() -> dict[str, str]:
    """The stage processes import this repository's packages (wherever the script was started from)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


class EventReader:
    """The stage processes' events (one JSON object a line), read as they are appended."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class MemoryWatcher:
    """Peak memory of a process and its descendants, per stage (between a stage's start and end events)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.current: str | None = None
        self.peak = (0.0, 0.0)
        self.results: dict[str, StageResult] = {}

    def handle(self, event: dict[str, Any]) -> None:
        reported = (event["rss_mb"], event["rss_with_files_mb"])
        if event["event"] == "start":
            self.current, self.peak = event["stage"], reported
            return
        self.sample()
        peak = (max(self.peak[0], reported[0]), max(self.peak[1], reported[1]))
        self.results[event["stage"]] = StageResult(
            seconds=event["seconds"],
            peak_rss_mb=peak[0],
            peak_rss_with_files_mb=peak[1],
            cpu_seconds=event["cpu_seconds"],
            disk_mb=event.get("disk_mb"),
            gpu_peak_mb=event.get("gpu_peak_mb"),
            extra=event.get("extra", {}),
        )
        self.current = None

    def sample(self) -> None:
        if self.current is None:
            return
        now = tree_memory_mb(self.pid)
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(anonymous + shared, everything) proportional set size of ``pid`` and its descendants, in MB."""
    anon = total = 0.0
    for member in [pid, *descendants(pid)]:
        rollup = smaps_rollup(member)
        anon += rollup.get("Pss_Anon", 0) + rollup.get("Pss_Shmem", 0)
        total += rollup.get("Pss", 0)
    return anon / 1024, total / 1024


def smaps_rollup(pid: int | str) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` as {field: kB}; empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    return fields


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


# -- the stage processes -------------------------------------------------------------------------------------


class Workspace:
    """A stage process's view of the data set folder: its paths, the settings, the stages' events."""

    def __init__(self, root: Path, process: str) -> None:
        import torch

        self.root = root
        self.events = root / f"{process.replace(' ', '-')}.events"  # what run_stage_process_measured reads
        self.settings = json.loads((root / "settings.json").read_text())
        self.data = root / "coco"
        self.cache = root / "cache"
        self.model = root / "model.pt"
        self.run = root / "run"
        self.run.mkdir(exist_ok=True)  # Trainer.fit makes it; the stages call the trainer's parts
        self.device = torch.device(self.settings["device"])
        torch.set_num_threads(self.settings["threads"])

    def train_config(self):
        """The run every training stage is a part of: the small model (``model.pt``) on the data set."""
        from training.config import TrainConfig

        return TrainConfig.from_dict(
            dict(
                data=str(self.data),
                output_dir=str(self.run),
                cache_dir=str(self.cache),
                init_from=str(self.model),
                epochs=1,
                batch_size=self.settings["batch_size"],
                device=str(self.device),
                num_workers=self.settings["num_workers"],
                progress=False,
                calibrate=False,
                checkpoint_every=10**9,
            )
        )

    @contextlib.contextmanager
    def stage(self, name: str, *, disk: Sequence[Path] = ()) -> Iterator[dict[str, Any]]:
        """Time the block as stage ``name``, telling the measuring process when it starts and ends; the
        block may add to the dict it gets (``extra`` in the results)."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._event({"stage": name, "event": "start", **own_memory_mb()})
        extra: dict[str, Any] = {}
        cpu_started, started = cpu_seconds(), time.perf_counter()
        yield extra
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        end = {"stage": name, "event": "end", "seconds": seconds, "cpu_seconds": cpu, **own_memory_mb()}
        if disk:
            end["disk_mb"] = disk_mb(*disk)
        if cuda:
            end["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / MB
        self._event({**end, "extra": extra})

    def _event(self, event: dict[str, Any]) -> None:
        with self.events.open("a") as f:
            f.write(json.dumps(event) + "\n")


def own_memory_mb() -> dict[str, float]:
    rollup = smaps_rollup("self")
    anon = rollup.get("Pss_Anon", 0) + rollup.get("Pss_Shmem", 0)
    return {"rss_mb": anon / 1024, "rss_with_files_mb": rollup.get("Pss", 0) / 1024}


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def corpus_process(work: Workspace) -> None:
    from training.data import load_corpus

    with work.stage("corpus", disk=[work.data]):
        load_corpus(work.data)


def vocabulary_process(work: Workspace) -> None:
    """The vocabulary and caption rules, then (not timed) the small model that carries them: ``model.pt``."""
    from captioner import Vocabulary
    from captioner.caption_rules import CaptionRules
    from training.data import load_corpus

    config = work.train_config()
    corpus = load_corpus(work.data)
    with work.stage("vocabulary") as extra:
        captions = corpus.train_captions()
        vocab = Vocabulary.build(captions, min_count=config.min_word_count)
        rules = CaptionRules.learn(captions)
        extra["words"] = len(vocab)
    small_model(vocab, rules, work.settings).save(work.model)


def small_model(vocab, rules, settings: dict[str, Any]):
    """The tiny encoder (ResNet-18, random weights, ``tiny_size`` px) and a small LSTM decoder without attention
    over the ``decoder_vocab`` most frequent words: a real model, which the trainer takes with ``--init-from``."""
    import torch

    from captioner import Captioner, EncoderConfig, Vocabulary
    from captioner.config import DecoderConfig
    from captioner.decoder import CaptionDecoder
    from captioner.encoders import build_encoder
    from captioner.transforms import Preprocess

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(TINY_ENCODER, weights=None))
    size = settings["tiny_size"]
    encoder.preprocess = Preprocess(resize=size, crop=size)
    words = Vocabulary(vocab.tokens[: settings["decoder_vocab"]])
    hidden = settings["hidden"]
    decoder = CaptionDecoder(
        DecoderConfig(
            vocab_size=len(words),
            feature_dim=encoder.feature_dim,
            embed_dim=hidden,
            hidden_dim=hidden,
            attention=False,
            dropout=0.1,
        )
    )
    return Captioner(encoder, decoder, words, caption_rules=rules)


def feature_cache_process(work: Workspace) -> None:
    """The train and val photos encoded as the trainer does (``batches.cache_features``), pairs aside."""
    from captioner import Captioner
    from training import batches
    from training.data import load_corpus
    from training.features import build_feature_cache

    config = work.train_config()
    corpus = load_corpus(work.data)
    model = Captioner.from_checkpoint(work.model, device=work.device)
    splits = batches.make_splits(config, corpus, corpus)
    with work.stage("feature cache", disk=[work.cache]):
        for split in splits:
            build_feature_cache(
                model.encoder,
                split.paths,
                config.cache_dir,
                device=work.device,
                num_workers=config.num_workers,
                progress=False,
            )


def tokenisation_process(work: Workspace) -> None:
    """Captions to token ids (``batches.make_pairs``), then an epoch's batches of them."""
    from captioner import Captioner
    from training import batches
    from training.data import load_corpus
    from training.distributed import Dist
    from training.features import build_feature_cache

    config = work.train_config()
    corpus = load_corpus(work.data)
    model = Captioner.from_checkpoint(work.model)
    splits = batches.make_splits(config, corpus, corpus)
    for split in splits:  # found in the cache: what make_pairs skips (unreadable photos) comes with it
        split.features = build_feature_cache(model.encoder, split.paths, config.cache_dir, progress=False)
    with work.stage("tokenisation") as extra:
        for split in splits:
            split.pairs = batches.make_pairs(
                split.records, model.vocab, config.max_caption_words, set(split.features.failed)
            )
        extra["pairs"] = sum(len(split.pairs) for split in splits)
    with work.stage("batching") as extra:
        train = splits[0]
        extra["steps"] = len(batches.caption_batches(train, config, epoch=0, dist=Dist()))
        extra["scst_steps"] = len(batches.image_batches(train, config, epoch=0, dist=Dist()))


def cross_entropy_process(work: Workspace) -> None:
    from training.engine import Trainer

    with work.stage("trainer start"):
        trainer = Trainer(work.train_config())
    with work.stage("cross-entropy epoch") as extra:
        trainer._run_epoch()
        extra["captions_per_s"] = trainer.last_rate


def validation_process(work: Workspace) -> None:
    from training.engine import Trainer

    trainer = Trainer(work.train_config())
    with work.stage("validation") as extra:
        metrics = trainer.evaluate_val()
        extra["images"] = len(trainer.val_split.records)
        extra["CIDEr"] = metrics.get("CIDEr")


def self_critical_process(work: Workspace) -> None:
    """The reward (built as ``Trainer.scst_step`` builds it on its first step), then the first
    ``scst_fraction`` of a self-critical epoch's steps."""
    from training import batches
    from training.engine import Trainer
    from training.losses import build_cider_reward

    trainer = Trainer(work.train_config())
    with work.stage("CIDEr-D reward"):
        trainer.cider = build_cider_reward(trainer.train_split.records, main=True)
    images = batches.image_batches(trainer.train_split, trainer.config, epoch=0, dist=trainer.dist)
    steps = max(1, round(len(images) * work.settings["scst_fraction"]))
    trainer.module.train()
    scoring = timed(trainer.cider, "scores")
    with work.stage("self-critical slice") as extra:
        for rows in images[:steps]:
            trainer.scst_step(rows)
        extra.update(steps=steps, reward_seconds=scoring[0])


def timed(owner: Any, method: str) -> list[float]:
    """Wrap ``owner.method`` so that the seconds spent in it add up in the returned one-item list."""
    spent, original = [0.0], getattr(owner, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    setattr(owner, method, wrapper)
    return spent


def checkpoint_process(work: Workspace) -> None:
    from captioner import Captioner
    from captioner.checkpoint import load_checkpoint
    from training.engine import Trainer

    trainer = Trainer(work.train_config())
    saved = [work.run / "last.pt", work.run / "best.pt"]
    with work.stage("checkpoint save/load", disk=saved):
        trainer.save_last()
        trainer._save_best()
        for path in saved:
            Captioner.from_state(load_checkpoint(path), source=str(path))


def real_encoder_process(work: Workspace) -> None:
    """The real encoder's cost a photo as the feature cache pays it (decoding and preprocessing included), on
    Flickr8k's 224 px photos and, when coco-mini is beside the data, on COCO's own (about 640 x 480); then the
    cross-entropy data path at the real grid's size: batches of cached grids read and moved to the device."""
    from captioner import EncoderConfig
    from captioner.encoders import build_encoder
    from training.features import ImageFiles, build_feature_cache

    s = work.settings
    data = Path(s["data"])
    photos = sorted((data / "images").glob("*.jpg"))
    encoder = build_encoder(EncoderConfig(s["real_encoder"]))
    encode = functools.partial(build_feature_cache, encoder, cache_dir=work.cache, device=work.device, progress=False)
    encode(photos[-8:], num_workers=s["num_workers"])  # warm-up
    with work.stage("real encoder") as extra:
        store = encode(photos[: s["encoder_photos"]], num_workers=s["num_workers"])
        extra.update(photos=len(store), grid=list(store.grid_shape))
    coco = sorted((data.parent / COCO_MINI).glob("*.jpg"))
    if coco:
        with work.stage("real encoder, COCO photos") as extra:
            extra["photos"] = len(encode(coco, num_workers=s["num_workers"]))
        with work.stage("COCO photo decoding") as extra:  # what each data-loader worker does, on one core
            files = ImageFiles(coco, encoder.preprocess)
            extra["photos"] = sum(files[i][1] for i in range(len(files)))
    tiled = tiled_store(store, work.root / "tiled.npy", GRID_READ_ROWS)
    with work.stage("real grid reads") as extra:
        extra.update(read_real_grids(tiled, work))


def read_real_grids(store, work: Workspace, *, batch: int = 128, steps: int = 40) -> dict[str, Any]:
    """Time the cross-entropy input path over ``store``'s grids (captions of 12 words on random rows): what the
    host does for a step (``batches.load_caption_batches``), and on a GPU the move there and to fp32 as
    ``Trainer.train_step`` does it (on CPU that conversion is the step's own work, left out)."""
    import torch

    from training import batches

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(store), (batch * steps,), generator=generator).tolist()
    split = batches.Split(records=[], pairs=[(row, [1, *range(4, 16), 2]) for row in rows], features=store)
    order = [list(range(i, i + batch)) for i in range(0, len(rows), batch)]
    config = work.train_config()
    for grids, captions, _ in batches.load_caption_batches(split, order, config, pixels_from=None, device=work.device):
        if work.device.type == "cuda":
            grids.to(work.device, non_blocking=True).float()
            captions.to(work.device, non_blocking=True)
    return {"captions": len(rows), "batch": batch, "cache_photos": len(store)}


def tiled_store(store, path: Path, rows: int):
    """A feature cache of ``rows`` photos, ``store``'s grids over and over, read through once: its grids come
    from the page cache, already mapped, as a big cache's do from its second epoch on (not from the CPU's own
    caches, as a few photos' would)."""
    import numpy as np

    from training.features import FeatureStore

    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, *store.grid_shape))
    for start in range(0, rows, len(store)):
        array[start : start + len(store)] = store.array[: rows - start]
    array.flush()
    del array
    path.with_suffix(".json").write_text(json.dumps({"failed": {}}))
    tiled = FeatureStore(path, [f"photo{i}" for i in range(rows)])
    for start in range(0, rows, 256):
        tiled.get(range(start, min(start + 256, rows)))
    return tiled


STAGE_PROCESSES: dict[str, Callable[[Workspace], None]] = {
    "corpus": corpus_process,
    "vocabulary": vocabulary_process,
    "feature cache": feature_cache_process,
    "tokenisation": tokenisation_process,
    "cross-entropy": cross_entropy_process,
    "validation": validation_process,
    "self-critical": self_critical_process,
    "checkpoint": checkpoint_process,
}
STAGES = (
    "corpus",
    "vocabulary",
    "feature cache",
    "tokenisation",
    "batching",
    "trainer start",
    "cross-entropy epoch",
    "validation",
    "CIDEr-D reward",
    "self-critical slice",
    "checkpoint save/load",
)


def run_stage_process(name: str, root: Path | None) -> None:
    processes = {**STAGE_PROCESSES, "real encoder": real_encoder_process}
    if name not in processes or root is None:
        raise SystemExit(f"scale: unknown stage process {name!r} (or no --root)")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    processes[name](Workspace(root, name))


def measure_real_encoder(args: argparse.Namespace, photos: Sequence[Path]) -> dict[str, StageResult]:
    """The real encoder on ``--encoder-photos`` Flickr8k photos (and coco-mini's), and the cross-entropy data
    path at its grid size, in a process of its own (see :func:`real_encoder_process`)."""
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="captioner-scale-encoder-", dir=args.work))
    try:
        (root / "settings.json").write_text(json.dumps({**settings(args), "data": str(args.data)}))
        return run_stage_process_measured("real encoder", root, args.encoder_photos)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the report ----------------------------------------------------------------------------------------------


def exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float | None:
    """k of time ~ N^k: the least-squares slope of log(seconds) on log(N); None for a single size."""
    if len(sizes) < 2:
        return None
    xs = [math.log(n) for n in sizes]
    ys = [math.log(max(s, 1e-6)) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def seconds_text(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


@dataclass
class Report:
    """The results of every size, judged against the goals, as a table, notes and JSON.

    The exponent judged is that of the CPU time on a CPU device (the processes' own CPU seconds, data-loader
    workers included: on a machine shared with other work the wall clock measures the neighbours too) and that
    of the wall time on a GPU (whose work the CPU time does not see). Both are shown."""

    sizes: list[int]
    runs: list[SizeRun]
    real_encoder: dict[str, StageResult] | None
    settings: dict[str, Any]
    wall_seconds: float

    def series(self, stage: str, attribute: str) -> list[Any]:
        return [getattr(run.stages[stage], attribute) for run in self.runs]

    @property
    def judged_time(self) -> str:
        return "cpu_seconds" if self.settings["device"] == "cpu" else "seconds"

    def judged_exponent(self, stage: str) -> float | None:
        return exponent(self.sizes, self.series(stage, self.judged_time))

    def verdict(self, stage: str) -> str:
        """met, MISSED (with what), or "met (memory)" for a stage too short to judge its exponent."""
        k, judged = self.judged_exponent(stage), self.series(stage, "seconds")[-1] >= JUDGED_SECONDS
        missed = []
        if k is not None and judged and k > GOAL_EXPONENT:
            missed.append("k")
        if max(self.series(stage, "peak_rss_mb")) > GOAL_PEAK_MB:
            missed.append("memory")
        if missed:
            return f"MISSED ({', '.join(missed)})"
        return "met" if k is not None and judged else "met (memory)"

    def rows(self) -> list[list[str]]:
        rows = []
        for stage in STAGES:
            k, k_cpu = (exponent(self.sizes, self.series(stage, t)) for t in ("seconds", "cpu_seconds"))
            disk = self.runs[-1].stages[stage].disk_mb
            rows.append(
                [
                    stage,
                    *map(seconds_text, self.series(stage, "seconds")),
                    "-" if k is None else f"{k:.2f}",
                    "-" if k_cpu is None else f"{k_cpu:.2f}",
                    *(f"{mb:,.0f}" for mb in self.series(stage, "peak_rss_mb")),
                    "-" if disk is None else f"{disk:,.0f}",
                    self.verdict(stage),
                ]
            )
        return rows

    def table(self) -> str:
        labels = [size_label(n) for n in self.sizes]
        head = ["stage", *(f"s {x}" for x in labels), "k", "k cpu", *(f"MB {x}" for x in labels)]
        head += [f"disk MB {labels[-1]}", "goals"]
        rows = self.rows()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return (
                "| "
                + " | ".join(
                    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
                )
                + " |"
            )

        title = (
            f"\n{', '.join(f'{n:,}' for n in self.sizes)} photos on {self.settings['device']} "
            f"({self.settings['threads']} torch thread(s) a process, {os.cpu_count()} CPUs)\n"
        )
        return "\n".join([title, line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])

    def notes(self) -> str:
        s, last = self.settings, self.runs[-1]
        words = last.stages["vocabulary"].extra.get("words", 0)
        scst = last.stages["self-critical slice"].extra.get("steps", 0)
        reward = last.stages["self-critical slice"].extra.get("reward_seconds", 0.0)
        lines = [""]
        for run in self.runs:
            d = run.dataset
            lines.append(
                f"{d.photos:,} photos: {d.train:,} train + {d.val:,} val, {d.captions:,} captions "
                f"({d.distinct_captions:,} distinct texts), data set built in {d.seconds:.0f} s ({d.disk_mb:,.0f} MB); "
                f"all stages {run.seconds / 60:.1f} min"
            )
        lines += [
            f"tiny encoder: {TINY_ENCODER} (random weights) at {s['tiny_size']} px; decoder: LSTM of {s['hidden']} "
            f"units, no attention, the {s['decoder_vocab']:,} most frequent of the vocabulary's {words:,} words; "
            f"{s['batch_size']} captions a step",
            f"self-critical slice: the first {s['scst_fraction']:.0%} of the epoch's steps ({scst:,} steps of 32 "
            f"images x 5 samples at {self.sizes[-1]:,} photos; the CIDEr-D reward's scoring "
            f"{1000 * reward / max(scst, 1):.1f} ms a step)",
        ]
        if self.real_encoder is not None:
            lines += self.real_encoder_notes()
        judged = "CPU" if self.judged_time == "cpu_seconds" else "wall"
        lines.append(
            f"k: time ~ N^k fitted on log-log over the sizes, of the wall time and of the CPU time (data-loader "
            f"workers included); goals: k of the {judged} time <= {GOAL_EXPONENT} for stages of "
            f">= {JUDGED_SECONDS:.0f} s at the largest size; MB: peak resident memory, memory-mapped files "
            f"excluded, <= {GOAL_PEAK_MB:,}; "
            f"wall time {self.wall_seconds / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end"
        )
        return "\n".join(lines)

    def real_encoder_notes(self) -> list[str]:
        assert self.real_encoder is not None
        s, n = self.settings, self.sizes[-1]
        flickr = self.real_encoder["real encoder"]
        photos, grid = flickr.extra["photos"], flickr.extra["grid"]
        per_photo, grid_kb = flickr.seconds / photos, math.prod(grid) * 2 / 1024
        lines = [
            f"real encoder: {s['real_encoder']} on {s['device']}: {per_photo * 1000:.1f} ms a photo ({photos} Flickr8k "
            f"photos, decoding and preprocessing included); {n:,} photos: {n * per_photo / 60:.0f} min and a cache "
            f"of {n * grid_kb / 1024 / 1024:.1f} GiB ({'x'.join(map(str, grid))} fp16, {grid_kb:.0f} KiB a photo)"
        ]
        coco = self.real_encoder.get("real encoder, COCO photos")
        if coco is not None:
            decoding = self.real_encoder["COCO photo decoding"]
            lines.append(
                f"  on coco-mini's {coco.extra['photos']} COCO photos (their own size): "
                f"{coco.seconds / coco.extra['photos'] * 1000:.1f} ms a photo; decoding and preprocessing one "
                f"alone, on one core: {decoding.seconds / decoding.extra['photos'] * 1000:.1f} ms"
            )
        reads = self.real_encoder["real grid reads"]
        moved = f", moved to {s['device']} and made fp32" if s["device"] != "cpu" else ""
        lines.append(
            f"cross-entropy input path at that grid size (batches of {reads.extra['batch']} captions' grids read from "
            f"a cache of {reads.extra['cache_photos']:,} photos{moved}): "
            f"{reads.extra['captions'] / reads.seconds:,.0f} captions/s"
        )
        return lines

    def summary(self) -> dict[str, Any]:
        """The judged exponent's largest value (among stages long enough to judge), the largest peak, what missed."""
        judged = {
            stage: k
            for stage in STAGES
            if (k := self.judged_exponent(stage)) is not None and self.series(stage, "seconds")[-1] >= JUDGED_SECONDS
        }
        steepest = max(judged, key=lambda stage: judged[stage]) if judged else None
        largest = max(STAGES, key=lambda stage: max(self.series(stage, "peak_rss_mb")))
        return {
            "exponent_of": self.judged_time,
            "largest_exponent": None if steepest is None else {"stage": steepest, "k": judged[steepest]},
            "largest_peak": {"stage": largest, "mb": max(self.series(largest, "peak_rss_mb"))},
            "missed": [stage for stage in STAGES if self.verdict(stage).startswith("MISSED")],
        }

    def to_json(self) -> dict[str, Any]:
        stages = {}
        for stage in STAGES:
            seconds = self.series(stage, "seconds")
            stages[stage] = {
                "seconds": seconds,
                "peak_rss_mb": self.series(stage, "peak_rss_mb"),
                "exponent": exponent(self.sizes, seconds),
                "cpu_seconds": self.series(stage, "cpu_seconds"),
                "cpu_exponent": exponent(self.sizes, self.series(stage, "cpu_seconds")),
                "peak_rss_with_files_mb": self.series(stage, "peak_rss_with_files_mb"),
                "disk_mb": self.series(stage, "disk_mb"),
                "gpu_peak_mb": self.series(stage, "gpu_peak_mb"),
                "extra": self.series(stage, "extra"),
                "goals": self.verdict(stage),
            }
        real = None if self.real_encoder is None else {k: asdict(v) for k, v in self.real_encoder.items()}
        return {
            "sizes": self.sizes,
            "stages": stages,
            "summary": self.summary(),
            "data_sets": [asdict(run.dataset) for run in self.runs],
            "real_encoder": real,
            "settings": self.settings,
            "wall_seconds": self.wall_seconds,
        }


if __name__ == "__main__":
    main()
