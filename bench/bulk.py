"""Bulk captioning: ``captioner caption DIR --output out.jsonl`` against the one-shot CLI it replaced.

The baseline is the ``captioner caption`` of an earlier commit (default b21bf19: every image decoded at
full size in the main process before the first batch, PyTorch, results printed at the end), run from
a copy of that commit's ``captioner`` package, on the same photos. Runs alternate, baseline first, so
both see the same machine state. Each command is timed whole (start-up, model loading and, for the
new one, its decoding threads included) and its peak resident memory is sampled every 0.1 s over
the whole process tree from /proc. Then the new CLI captions every photo
of the folder once more (--all) for the peak memory whatever the number of photos.

    python bench/bulk.py [--images ../shared/data/flickr8k/images] [--count 1000] [--rounds 2] [--all]

Goals: >= 1.5x images/s over the baseline; peak memory <= 1.2 GB for all 8,091 Flickr8k photos.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
BASELINE_COMMIT = "b21bf19"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos")
    parser.add_argument("--count", type=int, default=1000, help="photos in the timed runs (the first N, sorted)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each command, alternating")
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="the commit whose CLI is the baseline")
    parser.add_argument("--all", action="store_true", help="also caption the whole folder with the new CLI")
    return parser


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MB."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def run_measured(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """(seconds, peak MB of the process tree, exit status) of ``command``, output discarded.

    ``cwd`` must be outside the repository: ``python -m`` puts the working folder first on sys.path, and
    from the repository the baseline would import this checkout's ``captioner`` instead of its own.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, peak, code


def baseline_package(commit: str, into: Path) -> Path:
    """The ``captioner`` package as it was at ``commit``, unpacked under ``into``."""
    archive = subprocess.run(["git", "archive", commit, "captioner"], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(photos) < args.count:
        raise SystemExit(f"need {args.count} photos in {args.images}, found {len(photos)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_") or k == "CAPTIONER_CACHE_DIR"}
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp_name:
        tmp = Path(tmp_name)
        subset = tmp / "photos"
        subset.mkdir()
        for photo in photos[: args.count]:
            (subset / photo.name).symlink_to(photo.resolve())
        old = baseline_package(args.baseline, tmp / "baseline")
        # the old CLI takes files only: give it the same photos, sorted, as arguments
        files = [str(p) for p in sorted(subset.iterdir())]
        commands = {
            f"one-shot CLI ({args.baseline})": (
                [sys.executable, "-m", "captioner.cli", "caption", *files],
                {**env, "PYTHONPATH": str(old)},
            ),
            "streaming CLI, --backend torch": (
                [sys.executable, "-m", "captioner.cli", "caption", str(subset), "--backend", "torch", "--no-progress"],
                env,
            ),
            "streaming CLI (default: onnxruntime)": (
                [sys.executable, "-m", "captioner.cli", "caption", str(subset), "--no-progress"],
                env,
            ),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for name, (_, command_env) in commands.items():  # each command runs the code it is named for
            where = subprocess.run([sys.executable, "-c", "import captioner; print(captioner.__file__)"],
                                   env=command_env, cwd=tmp, capture_output=True, text=True, check=True)  # fmt: skip
            expected = old if name.startswith("one-shot") else ROOT
            if not Path(where.stdout.strip()).is_relative_to(expected):
                raise SystemExit(f"{name} would import {where.stdout.strip()}, not the code under {expected}")
        # a first, untimed run exports the model to ONNX if the cache does not have it yet
        subprocess.run([sys.executable, "-m", "captioner.cli", "caption", files[0]], env=env, cwd=tmp,
                       capture_output=True)  # fmt: skip
        for round_ in range(args.rounds):
            for name, (command, command_env) in commands.items():
                out = tmp / f"out-{round_}.jsonl"
                if name.startswith("streaming"):
                    out.unlink(missing_ok=True)
                    command = [*command, "--output", str(out)]
                seconds, peak, code = run_measured(command, command_env, tmp)
                if code != 0:
                    raise SystemExit(f"{name} exited with {code}")
                results[name].append((seconds, peak))
                print(f"round {round_ + 1}: {name}: {seconds:.1f} s, peak {peak:.0f} MB", file=sys.stderr)
        whole = None
        if args.all:
            out = tmp / "all.jsonl"
            whole = run_measured(
                [sys.executable, "-m", "captioner.cli", "caption", str(args.images), "--output", str(out),
                 "--no-progress"], env, tmp,
            )  # fmt: skip
            lines = len(out.read_bytes().splitlines())

    print(f"\n{args.count} photos from {args.images}, beam 3 (the CLI's default), {args.rounds} alternating rounds")
    print(f"| {'command':<38} | {'median s':>8} | {'images/s':>8} | {'vs one-shot':>11} | {'peak MB':>7} |")
    print(f"|{'-' * 40}|----------|----------|-------------|---------|")
    base = None
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        rate = args.count / seconds
        base = base or rate
        peak = max(p for _, p in runs)
        print(f"| {name:<38} | {seconds:>8.1f} | {rate:>8.1f} | {rate / base:>10.2f}x | {peak:>7.0f} |")
    if whole is not None:
        seconds, peak, code = whole
        print(
            f"all {lines} records of {len(photos)} photos in {seconds:.0f} s ({len(photos) / seconds:.1f} images/s), "
            f"peak {peak:.0f} MB over the process tree (goal <= 1200), exit {code}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
