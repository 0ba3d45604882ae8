"""When tag-guided decoding forces a tag's word into a caption, and which words (``DecodingOptions.guided_by_tags``).

The decoder learned its world from Flickr8k; on other photos it says "a man" or "a dog" where the encoder's
ImageNet head sees a pizza. Guidance runs the plain beam search first, then, for an image where the plain caption
is unsure and a tag is confident, a constrained beam search (``captioner.decoding.constrained_beam_search``) whose
caption must contain one of the confident tags' caption words (``captioner.tag_words``). It must never make an
in-domain caption worse, so it fires only when both hold:

* a tag (top 5, merged display names) has probability >= :attr:`GuidancePolicy.min_tag_confidence`; the words of
  every such tag form one disjunctive constraint (the caption names at least one of them);
* the plain caption's calibrated confidence (``captioner.confidence``) is < :attr:`GuidancePolicy.
  max_caption_confidence`; a model without a confidence model is guided on the tags alone.

A plain caption that already names one of the words is kept as it is (the constrained search would find the same
caption). Both thresholds were chosen on Flickr8k dev with ``scripts/tune_guidance.py`` (its docstring says how);
never on coco-mini, the out-of-domain check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from captioner.tag_words import words_for_tags
from captioner.tags import Tag
from captioner.vocab import Vocabulary


@dataclass(frozen=True)
class GuidancePolicy:
    """The thresholds of the module docstring."""

    min_tag_confidence: float = 0.1  # a tag's merged probability needed for its words to be forced
    max_caption_confidence: float = 0.3  # guide only captions less confident than this (1.0: every caption)

    def __post_init__(self) -> None:
        if not 0.0 < self.min_tag_confidence <= 1.0:
            raise ValueError(f"min_tag_confidence must be in (0, 1], got {self.min_tag_confidence}")
        if not 0.0 < self.max_caption_confidence <= 1.0:
            raise ValueError(f"max_caption_confidence must be in (0, 1], got {self.max_caption_confidence}")


DEFAULT_POLICY = GuidancePolicy()


def required_words(
    tags: Sequence[Tag],
    caption: Sequence[str],
    caption_confidence: float | None,
    vocab: Vocabulary,
    policy: GuidancePolicy = DEFAULT_POLICY,
) -> list[str]:
    """The words one of which the image's caption must name, or ``[]`` to keep the plain ``caption`` (its words)."""
    if caption_confidence is not None and caption_confidence >= policy.max_caption_confidence:
        return []
    words = words_for_tags([tag.name for tag in tags if tag.confidence >= policy.min_tag_confidence], vocab)
    if any(word in words for word in caption):
        return []
    return words
