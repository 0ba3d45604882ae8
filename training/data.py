"""Caption data sets read into one form: an image path, its captions and its split.

Three formats are read, as they are distributed:

- the official COCO captions file (``annotations/captions_train2017.json``: ``images[]`` with
  ``id``/``file_name``, ``annotations[]`` with ``image_id``/``caption``) and its image folder;
- a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``: ``images[]`` with
  ``filename``, optional ``filepath``, ``split`` and ``sentences[].raw``/``tokens``);
- Flickr8k: ``captions.txt`` (CSV, header ``image,caption``) or ``Flickr8k.token.txt``
  (``name.jpg#0<TAB>caption``), plus the official ``Flickr_8k.{train,dev,test}Images.txt`` files.

Bad entries (missing or unreadable images, captions for unknown images, empty captions, duplicates)
are skipped and counted in a :class:`LoadReport`, so training never meets them inside a DataLoader
worker. A file that cannot be read at all raises :class:`DataError` with a one-line reason.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from training.corpus import (
    SPLITS,
    CaptionCorpus,
    DataError,
    ImageRecord,
    LoadReport,
    add_caption,
    finish_corpus,
    read_json,
    read_text,
)

__all__ = ["CaptionCorpus", "DataError", "ImageRecord", "LoadReport", "load_corpus"]


FORMATS = ("auto", "coco", "karpathy", "flickr8k")
_FLICKR_CAPTION_FILES = ("captions.txt", "Flickr8k.token.txt")
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Folder names the Flickr8k images come in: this repository's data, the Kaggle copy, the original zip.
_FLICKR_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset")
_COCO_NAME = re.compile(r"captions_(train|val|test)(\d{4})$")


def load_corpus(
    path: str | Path,
    *,
    format: str = "auto",
    images_dir: str | Path | None = None,
    split: str | None = None,
    verify_images: bool = False,
) -> CaptionCorpus:
    """Read a caption data set from ``path``, detecting its format unless ``format`` names one.

    ``path`` may be a COCO captions JSON, a Karpathy split JSON, a Flickr8k folder (``captions.txt``
    or ``Flickr8k.token.txt`` plus the split files, at the top or in ``splits/``) or its caption
    file, or a COCO folder (``annotations/captions_*.json`` beside the image folders).
    ``images_dir`` overrides where the images are looked for; ``split`` overrides the split label of
    a COCO file (otherwise taken from its name: ``captions_val2014.json`` -> ``"val"``).
    ``verify_images`` decodes every image (JPEGs at 1/8 size), which catches truncated files but is
    slow: a few seconds for Flickr8k's 8,091 images, against 0.2 s without.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    data = None
    if format == "auto":
        format = _detect_format(path)
        if format == "json":
            data = read_json(path)  # parsed once: a Karpathy COCO file is ~150 MB
            format = _detect_json_format(path, data)
    if split is not None and format != "coco":
        raise ValueError(f"split= only applies to COCO files; {format} data records its own splits")
    if format == "coco" and path.is_dir():
        return _load_coco_folder(path, images_dir=images_dir, split=split, verify_images=verify_images)
    if format == "coco":
        data = read_json(path) if data is None else data
        return _build_coco(path, data, images_dir=images_dir, split=split, verify_images=verify_images)
    if format == "karpathy":
        data = read_json(path) if data is None else data
        return _build_karpathy(path, data, images_dir=images_dir, verify_images=verify_images)
    return load_flickr8k(path, images_dir=images_dir, verify_images=verify_images)


def load_coco(
    json_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    split: str | None = None,
    verify_images: bool = False,
) -> CaptionCorpus:
    """Read an official COCO captions file; images default to ``../train2017`` for ``captions_train2017``."""
    json_path = Path(json_path)
    return _build_coco(json_path, read_json(json_path), images_dir=images_dir, split=split, verify_images=verify_images)


