"""Feature grids *with* the ImageNet head's logits for a list of photos, encoded once and cached on disk.

Tag-guided decoding needs both from the same encoder pass, and the training feature cache
(``training.features``) keeps grids only. Tuning guidance (``scripts/tune_guidance.py``) and measuring it
(``bench/novel_objects.py``) decode the same 2,000 photos many times: encoding them once saves minutes on CPU.
The file is keyed by the model's id (checkpoint name and sha256) and a name for the photo set, and is checked
against the image ids it was made for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner import Captioner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaggedFeatures:
    image_ids: list[str]
    grids: torch.Tensor  # (N, C, h, w) float16: the decoder's input
    logits: torch.Tensor  # (N, 1000) float32: the ImageNet head's logits from the same pass


def encode_with_logits(
    model: Captioner, paths: Sequence[str], image_ids: Sequence[str], cache: Path, *, batch: int = 16
) -> TaggedFeatures:
    """The photos' grids and class logits, from ``cache`` when it holds them for these image ids."""
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        if list(data["image_ids"]) == list(image_ids):
            return TaggedFeatures(list(data["image_ids"]), data["grids"], data["logits"])
        log.warning("%s was made for other photos: encoding again", cache)
    grids, logits = [], []
    for start in range(0, len(paths), batch):
        grid, class_logits = model.encode_with_class_logits(model.preprocess(list(paths[start : start + batch])))
        if class_logits is None:
            raise ValueError("this model's encoder has no ImageNet head: nothing to guide by")
        grids.append(torch.as_tensor(grid).half().cpu())  # (b, C, h, w); numpy from the onnxruntime backend
        logits.append(torch.as_tensor(class_logits).float().cpu())  # (b, 1000)
    features = TaggedFeatures(list(image_ids), torch.cat(grids), torch.cat(logits))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_ids": features.image_ids, "grids": features.grids, "logits": features.logits}, cache)
    return features
