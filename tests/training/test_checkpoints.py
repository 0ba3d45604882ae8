"""What a run's checkpoints and starting models need from the data, and what that costs at scale."""

from __future__ import annotations

import tracemalloc

from tests.helpers import CAPTIONS, tiny_vocab
from training.checkpoints import unknown_share


def test_the_unknown_share_is_counted_caption_by_caption() -> None:
    """``--init-from`` reports the share of training words its vocabulary lacks: counted as the captions go by,
    not from a list of every word id of the data set (6.8 million at COCO scale), so what it allocates does
    not grow with the captions."""
    vocab = tiny_vocab()
    assert unknown_share(vocab, ["a dog runs", "a zebra runs far"]) == 2 / 7

    captions = (CAPTIONS[i % len(CAPTIONS)] for i in range(50_000))  # 370,000 words, never in memory at once
    tracemalloc.start()
    try:
        share = unknown_share(vocab, captions)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert share == 0.0
    assert peak < 256 * 1024, f"counting 50,000 captions' words allocated {peak / 1024:.0f} KB at most"