def _build_coco(
    json_path: Path, data: Any, *, images_dir: str | Path | None, split: str | None, verify_images: bool
) -> CaptionCorpus:
    images, annotations = _coco_lists(json_path, data)
    match = _COCO_NAME.search(json_path.stem)
    if split is None:
        split = match[1] if match else "unsplit"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if images_dir is None:
        images_dir = _default_coco_images_dir(json_path, f"{match[1]}{match[2]}" if match else None)

    report = LoadReport()
    entries: dict[str, tuple[Path, list[str]]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            report.add("malformed", f"images[{i}] lacks 'id' or 'file_name'")
            continue
        image_id = str(image["id"])
        if image_id in entries:
            report.add("duplicate", f"image id {image_id} listed twice")
            continue
        entries[image_id] = (Path(images_dir) / image["file_name"], [])
    seen_ids: set[str] = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            report.add("malformed", f"annotations[{i}] lacks 'image_id' or a string 'caption'")
            continue
        if "id" in ann:
            if str(ann["id"]) in seen_ids:
                report.add("duplicate", f"annotation id {ann['id']} listed twice")
                continue
            seen_ids.add(str(ann["id"]))
        image_id = str(ann["image_id"])
        if image_id not in entries:
            report.add("unknown_image", f"annotation {ann.get('id', i)} -> image {image_id}")
            continue
        add_caption(entries[image_id][1], ann["caption"], report, f"annotation {ann.get('id', i)}")
    candidates = [(image_id, p, caps, split) for image_id, (p, caps) in entries.items()]
    return finish_corpus(candidates, report, "coco", json_path, Path(images_dir), verify_images)


def _build_karpathy(json_path: Path, data: Any, *, images_dir: str | Path | None, verify_images: bool) -> CaptionCorpus:
    images = _karpathy_list(json_path, data)
    images_dir = Path(images_dir) if images_dir is not None else json_path.parent

    report = LoadReport()
    candidates = []
    seen: set[str] = set()
    for i, image in enumerate(images):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("filename"), str)
            or not isinstance(image.get("sentences"), list)
        ):
            report.add("malformed", f"images[{i}] lacks 'filename' or a 'sentences' list")
            continue
        split = image.get("split", "unsplit")
        if split not in SPLITS:
            report.add("malformed", f"{image['filename']}: unknown split {split!r}")
            continue
        image_id = str(image["cocoid"]) if "cocoid" in image else image["filename"]
        if image_id in seen:
            report.add("duplicate", f"image {image_id} listed twice")
            continue
        seen.add(image_id)
        captions: list[str] = []
        for j, sentence in enumerate(image["sentences"]):
            where = f"{image['filename']} sentences[{j}]"
            if not isinstance(sentence, dict):
                report.add("malformed", f"{where} is not an object")
                continue
            raw = sentence.get("raw")
            if not isinstance(raw, str) or not raw.strip():
                # Some derived files keep only the tokens; their join is the caption the tokens came from.
                tokens = sentence.get("tokens")
                raw = " ".join(map(str, tokens)) if isinstance(tokens, list) else ""
            add_caption(captions, raw, report, where)
        path = images_dir / (image.get("filepath") or "") / image["filename"]
        candidates.append((image_id, path, captions, split))
    return finish_corpus(candidates, report, "karpathy", json_path, images_dir, verify_images)


def load_flickr8k(
    root: str | Path, *, images_dir: str | Path | None = None, verify_images: bool = False
) -> CaptionCorpus:
    """Read Flickr8k as distributed: a caption file plus the official split files; ``dev`` becomes ``val``.

    ``root`` is the data set folder or its caption file. Captioned images named in no split file are
    kept with split ``"unsplit"`` (91 in the official release).
    """
    root = Path(root)
    caption_file: Path | None
    if root.is_file():
        root, caption_file = root.parent, root
    else:
        caption_file = next((root / n for n in _FLICKR_CAPTION_FILES if (root / n).is_file()), None)
    if caption_file is None:
        raise DataError(f"{root}: no Flickr8k caption file ({' or '.join(_FLICKR_CAPTION_FILES)})")
    if images_dir is None:
        images_dir = next((root / n for n in _FLICKR_IMAGE_DIRS if (root / n).is_dir()), root)
    images_dir = Path(images_dir)

    report = LoadReport()
    lines = read_text(caption_file).split("\n")
    if caption_file.name.endswith(".token.txt"):
        captions = _parse_flickr_tokens(lines, caption_file, report)
    else:
        captions = _parse_flickr_csv(lines, caption_file, report)

    splits: dict[str, str] = {}
    for split, name in _FLICKR_SPLIT_FILES.items():
        split_file = next((d / name for d in (root, root / "splits") if (d / name).is_file()), None)
        if split_file is None:
            raise DataError(f"{root}: split file {name} not found (looked in {root} and {root / 'splits'})")
        for line in read_text(split_file).split("\n"):
            filename = line.strip()
            if not filename:
                continue
            if filename in splits:
                report.add("duplicate", f"{filename} listed in {splits[filename]} and again in {split}")
            elif filename not in captions:
                report.add("split_unknown", f"{filename} ({split_file.name})")
            else:
                splits[filename] = split
    candidates = [(name, images_dir / name, caps, splits.get(name, "unsplit")) for name, caps in captions.items()]
    return finish_corpus(candidates, report, "flickr8k", caption_file, images_dir, verify_images)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / n).is_file() for n in _FLICKR_CAPTION_FILES):
            return "flickr8k"
        if any((path / "annotations").glob("captions_*.json")):
            return "coco"
        raise DataError(
            f"{path}: not a known data set folder; expected a Flickr8k folder "
            f"({' or '.join(_FLICKR_CAPTION_FILES)} + split files) "
            "or a COCO folder (annotations/captions_*.json)"
        )
    if path.suffix.lower() in (".txt", ".csv"):
        return "flickr8k"
    if path.suffix.lower() != ".json":
        raise DataError(f"{path}: unknown file type; expected a COCO or Karpathy .json or a Flickr8k .txt")
    return "json"


