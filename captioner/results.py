"""What captioning gives back: captions, the tags of what an image shows, and one image's result.

The library's :class:`~captioner.model.Captioner` makes them and the HTTP client (:mod:`captioner.client`) reads
them from a server's JSON, so code written against one works with the other. Standard library only: the client
imports them without torch or numpy (the class probabilities' numpy type is an annotation, never imported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


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


@dataclass(frozen=True)
class Tag:
    """One thing the image shows: a display name, its merged probability, and its parents, nearest first."""

    name: str
    confidence: float
    parents: tuple[str, ...]

    def to_dict(self, *, digits: int | None = None) -> dict[str, object]:
        """The tag as JSON gives it everywhere (``{"name", "confidence", "parents"}``: the API, the CLI's ``--json``
        and bulk records); ``digits`` rounds the confidence for files people read."""
        confidence = self.confidence if digits is None else round(self.confidence, digits)
        return {"name": self.name, "confidence": confidence, "parents": list(self.parents)}

    @classmethod
    def from_dict(cls, data: object) -> Tag:
        """A tag from its JSON (:meth:`to_dict`); ``KeyError``, ``TypeError`` or ``ValueError`` for anything else, so
        a reader of another program's answer (``captioner.client``) can report it as not a tag."""
        if not isinstance(data, dict):
            raise TypeError(f"a tag is a JSON object, got {type(data).__name__}")
        name, confidence, parents = data["name"], data["confidence"], data.get("parents", [])
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tag's name is a non-empty string, got {name!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, int | float):
            raise TypeError(f"tag {name!r}: confidence is a number, got {confidence!r}")
        if not isinstance(parents, list) or not all(isinstance(parent, str) for parent in parents):
            raise TypeError(f"tag {name!r}: parents are a list of names, got {parents!r}")
        return cls(name, float(confidence), tuple(parents))


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
