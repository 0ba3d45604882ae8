"""New words for a trained model: each takes a known word's weights, and only tag guidance may say it.

The decoder learned its words from Flickr8k, which never says "zebra", "sink" or "broccoli", although the encoder's
ImageNet head recognises them. Following the Deep Compositional Captioner (Hendricks et al., CVPR 2016, "direct
transfer"), a new word is added with the weights of a known word that is used alike (a *source*: zebra <- cow,
sink <- toilet, microwave <- stove): its input embedding row, so the decoder continues after "zebra" as after
"cow", and its output row and bias, so the decoder rates "zebra" where it would rate "cow". What tells the two
apart is the image's tags, not the decoder: a new word is *locked* -- no decoding method produces it on its own
(with the source's weights it would tie with the source on every photo of a cow) -- and tag-guided decoding
(``captioner.guidance``) unlocks it for a photo whose confident tag names it (``captioner.tag_words``). Plain
decoding of an extended model gives exactly the greedy and beam captions of the model before, with the same
log-probabilities (a locked word's logit is -inf, so it adds nothing to the softmax either), which keeps its
calibration valid; sampling draws from the same distributions.

The new words are appended after the known ones (existing ids keep their meaning: feature caches, caption rules
and the confidence model stay valid); their caption rules are their sources' (``CaptionRules.with_words_like``).
Which words and sources: ``captioner/assets/word_transfers.json``, built and reviewed by
``scripts/make_word_transfers.py``. The extension travels in the checkpoint (``vocabulary_extension``) and in
the ONNX export's ``captioner.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.vocab import SPECIALS, Vocabulary

if TYPE_CHECKING:
    from captioner.model import Captioner

WORD_TRANSFERS_FILE = Path(__file__).parent / "assets" / "word_transfers.json"


class VocabularyExtensionError(CaptionerError, ValueError):
    """A word transfer that cannot be applied (unknown source, a word the model has, a malformed table)."""


@dataclass(frozen=True)
class VocabularyExtension:
    """The words added to a model, each with the known word whose weights it took (new word -> source)."""

    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "direct transfer (DCC): embedding, output row and bias copied", "sources": dict(self.sources)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VocabularyExtension:
        sources = data.get("sources")
        pairs = sources.items() if isinstance(sources, dict) else None
        if pairs is None or not all(isinstance(word, str) and isinstance(known, str) for word, known in pairs):
            raise VocabularyExtensionError("vocabulary_extension.sources must map new words to known words")
        return cls(dict(pairs))

    def locked_mask(self, vocab: Vocabulary) -> np.ndarray:
        """(V,) bool: the ids of the new words (the words no decoding method produces unguided)."""
        mask = np.zeros(len(vocab), dtype=bool)
        for word in self.sources:
            if word in vocab:
                mask[vocab.token_id(word)] = True
        return mask


def load_word_transfers(path: Path = WORD_TRANSFERS_FILE) -> dict[str, str]:
    """New word -> source word, from a table written by ``scripts/make_word_transfers.py`` (its "words")."""
    try:
        words = json.loads(path.read_text(encoding="utf-8"))["words"]
        return {str(word): str(entry["source"]) for word, entry in words.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise VocabularyExtensionError(f"word-transfer table {path} is unreadable: {error}") from error


def extend_vocabulary(model: Captioner, transfers: Mapping[str, str]) -> list[str]:
    """Add each new word of ``transfers`` (new word -> known source word) to ``model``, in place; returns the words
    added (those it already has are skipped: an extended model extends again to the same model)."""
    vocab = model.vocab
    added = {new: source for new, source in transfers.items() if new not in vocab}
    for new, source in added.items():
        if not new or new != new.strip() or " " in new or new in SPECIALS:
            raise VocabularyExtensionError(f"{new!r} cannot be a word of the vocabulary")
        if source not in vocab or source in SPECIALS:
            raise VocabularyExtensionError(f"the source word {source!r} of {new!r} is not in the model's vocabulary")
    if not added:
        return []
    if model.backend != "torch":
        raise VocabularyExtensionError("extend the PyTorch checkpoint, not an ONNX export")
    import torch  # the weights are torch's; the rest of this module serves the torch-free runtime too

    decoder = model.decoder
    old_size = len(vocab)
    sources = torch.tensor([vocab.token_id(source) for source in added.values()])
    with torch.no_grad():
        embed = torch.cat([decoder.embed.weight, decoder.embed.weight[sources]])
        head_weight = torch.cat([decoder.head.weight, decoder.head.weight[sources]])
        head_bias = torch.cat([decoder.head.bias, decoder.head.bias[sources]])
    decoder.embed = torch.nn.Embedding.from_pretrained(embed, freeze=False, padding_idx=Vocabulary.pad_id)
    decoder.head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], device=head_weight.device)
    with torch.no_grad():
        decoder.head.weight.copy_(head_weight)
        decoder.head.bias.copy_(head_bias)
    decoder.config = dataclasses.replace(decoder.config, vocab_size=old_size + len(added))
    model.vocab = Vocabulary([*vocab.tokens, *added])
    if model.caption_rules is not None:
        model.caption_rules = model.caption_rules.with_words_like(added)
    known = dict(model.vocabulary_extension.sources) if model.vocabulary_extension else {}
    model.vocabulary_extension = VocabularyExtension({**known, **added})
    return list(added)
