"""The cell x attention x decoding ablation on one data set, at one training budget for every row.

Trains vanilla RNN, GRU and LSTM decoders with and without soft attention (six runs, same
hyper-parameters and epochs, checkpoint picked on the dev split), scores each on the test split with
greedy, beam-3 and sampled (T=0.7) decoding, and prints a markdown table. Finished runs and scores
are reused and an interrupted run resumes from its ``last.pt``, so a stopped ablation picks up where it was.

    python scripts/ablation.py --data ../shared/data/flickr8k --out runs/ablation --epochs 2
    python scripts/ablation.py --out runs/ablation --table-only      # print the table again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CELLS = ("rnn", "gru", "lstm")
DECODINGS = {
    "greedy": ["--method", "greedy"],
    "beam3": ["--method", "beam", "--beam-size", "3"],
    "sample T0.7": ["--method", "sample", "--temperature", "0.7", "--seed", "0"],
}
# the default model's recipe; each run sets its cell and attention, and the ablation its epoch budget, all
# cross-entropy (the recipe's self-critical phase is not part of the comparison)
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "default_model.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--table-only", action="store_true", help="print the table from finished runs")
    return parser


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _slug(cell: str, attention: bool) -> str:
    return f"{cell}-{'att' if attention else 'noatt'}"


def train_command(args, cell: str, attention: bool) -> list[str]:
    """captioner-train for one row: the recipe file, then what this ablation varies, then where and how to run."""
    return [
        _bin("captioner-train"), "--config", str(RECIPE),
        "--cell", cell, "--attention" if attention else "--no-attention", "--epochs", str(args.epochs),
        "--scst-after", "none",
        "--data", args.data, "--output-dir", str(Path(args.out) / _slug(cell, attention)),
        "--cache-dir", args.cache_dir, "--device", args.device, "--resume",
    ]  # fmt: skip


def run_one(args, cell: str, attention: bool) -> None:
    run = Path(args.out) / _slug(cell, attention)
    if _train_time(run)[0] is None:  # not finished: train, resuming from last.pt when a run was cut short
        cmd = train_command(args, cell, attention)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    for name, flags in DECODINGS.items():
        out = run / "test" / name.replace(" ", "-")
        if (out / "metrics.json").is_file():
            continue
        cmd = [
            _bin("captioner-eval"), "--checkpoint", str(run / "best.pt"), "--data", args.data, "--split", "test",
            "--cache-dir", args.cache_dir, "--device", args.device, "--no-java", "--no-progress", "--out", str(out),
            *flags,
        ]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def _train_time(run: Path) -> tuple[float | None, float | None]:
    """Wall seconds of the run, and its fastest 50-step window in captions/s.

    On a machine shared with other work the wall time carries that work's load; the fastest window
    is the cleanest comparison of what each cell costs.
    """
    log = run / "log.jsonl"
    if not log.is_file():
        return None, None
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ends = [r["wall_seconds"] for r in records if r.get("event") == "end"]
    rates = [r["captions_per_s"] for r in records if "captions_per_s" in r]
    return (ends[-1] if ends else None), (max(rates) if rates else None)


def table(out: str, cells=CELLS) -> str:
    rows = [
        "| cell | attention | decoding | BLEU-1 | BLEU-4 | ROUGE-L | CIDEr | train min | train captions/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for attention in (False, True):
            run = Path(out) / _slug(cell, attention)
            seconds, rate = _train_time(run)
            for name in DECODINGS:
                path = run / "test" / name.replace(" ", "-") / "metrics.json"
                if not path.is_file():
                    continue
                m = json.loads(path.read_text())["metrics"]
                minutes = f"{seconds / 60:.1f}" if seconds is not None else "?"
                speed = f"{rate:.0f}" if rate is not None else "?"
                rows.append(
                    f"| {cell} | {'yes' if attention else 'no'} | {name} | {100 * m['BLEU-1']:.1f} | "
                    f"{100 * m['BLEU-4']:.1f} | {100 * m['ROUGE-L']:.1f} | {m['CIDEr']:.3f} | {minutes} | {speed} |"
                )
    return "\n".join(rows)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if not args.table_only:
        for cell in args.cells:
            for attention in (False, True):
                try:
                    run_one(args, cell, attention)
                except subprocess.CalledProcessError as exc:  # the command printed its own reason above
                    sys.exit(
                        f"ablation: {Path(exc.cmd[0]).name} failed (exit {exc.returncode}) for {cell}, "
                        f"attention={attention}; rerun to resume"
                    )
    print(table(args.out, args.cells))


if __name__ == "__main__":
    main()
