"""Caption tokenisation that follows coco-caption's PTBTokenizer (lower-cased, punctuation dropped).

coco-caption runs Stanford's PTBTokenizer (Java) and then drops punctuation tokens. This is a
pure-Python equivalent for caption text, so vocabulary building, training and metrics all see the
same tokens without Java.
"""

from __future__ import annotations

import re

# Tokens coco-caption removes after PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# PTB rewrites brackets as -LRB- etc. before coco-caption drops them; drop the raw characters directly.
_DROPPED = PUNCTUATIONS | {"(", ")", "[", "]", "{", "}", '"'}

_CONTRACTIONS = re.compile(r"(?i)(\w)('s|'m|'d|'ll|'re|'ve|n't)\b")
_SPLIT = re.compile(r"\.\.\.|--|[\w]+(?:[-'.&/][\w]+)*|'[a-z]+|n't|[^\w\s]", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into PTB-style word tokens without punctuation."""
    text = _CONTRACTIONS.sub(r"\1 \2", text.lower())
    return [tok for tok in _SPLIT.findall(text) if tok not in _DROPPED]
