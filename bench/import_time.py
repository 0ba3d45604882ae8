"""How long does ``import captioner.client`` take? Against ``import captioner.model`` (torch), in the same run.

Each import runs in a fresh interpreter (``python -c "import ..."``), the statements interleaved round by round
so that both see the same load on the machine; each row is the median wall time of N runs, with the interpreter
alone (``python -c pass``) as the floor. The issue's goal: the client within 0.3 s. The first round only warms
the file cache and is not counted.

    python bench/import_time.py [--runs 15] [--goal 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python alone": "pass",
    "import captioner.options": "import captioner.options",
    "import captioner.client": "import captioner.client",
    "import captioner.model": "import captioner.model",
}
CLIENT, BASELINE = "import captioner.client", "import captioner.model"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each statement (default: 15)")
    parser.add_argument("--goal", type=float, default=0.3, help="seconds the client's import may take (default: 0.3)")
    return parser


class ImportFailed(Exception):
    """A statement that did not run: its time would mean nothing."""


def time_statement(statement: str) -> float:
    """Wall seconds of a fresh interpreter running ``statement``; :class:`ImportFailed` if it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ImportFailed(f"{statement!r} failed: {last}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.runs < 1:
        print("import_time: error: --runs must be >= 1", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for round_ in range(args.runs + 1):
        for name, statement in STATEMENTS.items():
            try:
                seconds = time_statement(statement)
            except ImportFailed as exc:
                print(f"import_time: error: {exc}", file=sys.stderr)
                return 1
            if round_ > 0:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{sys.executable}, median of {args.runs} fresh interpreters each\n")
    print(f"| {'statement':<26} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'vs model':>8} |")
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 7}:|{'-' * 7}:|{'-' * 9}:|")
    for name, values in times.items():
        ratio = medians[name] / medians[BASELINE]
        print(f"| {name:<26} | {medians[name]:>8.3f} | {min(values):>6.3f} | {max(values):>6.3f} | {ratio:>7.1%} |")
    verdict = "MET" if medians[CLIENT] <= args.goal else "MISSED"
    print(f"\ngoal: {CLIENT} <= {args.goal:g} s: {verdict} ({medians[CLIENT]:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
