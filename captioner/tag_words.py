"""Which caption words name each image tag: the table ``scripts/make_tag_words.py`` builds, read once.

``captioner/assets/tag_words.json`` maps a tag's display name (``captioner.tags``) to the caption words that name
it, best first ("notebook computer" -> laptop, computer; "goldfinch" -> bird): the words tag-guided decoding
(``captioner.guidance``) may force into a caption. The script's docstring says how each entry was decided.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.vocab import Vocabulary

TAG_WORDS_FILE = Path(__file__).parent / "assets" / "tag_words.json"


class TagWordsError(CaptionerError, ValueError):
    """The tag-word table is missing or malformed."""


@functools.cache
def load_tag_words(path: Path = TAG_WORDS_FILE) -> dict[str, tuple[str, ...]]:
    """Display name -> its caption words, best first (read and checked once per process)."""
    try:
        words = json.loads(path.read_text(encoding="utf-8"))["words"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TagWordsError(f"tag-word table {path} is unreadable: {error}") from error
    if not isinstance(words, dict):
        raise TagWordsError(f"tag-word table {path}: 'words' must map tag names to lists of words")
    table: dict[str, tuple[str, ...]] = {}
    for name, entry in words.items():
        if not (isinstance(entry, list) and entry and all(isinstance(w, str) and w for w in entry)):
            raise TagWordsError(f"tag-word table {path}: tag {name!r} needs a non-empty list of words")
        table[name] = tuple(entry)
    return table


def words_for_tags(names: Iterable[str], vocab: Vocabulary) -> list[str]:
    """The caption words of the tags ``names`` that ``vocab`` has, in order, each once (unknown tags give none)."""
    table = load_tag_words()
    found: list[str] = []
    for name in names:
        for word in table.get(name, ()):
            if word in vocab and word not in found:
                found.append(word)
    return found
