"""A tiny untrained checkpoint (resnet18 without weights, 16-unit decoder) for service tests.

Also runnable, for tests that must stay out of this process: ``python -m tests.service.tiny_model OUT.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers import tiny_captioner


def save_tiny_checkpoint(path: Path, *, attention: bool = True) -> Path:
    """:func:`tests.helpers.tiny_captioner` with resnet18's own preprocessing (256, crop 224), as served models have,
    and training metadata."""
    model = tiny_captioner(size=None, attention=attention)
    metadata = {  # shaped like the training engine's record
        "training": {"data": "unit-test captions", "format": "test", "splits": {"train": 5}, "config": {"epochs": 0}},
        "metrics": {"val": {"bleu4": 0.0}},
    }
    model.save(path, metadata=metadata)
    return path


if __name__ == "__main__":
    save_tiny_checkpoint(Path(sys.argv[1]))
