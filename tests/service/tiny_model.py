"""A tiny untrained checkpoint (resnet18 without weights, 16-unit decoder) for service tests.

Also runnable, for tests that must stay out of this process: ``python -m tests.service.tiny_model OUT.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from captioner import Captioner, EncoderConfig, Vocabulary

CAPTIONS = [
    "a dog runs on the grass",
    "a black dog jumps over a log",
    "two children play in the water",
    "a man rides a bike down the street",
    "a woman in a red shirt sits on a bench",
]


def save_tiny_checkpoint(path: Path, *, attention: bool = True) -> Path:
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    encoder = EncoderConfig("resnet18", weights=None)
    model = Captioner.build(encoder, vocab, embed_dim=16, hidden_dim=16, attention=attention, attention_dim=8)
    metadata = {  # shaped like the training engine's record
        "training": {"data": "unit-test captions", "format": "test", "splits": {"train": 5}, "config": {"epochs": 0}},
        "metrics": {"val": {"bleu4": 0.0}},
    }
    model.save(path, metadata=metadata)
    return path


if __name__ == "__main__":
    save_tiny_checkpoint(Path(sys.argv[1]))
