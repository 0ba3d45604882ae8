"""``captioner-train`` and ``captioner-eval`` as console scripts: see :mod:`captioner.console`."""

from __future__ import annotations

from captioner.console import run


def train() -> int:
    return run("captioner-train", "training.cli:train_main")


def evaluate() -> int:
    return run("captioner-eval", "training.cli:eval_main")
