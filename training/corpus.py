"""The one form every caption data set is read into: images with their captions and split
(:class:`ImageRecord`, :class:`CaptionCorpus`), what loading skipped (:class:`LoadReport`), and the
checks and readers every format's loader shares. The loaders themselves are in :mod:`training.data`."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from captioner.errors import CaptionerError

logger = logging.getLogger("training.data")  # what loading reports, under the loaders' name


SPLITS = ("train", "val", "test", "restval", "unsplit")

# Problem kinds a loader reports, with the one-line description used in summaries.
PROBLEMS = {
    "malformed": "entry that cannot be parsed (skipped)",
    "unknown_image": "caption for an image id that is not in the image list (skipped)",
    "empty_caption": "empty caption (skipped)",
    "duplicate": "duplicate entry (later one skipped)",
    "split_unknown": "split file lists an image that has no captions (skipped)",
    "no_captions": "image with no captions (skipped)",
    "missing_image": "image file not found (skipped)",
    "unreadable_image": "image file cannot be decoded (skipped)",
}


class DataError(CaptionerError, ValueError):
    """A data file that cannot be used at all: missing, not valid JSON, wrong schema, nothing usable."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and all of its captions."""

    image_id: str  # COCO: str(images[].id); Karpathy: str(cocoid) or filename; Flickr8k: file name
    path: Path  # the image file (checked to exist when the corpus was loaded)
    captions: tuple[str, ...]  # stripped, non-empty, in file order
    split: str  # one of SPLITS


@dataclass
class LoadReport:
    """What a loader skipped: a count and the first few examples for each problem kind in PROBLEMS."""

    max_examples: int = 5
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        if kind not in PROBLEMS:
            raise ValueError(f"unknown problem kind {kind!r}; expected one of {', '.join(PROBLEMS)}")
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(example)

    def count(self, kind: str) -> int:
        return self.counts[kind]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: LoadReport) -> None:
        for kind in PROBLEMS:
            self.counts[kind] += other.counts[kind]
            shown = self.examples.setdefault(kind, [])
            shown.extend(other.examples.get(kind, [])[: self.max_examples - len(shown)])
        self.counts = +self.counts  # drop the zero counts merge added

    def summary(self) -> str:
        """One line per problem kind seen, e.g. ``missing_image: 3 image file not found ... e.g. a.jpg``."""
        if not self.total:
            return "no problems"
        lines = []
        for kind, description in PROBLEMS.items():
            if self.counts[kind]:
                examples = "; ".join(self.examples.get(kind, []))
                lines.append(f"{kind}: {self.counts[kind]} {description}, e.g. {examples}")
        return "\n".join(lines)


@dataclass
class CaptionCorpus:
    """The images of one data set with their captions and splits, plus what was skipped on loading.

    Karpathy's ``restval`` images are training data by convention (train + restval = 113,287 COCO
    images); ``split("train")`` and ``train_captions()`` include them unless ``restval_as_train=False``.
    """

    records: list[ImageRecord]
    problems: LoadReport
    source: str  # the format read: "coco", "karpathy" or "flickr8k"

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str, *, restval_as_train: bool = True) -> list[ImageRecord]:
        """The records of split ``name`` (one of SPLITS), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        wanted = {"train", "restval"} if name == "train" and restval_as_train else {name}
        return [r for r in self.records if r.split in wanted]

    def split_sizes(self) -> dict[str, int]:
        """Images per split, for the splits present, e.g. ``{"train": 6000, "val": 1000, ...}``."""
        sizes = Counter(r.split for r in self.records)
        return {name: sizes[name] for name in SPLITS if sizes[name]}

    def train_captions(self, *, restval_as_train: bool = True) -> list[str]:
        """All captions of the training split: the only text a vocabulary may be built from."""
        return [c for r in self.split("train", restval_as_train=restval_as_train) for c in r.captions]

    def to_references(self, split: str | None = None) -> dict[str, list[str]]:
        """``{image_id: [captions]}`` for evaluation, for one split or (default) every record."""
        records = self.records if split is None else self.split(split, restval_as_train=False)
        return {r.image_id: list(r.captions) for r in records}

    def subset(self, n_per_split: int, *, seed: int | None = None) -> CaptionCorpus:
        """At most ``n_per_split`` images of each split: the first ones, or a seeded random sample."""
        if n_per_split < 0:
            raise ValueError(f"n_per_split must be >= 0, got {n_per_split}")
        keep: set[int] = set()
        for name in SPLITS:
            indices = [i for i, r in enumerate(self.records) if r.split == name]
            if seed is not None and len(indices) > n_per_split:
                indices = sorted(random.Random(f"{seed}-{name}").sample(indices, n_per_split))
            keep.update(indices[:n_per_split])
        return replace(self, records=[r for i, r in enumerate(self.records) if i in keep])


def add_caption(captions: list[str], caption: str, report: LoadReport, where: str) -> None:
    caption = caption.strip()
    if caption:
        captions.append(caption)
    else:
        report.add("empty_caption", where)


def finish_corpus(
    candidates: list[tuple[str, Path, list[str], str]],
    report: LoadReport,
    source: str,
    path: Path,
    images_dir: Path,
    verify_images: bool,
) -> CaptionCorpus:
    records = []
    for image_id, image_path, captions, split in candidates:
        if not captions:
            report.add("no_captions", image_id)
        elif not image_path.is_file():
            report.add("missing_image", str(image_path))
        elif verify_images and (reason := _unreadable(image_path)):
            report.add("unreadable_image", f"{image_path}: {reason}")
        else:
            records.append(ImageRecord(image_id, image_path, tuple(captions), split))
    if not records:
        raise DataError(f"{path}: no usable images (images looked for in {images_dir}); {report.summary()}")
    corpus = CaptionCorpus(records, report, source)
    sizes = ", ".join(f"{k} {v}" for k, v in corpus.split_sizes().items())
    n_captions = sum(len(r.captions) for r in records)
    logger.info("%s (%s): %d images, %d captions (%s)", path, source, len(records), n_captions, sizes)
    if report.total:
        logger.warning("%s: skipped %d problem entries:\n%s", path, report.total, report.summary())
    return corpus


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None. JPEGs decode at 1/8 scale: truncation still shows."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return None


def read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a BOM; text mode turns Windows line endings into "\n".
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DataError(f"{path}: not valid JSON ({where}: {exc.msg})") from None