def _detect_json_format(path: Path, data: Any) -> str:
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and any(isinstance(im, dict) and "sentences" in im for im in images[:10]):
        return "karpathy"
    raise DataError(
        f"{path}: neither a COCO captions file ('images' and 'annotations') "
        "nor a Karpathy split file ('images' with 'sentences')"
    )


def _load_coco_folder(
    root: Path, *, images_dir: str | Path | None, split: str | None, verify_images: bool
) -> CaptionCorpus:
    json_paths = sorted((root / "annotations").glob("captions_*.json"))
    if not json_paths:
        raise DataError(f"{root}: no annotations/captions_*.json")
    if split is not None and len(json_paths) > 1:
        raise ValueError(f"{root}: split= is ambiguous with {len(json_paths)} caption files; load one file")
    corpora = [load_coco(p, images_dir=images_dir, split=split, verify_images=verify_images) for p in json_paths]
    report = LoadReport()
    for corpus in corpora:
        report.merge(corpus.problems)
    return CaptionCorpus([r for c in corpora for r in c.records], report, "coco")


def _default_coco_images_dir(json_path: Path, folder: str | None) -> Path:
    if folder is None:
        return json_path.parent
    # Official layout: annotations/ beside train2017/; some copies put the images under images/.
    root = json_path.parent.parent
    candidates = [root / folder, json_path.parent / folder, root / "images" / folder]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _coco_lists(path: Path, data: Any) -> tuple[list[Any], list[Any]]:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: expected a COCO captions file with 'images' and 'annotations'")
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise DataError(f"{path}: 'images' and 'annotations' must be lists in a COCO captions file")
    return data["images"], data["annotations"]


def _karpathy_list(path: Path, data: Any) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a Karpathy split file with an 'images' list")
    return data["images"]


def _parse_flickr_csv(lines: list[str], path: Path, report: LoadReport) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    header_seen = False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not header_seen:
            header_seen = True
            if line.strip().lower().replace(" ", "") == "image,caption":
                continue
        # Captions contain commas, so only the first comma separates the file name.
        name, sep, caption = line.partition(",")
        name = name.strip()
        if not sep or not name:
            report.add("malformed", f"{path.name}:{lineno}: {line[:60]!r}")
            continue
        if caption.startswith('"'):
            # A CSV-quoted caption ("a ""b"" c"): undo the quoting, or keep the text if it is not valid CSV.
            fields = next(csv.reader([caption]))
            caption = fields[0] if len(fields) == 1 else caption
        add_caption(captions.setdefault(name, []), caption, report, f"{path.name}:{lineno}")
    return captions


def _parse_flickr_tokens(lines: list[str], path: Path, report: LoadReport) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    seen: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        key = key.strip()
        if not sep or not key:
            report.add("malformed", f"{path.name}:{lineno}: {line[:60]!r}")
            continue
        if key in seen:
            report.add("duplicate", f"{path.name}:{lineno}: {key} listed twice")
            continue
        seen.add(key)
        name = key.rpartition("#")[0] or key
        add_caption(captions.setdefault(name, []), caption, report, f"{path.name}:{lineno}")
    return captions
