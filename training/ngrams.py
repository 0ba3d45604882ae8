"""N-gram counts with numpy, for BLEU (``training.metrics``) and CIDEr-D (``training.cider``).

Words get integer ids and n-grams get integer ids, so n-grams never exist as Python tuples: the k-gram
starting at a token is the (k-1)-gram there extended by one word, and ``np.unique`` numbers those
(prefix, word) pairs. An :class:`NgramIndex` keeps the numbering of the sentences it was built from,
so that other sentences (sampled captions) can be counted in the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

Tokens = Sequence[str]


class NgramCounts(NamedTuple):
    """One row per distinct n-gram of a sentence, sorted by sentence, then n-gram id."""

    sentence: np.ndarray  # index of the sentence among those counted
    gram: np.ndarray  # n-gram id, unique across orders; every id is < n_ids
    order: np.ndarray  # n - 1
    # A field named count shadows tuple.count, which NamedTuple allows; mypy flags any such override.
    count: np.ndarray  # type: ignore[assignment]  # occurrences in the sentence
    n_ids: int  # ids in use: the index's, then those of n-grams it lacks


class NgramIndex:
    """Ids for the 1..n-grams of some sentences: words in order of first occurrence, k-grams in the
    order of their (prefix id, word id) pairs, each order's ids after the previous order's.

    Build one with :meth:`build`, which also counts the sentences it is built from; :meth:`count`
    counts other sentences in the same ids, giving the n-grams the index lacks ids from ``size`` on.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._words: dict[str, int] = {}
        self._pairs = [np.zeros(0, dtype=np.int64) for _ in range(n - 1)]  # orders 2..n: sorted pair codes
        self._sizes = [0] * n  # n-grams per order

    @classmethod
    def build(cls, sentences: Sequence[Tokens], n: int) -> tuple[NgramIndex, NgramCounts]:
        """The index of every n-gram of ``sentences``, and their counts in it."""
        index = cls(n)
        counts, words, pairs = index._count(sentences)
        index._words, index._pairs, index._sizes = words, pairs, [len(words), *map(len, pairs)]
        return index, counts

    @property
    def size(self) -> int:
        """The number of distinct n-grams (of every order) in the index."""
        return sum(self._sizes)

    def count(self, sentences: Sequence[Tokens]) -> NgramCounts:
        """The n-grams of ``sentences`` in this index's ids; those it lacks get ids from ``size`` on."""
        return self._count(sentences)[0]

    def _count(self, sentences: Sequence[Tokens]) -> tuple[NgramCounts, dict[str, int], list[np.ndarray]]:
        """Counts, plus the words and the sorted pair codes per order of the n-grams the index lacks."""
        known_words, n_known_words = self._words, len(self._words)
        flat = [w for s in sentences for w in s]
        unseen = (w for w in dict.fromkeys(flat) if w not in known_words)  # in order of first occurrence
        new_words = {w: n_known_words + i for i, w in enumerate(unseen)}
        # Looked up in the two tables in turn, never in a merged copy: a copy of the index's words would cost
        # every call (each self-critical step) time and memory in proportion to the training corpus's vocabulary.
        word_id = known_words.get
        words = np.fromiter(
            (new_words[w] if (i := word_id(w)) is None else i for w in flat), dtype=np.int64, count=len(flat)
        )
        n_words = n_known_words + len(new_words)
        lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        sentence_of_token = np.repeat(np.arange(len(sentences)), lengths)
        tokens_left = np.repeat(starts + lengths, lengths) - np.arange(len(words))  # this one included

        # Per order, ids below the order's size are the index's; the rest number the new n-grams.
        # Globally, the index's orders come first (offsets), then the new n-grams, order by order.
        offsets = np.cumsum([0, *self._sizes])
        new_offset = int(offsets[-1])
        columns: list[tuple[np.ndarray, np.ndarray]] = []  # (sentence, n-gram id) per k-gram occurrence
        new_pairs: list[np.ndarray] = []
        code = words
        for k in range(1, self.n + 1):
            at = np.flatnonzero(tokens_left >= k)
            size = self._sizes[k - 1]
            if k == 1:
                n_new = len(new_words)
            else:
                prefix, word = code[at], words[at + k - 1]
                numbered = np.empty(len(at), dtype=np.int64)
                new = np.ones(len(at), dtype=bool)
                pairs = self._pairs[k - 2]
                if len(pairs):
                    # Multipliers only need to exceed the word ids: the index's pairs use its own.
                    maybe = np.flatnonzero((prefix < self._sizes[k - 2]) & (word < n_known_words))
                    query = prefix[maybe] * max(n_known_words, 1) + word[maybe]
                    at_pair = np.minimum(np.searchsorted(pairs, query), len(pairs) - 1)
                    found = pairs[at_pair] == query
                    numbered[maybe[found]] = at_pair[found]
                    new[maybe[found]] = False
                unique, inverse = np.unique(prefix[new] * max(n_words, 1) + word[new], return_inverse=True)
                numbered[new] = size + inverse
                new_pairs.append(unique)
                n_new = len(unique)
                code = np.full(len(words), -1, dtype=np.int64)
                code[at] = numbered
            within = code[at]
            ids = np.where(within < size, offsets[k - 1] + within, new_offset + within - size)
            columns.append((sentence_of_token[at], ids))
            new_offset += n_new
        n_ids = max(new_offset, 1)

        keys = np.concatenate([s * n_ids + g for s, g in columns])
        keys, counts = np.unique(keys, return_counts=True)
        gram = keys % n_ids
        # Each order's ids are two runs, the index's and the new ones: an id's run gives its order.
        # The runs' starts ascend; an empty run starts where the next one does, so "the last run that
        # starts at or before the id" is never an empty one.
        new_sizes = [len(new_words), *map(len, new_pairs)]
        run_starts = np.concatenate([offsets[:-1], offsets[-1] + np.cumsum([0, *new_sizes[:-1]])])
        run_order = np.tile(np.arange(self.n), 2)
        order = run_order[np.searchsorted(run_starts, gram, side="right") - 1]
        return NgramCounts(keys // n_ids, gram, order, counts, n_ids), new_words, new_pairs


class Entries(NamedTuple):
    """One row per distinct n-gram of a caption: which caption, which n-gram, how often."""

    caption: np.ndarray  # index of the caption among the candidates (= image), or among all references
    gram: np.ndarray  # n-gram id, unique across orders
    order: np.ndarray  # n - 1
    count: np.ndarray  # type: ignore[assignment]  # shadows tuple.count, as NgramCounts.count does
    key: np.ndarray  # image * n_grams + gram: joins candidates to their references


class NgramTable:
    """Every 1..n-gram of one candidate caption per image and of the images' references, in one index."""

    def __init__(self, hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], n: int) -> None:
        self.n = n
        self.n_images = len(hyps)
        sentences = [*hyps, *(r for image_refs in refs for r in image_refs)]
        self.hyp_len = np.array([len(h) for h in hyps], dtype=np.int64)
        self.ref_len = np.array([len(s) for s in sentences[len(hyps) :]], dtype=np.int64)
        self.refs_per_image = np.array([len(r) for r in refs], dtype=np.int64)
        self.ref_image = np.repeat(np.arange(self.n_images), self.refs_per_image)

        counts = NgramIndex.build(sentences, n)[1]
        self.n_grams = counts.n_ids
        is_hyp = counts.sentence < self.n_images

        def entries(rows: np.ndarray, caption: np.ndarray, image: np.ndarray) -> Entries:
            gram = counts.gram[rows]
            return Entries(caption, gram, counts.order[rows], counts.count[rows], image * self.n_grams + gram)

        hyp_image = counts.sentence[is_hyp]
        ref_index = counts.sentence[~is_hyp] - self.n_images
        self.hyp = entries(is_hyp, hyp_image, hyp_image)
        self.ref = entries(~is_hyp, ref_index, self.ref_image[ref_index])
        # The distinct (image, n-gram) pairs of the references, sorted, with the n-gram's largest
        # count in any one reference of that image.
        by_key = np.argsort(self.ref.key, kind="stable")
        sorted_keys = self.ref.key[by_key]
        first = np.flatnonzero(np.diff(sorted_keys, prepend=-1))
        self.ref_keys = sorted_keys[first]
        self.ref_max_count = (
            np.maximum.reduceat(self.ref.count[by_key], first) if len(first) else np.zeros(0, dtype=np.int64)
        )

    def ref_lengths_per_image(self) -> list[list[int]]:
        bounds = np.cumsum(self.refs_per_image).tolist()
        lengths = self.ref_len.tolist()
        return [lengths[end - count : end] for end, count in zip(bounds, self.refs_per_image.tolist(), strict=True)]


def distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct values of the integer array ``keys``, sorted: ``np.unique(keys)``, by sorting.

    NumPy 2.3 and later answer a plain ``np.unique`` from a hash table: on the reward's 21.9 million (image,
    n-gram) keys at COCO scale its document frequencies took 36 s that way and take 2.3 s sorted, and on random
    keys the hash table grew faster than their number (6 s for 5 million, 42 s for 22 million; a sort 0.4 and
    1.7 s)."""
    ordered = np.sort(keys)
    return ordered[np.diff(ordered, prepend=ordered[:1] - 1) != 0]


def gather(values: np.ndarray, sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values[j]`` where ``sorted_keys[j] == query``, else 0, for each query."""
    out = np.zeros(len(queries), dtype=np.float64)
    if len(sorted_keys) == 0:
        return out
    at = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    found = sorted_keys[at] == queries
    out[found] = values[at[found]]
    return out
