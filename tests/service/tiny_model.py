"""A tiny untrained checkpoint (resnet18 without weights, 16-unit decoder) for service tests.

Also runnable, for tests that must stay out of this process: ``python -m tests.service.tiny_model OUT.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers import fake_confidence_model, tiny_captioner


def save_tiny_checkpoint(
    path: Path,
    *,
    attention: bool = True,
    class_head: bool = False,
    confidence: bool = False,
    confidence_bias: float = 0.0,
) -> Path:
    """:func:`tests.helpers.tiny_captioner` with resnet18's own preprocessing (256, crop 224), as served models have,
    and training metadata. ``class_head``: the encoder has a (fake) ImageNet head, so results carry tags;
    ``confidence``: a (fake) confidence model, so captions carry a confidence; ``confidence_bias`` shifts every
    confidence (-20: all near 0, as for a photo far from the training data)."""
    model = tiny_captioner(size=None, attention=attention, class_head=class_head)
    if confidence:
        model.confidence_model = fake_confidence_model(model.encoder.feature_dim, bias=confidence_bias)
    metadata = {  # shaped like the training engine's record
        "training": {"data": "unit-test captions", "format": "test", "splits": {"train": 5}, "config": {"epochs": 0}},
        "metrics": {"val": {"bleu4": 0.0}},
    }
    model.save(path, metadata=metadata)
    return path


if __name__ == "__main__":
    save_tiny_checkpoint(Path(sys.argv[1]))
