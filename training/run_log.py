"""A run's record of itself: ``log.jsonl`` (every event and metric, one JSON object a line) and, when
TensorBoard is installed, its scalars. Only the main process writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, out: Path, *, main: bool) -> None:
        self.path = out / "log.jsonl"
        self.main = main
        self.writer = _tensorboard(out) if main else None

    def write(self, record: dict[str, Any], *, step: int) -> None:
        """Append ``record`` with the time; its numbers also go to TensorBoard at its ``step`` (else ``step``)."""
        if not self.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("time", "step", "epoch"):
                    self.writer.add_scalar(key, value, record.get("step", step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
