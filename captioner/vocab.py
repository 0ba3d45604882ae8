"""Vocabulary: tokens <-> ids, built from training captions with a minimum count."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from captioner.text import tokenize

PAD, BOS, EOS, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocabulary:
    """An ordered token list whose first four entries are ``<pad> <start> <end> <unk>``.

    Stored in checkpoints as that plain list, so a vocabulary round-trips through
    ``torch.load(weights_only=True)`` without pickled objects.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not contain duplicate tokens")
        self.tokens = tokens
        self._index = {tok: i for i, tok in enumerate(tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 5, max_size: int | None = None) -> Vocabulary:
        """Build from raw captions: words seen at least ``min_count`` times, most frequent first."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        # Sort by count, then alphabetically, so the same captions always give the same ids.
        words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        words = [w for w in words if w not in SPECIALS]
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def token_id(self, token: str) -> int:
        return self._index.get(token, self.unk_id)

    def encode(self, caption: str, *, add_special: bool = True) -> list[int]:
        """Tokenise ``caption`` and map it to ids, wrapped in ``<start> ... <end>`` by default."""
        ids = [self.token_id(tok) for tok in tokenize(caption)]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Ids to words, stopping at ``<end>`` and skipping ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            words.append(self.tokens[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode_tokens(ids))
