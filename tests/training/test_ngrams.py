"""N-gram ids and counts: one numbering for the sentences an index is built from and for the others."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import numpy as np

from training.ngrams import NgramCounts, NgramIndex, distinct


def _grams(sentence: list[str], n: int = 4) -> Counter:
    return Counter(tuple(sentence[i : i + k]) for k in range(1, n + 1) for i in range(len(sentence) - k + 1))


def _rows(counts: NgramCounts, sentence: int) -> Counter:
    at = counts.sentence == sentence
    rows = zip(counts.gram[at].tolist(), counts.order[at].tolist(), counts.count[at].tolist(), strict=True)
    return Counter({(g, o): c for g, o, c in rows})


def test_sentences_counted_in_an_index_share_its_ids_and_new_ngrams_get_new_ones() -> None:
    rng = random.Random(0)
    words = ["a", "dog", "runs", "on", "the", "grass", "snow", "red"]
    built = [[rng.choice(words[:6]) for _ in range(rng.randrange(0, 9))] for _ in range(40)]
    other = [[rng.choice(words) for _ in range(rng.randrange(0, 9))] for _ in range(40)] + [["zebra", "zebra", "dog"]]
    index, built_counts = NgramIndex.build(built, n=4)
    known = set().union(*(_grams(s) for s in built))
    assert index.size == built_counts.n_ids == len(known)

    # A sentence made of one n-gram has exactly one n-gram of that length: it tells the n-gram's id,
    # when counted in the same call as the sentences it is checked against.
    grams = sorted(set().union(*(_grams(s) for s in other)) | known)
    counted = index.count([*other, *map(list, grams)])
    gram_id = {}
    for j, gram in enumerate(grams):
        row = [g for g, o in _rows(counted, len(other) + j) if o == len(gram) - 1]
        assert len(row) == 1
        gram_id[gram] = row[0]
    assert len(set(gram_id.values())) == len(grams)  # distinct n-grams, distinct ids
    assert {g for g, i in gram_id.items() if i < index.size} == known  # the index's ids for what it has
    assert all(i < counted.n_ids for i in gram_id.values())

    for sentences, counts in ((other, counted), (built, built_counts)):
        for s, sentence in enumerate(sentences):
            expected = {(gram_id[g], len(g) - 1): c for g, c in _grams(sentence).items()}
            assert _rows(counts, s) == Counter(expected), sentence
    assert list(counted.sentence) == sorted(counted.sentence)


def test_counting_a_few_sentences_costs_nothing_in_proportion_to_the_index() -> None:
    """Each self-critical step counts ~160 sampled captions in the reward's index, whose words are the training
    corpus's (tens of thousands at COCO scale): counting them must not copy the index's word table (it once
    merged it with the new words on every call), so what one call allocates stays small however big the index."""
    big = [[f"word{i}", f"word{i + 1}", "a"] for i in range(0, 60_000, 2)]
    index, _ = NgramIndex.build(big, n=4)
    sampled = [["a", "word2", "word3", "zebra"], ["word4", "a", "new", "word"]]
    index.count(sampled)  # warm-up: whatever numpy allocates once
    tracemalloc.start()
    try:
        counts = index.count(sampled)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"counting 2 captions allocated {peak / 1024:.0f} KB against an index of 60,000 words"
    # and it still counts: every n-gram occurrence of each caption
    assert [sum(_rows(counts, s).values()) for s in (0, 1)] == [sum(_grams(s).values()) for s in sampled]


def test_distinct_is_numpys_unique_by_sorting() -> None:
    rng = np.random.default_rng(0)
    for keys in (np.zeros(0, dtype=np.int64), np.array([7]), rng.integers(-5, 40, 500), rng.integers(0, 10**12, 99)):
        assert np.array_equal(distinct(keys), np.unique(keys))
