"""Where a caption may start and end, learned from the training captions themselves.

Self-critical training drifts towards captions that stop before their last noun ("a dog is running on
a red"): CIDEr-D barely punishes them. And a model sometimes starts with a verb ("is standing in a
bath"). Human captions almost never do either, and the training captions say which words those are,
for any vocabulary or language, with no hand-made list:

* a word may not *end* a caption when it (almost) never ends a training caption: articles,
  prepositions, conjunctions, most adjectives and colours ("a", "on", "and", "wooden", "red");
* a word may not end a caption after a given previous word when that *pair* (almost) never ends
  one, although the word alone may: "a blue" (while "dressed in blue" is fine), "sitting on";
* a word may not *start* a caption when it (almost) never starts one: "is", "standing", "in".

"Almost never" is a Laplace-smoothed rate below :data:`DEFAULT_MAX_RATE`: ``(k + 1) / (n + 2) < 1 %``
for a word seen ``n`` times that ends (or starts) ``k`` captions, so a rare word needs evidence (about
a hundred sightings and no ending) before it is ruled out, while "a" (46,781 sightings, 0 endings) is
ruled out at once. On Flickr8k's 30,000 training captions this rules out ending on 112 of the 2,539
words seen 5 times or more ("a", "the", "in", "of", "wooden", "red", "white", "man"; not "on", which
ends 2 % of the captions it appears in), on 34 pairs ("a blue", "a water", "sitting on"), and
starting with 239 words ("is", "standing", "in", "red").

The rules travel in the checkpoint (and the ONNX export) as word lists; :meth:`CaptionRules.compile`
turns them into masks for a vocabulary, and ``captioner.decoding`` applies them in every decoding
method and in the self-critical sampler. A checkpoint without rules decodes as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.arrays import Array, array_namespace, convert_like, device
from captioner.text import tokenize
from captioner.vocab import Vocabulary

DEFAULT_MAX_RATE = 0.01


def _rare(hits: int, seen: int, max_rate: float) -> bool:
    return (hits + 1) / (seen + 2) < max_rate


@dataclass(frozen=True)
class CaptionRules:
    """Words that may not end a caption, word pairs that may not end one, words that may not start one."""

    no_end: frozenset[str]
    no_end_pairs: frozenset[tuple[str, str]]
    no_start: frozenset[str]
    max_rate: float = DEFAULT_MAX_RATE

    @classmethod
    def learn(cls, captions: Iterable[str], *, max_rate: float = DEFAULT_MAX_RATE) -> CaptionRules:
        """From raw training captions, split into words as the vocabulary splits them (``captioner.text``)."""
        return cls.derive((tokenize(caption) for caption in captions), max_rate=max_rate)

    @classmethod
    def derive(cls, captions: Iterable[Sequence[str]], *, max_rate: float = DEFAULT_MAX_RATE) -> CaptionRules:
        """From tokenised training captions (lists of words, no special tokens)."""
        if not 0.0 < max_rate < 1.0:
            raise ValueError(f"max_rate must be in (0, 1), got {max_rate}")
        seen: Counter[str] = Counter()
        ends: Counter[str] = Counter()
        starts: Counter[str] = Counter()
        pairs_seen: Counter[tuple[str, str]] = Counter()
        pairs_end: Counter[tuple[str, str]] = Counter()
        for words in captions:
            if not words:
                continue
            seen.update(words)
            pairs_seen.update(zip(words, words[1:], strict=False))
            ends[words[-1]] += 1
            starts[words[0]] += 1
            if len(words) >= 2:
                pairs_end[(words[-2], words[-1])] += 1
        if not seen:
            raise ValueError("no captions to learn caption rules from")
        no_end = frozenset(w for w, n in seen.items() if _rare(ends[w], n, max_rate))
        no_end_pairs = frozenset(
            pair for pair, n in pairs_seen.items() if pair[1] not in no_end and _rare(pairs_end[pair], n, max_rate)
        )
        no_start = frozenset(w for w, n in seen.items() if _rare(starts[w], n, max_rate))
        return cls(no_end, no_end_pairs, no_start, max_rate)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (sorted, so the same rules always serialise the same way) for checkpoints and JSON."""
        return {
            "no_end": sorted(self.no_end),
            "no_end_pairs": sorted([a, b] for a, b in self.no_end_pairs),
            "no_start": sorted(self.no_start),
            "max_rate": self.max_rate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionRules:
        return cls(
            frozenset(data["no_end"]),
            frozenset((a, b) for a, b in data["no_end_pairs"]),
            frozenset(data["no_start"]),
            float(data.get("max_rate", DEFAULT_MAX_RATE)),
        )

    def with_words_like(self, sources: Mapping[str, str]) -> CaptionRules:
        """These rules, where each new word (``new -> source``) follows its source word's rules, alone and in pairs
        (a vocabulary extension: ``captioner.vocabulary_extension``)."""

        def like(words: frozenset[str]) -> frozenset[str]:
            return words | {new for new, source in sources.items() if source in words}

        pairs = set(self.no_end_pairs)
        for new, source in sources.items():
            pairs |= {(new, b) for a, b in self.no_end_pairs if a == source}
            pairs |= {(a, new) for a, b in self.no_end_pairs if b == source}
        return CaptionRules(like(self.no_end), frozenset(pairs), like(self.no_start), self.max_rate)

    def dangling(self, words: Sequence[str]) -> bool:
        """The caption stops where a human caption would not (an empty caption counts too)."""
        if not words:
            return True
        return words[-1] in self.no_end or (len(words) >= 2 and (words[-2], words[-1]) in self.no_end_pairs)

    def subjectless(self, words: Sequence[str]) -> bool:
        """The caption starts with a word that never starts a human caption (typically a verb)."""
        return bool(words) and words[0] in self.no_start

    def compile(self, vocab: Vocabulary, locked: np.ndarray | None = None) -> RuleMasks:
        """Masks over ``vocab``'s ids (numpy; decoding moves them to its arrays' kind and device, see
        :meth:`RuleMasks.like`); words outside the vocabulary are dropped. ``locked`` (V,) bool: the words no
        decoding method may produce unless guidance unlocks them (:attr:`RuleMasks.locked`)."""
        size = len(vocab)
        no_end = np.zeros(size, dtype=bool)
        no_start = np.zeros(size, dtype=bool)
        for word in self.no_end:
            if word in vocab:
                no_end[vocab.token_id(word)] = True
        for word in self.no_start:
            if word in vocab:
                no_start[vocab.token_id(word)] = True
        keys = sorted(
            vocab.token_id(a) * size + vocab.token_id(b) for a, b in self.no_end_pairs if a in vocab and b in vocab
        )
        locked = np.asarray(locked, dtype=bool) if locked is not None else None
        return RuleMasks(no_end, np.asarray(keys, dtype=np.int64), no_start, locked)

    @classmethod
    def none(cls) -> CaptionRules:
        """No rule: for a model without caption rules that still needs masks (a vocabulary extension's words)."""
        return cls(frozenset(), frozenset(), frozenset())


@dataclass(frozen=True)
class RuleMasks:
    """:class:`CaptionRules` over one vocabulary, as arrays a decoding step can index: numpy arrays or torch
    tensors, all of one kind and on one device (:meth:`like` converts them)."""

    no_end: Array  # (V,) bool: <end> may not follow this word
    no_end_pairs: Array  # (P,) int64, sorted: previous * V + last, pairs <end> may not follow
    no_start: Array  # (V,) bool: may not be the first word
    # (V,) or (R, V) bool: words never produced (a vocabulary extension's new words), or None; (R, V) per row
    # when tag-guided decoding unlocks some of them for some images (:meth:`unlocking`)
    locked: Array | None = None

    def like(self, reference: Array) -> RuleMasks:
        """These masks as arrays of ``reference``'s kind on its device (themselves when they already are)."""
        locked = convert_like(self.locked, reference) if self.locked is not None else None
        converted = RuleMasks(
            convert_like(self.no_end, reference),
            convert_like(self.no_end_pairs, reference),
            convert_like(self.no_start, reference),
            locked,
        )
        same = converted.no_end is self.no_end and converted.no_start is self.no_start
        return self if same and converted.no_end_pairs is self.no_end_pairs and locked is self.locked else converted

    def locked_only(self) -> RuleMasks | None:
        """What still holds when a caption runs out of room at ``max_length`` (it must end there, wherever it is):
        the locked words stay unsaid; None when there are none."""
        if self.locked is None:
            return None
        no_end = self.no_end & ~self.no_end  # all False, of the same kind and device
        return RuleMasks(no_end, self.no_end_pairs[:0], no_end, self.locked)

    def unlocking(self, words: Array) -> RuleMasks:
        """These masks with the words ``(R, V)`` bool unlocked, row by row (``R`` rows of a decoding batch)."""
        if self.locked is None:
            return self
        return dataclasses.replace(self, locked=self.locked & ~convert_like(words, self.locked))

    def constrain(self, logits: Array, last: Array, before_last: Array | None) -> Array:
        """Forbid (-inf) what may not come next: after ``<start>``, ``<end>`` and the words that may not start
        a caption; ``<end>`` after a word (or ``before_last, last`` pair) that may not end one. ``logits (B, V)``,
        ``last (B,)`` the words just fed in, ``before_last (B,)`` the words before them (None at the first
        two steps). Out of place, so gradients flow (the self-critical sampler)."""
        xp = array_namespace(logits)
        vocab = logits.shape[-1]
        end_column = xp.arange(vocab, device=device(logits)) == Vocabulary.eos_id  # (V,)
        banned = xp.logical_not(self.allows_end(last, before_last, vocab))[:, None] & end_column  # (B, V)
        at_start = (last == Vocabulary.bos_id)[:, None]  # (B, 1): nor an empty caption
        banned = banned | (at_start & (self.no_start | end_column))
        if self.locked is not None:
            banned = banned | self.locked
        return xp.where(banned, -math.inf, logits)

    def allows_end(self, last: Array, before_last: Array | None, vocab: int) -> Array:
        """(B,) bool: ``<end>`` may follow ``last`` (preceded by ``before_last``, when given)."""
        xp = array_namespace(last)
        no_end = xp.take(self.no_end, last, axis=0)
        pairs = self.no_end_pairs
        if before_last is not None and pairs.shape[0]:
            keys = before_last * vocab + last
            # pairs is sorted: a binary search per row (isin built a table over V * V values on every step)
            found = xp.take(pairs, xp.minimum(xp.searchsorted(pairs, keys), pairs.shape[0] - 1), axis=0)
            no_end = no_end | (found == keys)
        return xp.logical_not(no_end)
