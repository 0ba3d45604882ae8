"""What captioning returns: each image's captions, tags and whether it abstained (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from captioner.tags import Tag


@dataclass
class Caption:
    text: str  # the caption as a sentence of lower-case words
    tokens: list[str]  # its words
    log_prob: float  # model log-probability of the words and the end token
    score: float  # ranking score (length-normalised for beam search)
    attention: list[list[float]] | None = None  # per word, weights over the h*w feature grid
    # Calibrated probability that the caption is acceptable (captioner.confidence); None: the model has no
    # confidence model (see ``captioner calibrate``)
    confidence: float | None = None


@dataclass
class CaptionResult:
    captions: list[Caption]  # best first; empty when abstained
    attention_shape: tuple[int, int] | None = None  # (h, w) of the grid the attention weights cover
    # Softmax of the encoder's ImageNet-1k head, (1000,) float32, from the same encoder pass as the captions;
    # None when the encoder has no known head (see ImageEncoder). Left out of ==: an array has no single truth value.
    class_probabilities: np.ndarray | None = field(default=None, compare=False)
    tags: list[Tag] = field(default_factory=list)  # what the image shows, strongest first (captioner.tags)
    # True when every caption's confidence fell below DecodingOptions.min_confidence: no captions, tags kept
    abstained: bool = False
