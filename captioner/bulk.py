"""Caption a collection: files, folders, globs and manifests in; one record per image out, streamed.

``captioner caption`` runs on this module. The pieces, each with one job:

- :func:`expand_inputs`: files, folders (recursive, image extensions, sorted, symbolic links
  followed without looping), glob patterns (links followed without looping too) and manifests
  (``--from-list``: one path per line, or a CSV / JSONL column; relative to the manifest's folder)
  -> one ordered list of paths, duplicates dropped.
- :class:`RecordFile`: the output file (``.jsonl`` or ``.csv``). Opening it reads which images it
  already holds, so a run again with the same output skips them; a record cut off by a kill in the
  middle of writing is cut away first, so there are never duplicates or half records. Each batch's
  records are written in one piece, flushed and fsynced together: Ctrl-C (``KeyboardInterrupt``) lands
  before or after a batch, never inside one.
- :func:`caption_stream`: decoding and cropping on a pool of threads (JPEG draft mode: a photo is
  decoded at the smallest DCT scale that still covers the model's resize), overlapping the model's
  batches; memory is bounded by the batches in flight, whatever the number of photos.
- Under ``torchrun`` each rank captions every ``WORLD_SIZE``-th image into its own part file
  (:func:`part_path`); rank 0 merges the parts when all ranks are done and sees them (one machine,
  or a shared file system), and ``captioner merge OUTPUT`` does it by hand otherwise.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import numpy as np

from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.pipeline import CaptionPipeline
from captioner.results import CaptionResult
from captioner.transforms import IMAGE_EXTENSIONS, ImageError, Preprocess, load_crop, normalize_crops

OUTPUT_FORMATS = (".jsonl", ".csv")
# New columns go at the end: the columns of every earlier version are then a prefix (see KNOWN_CSV_HEADERS).
CSV_FIELDS = (
    "image", "caption", "log_prob", "score", "captions", "error", "model", "options",
    "confidence", "tags", "abstained",
)  # fmt: skip
_GLOB_CHARS = frozenset("*?[")


class InputError(CaptionerError, ValueError):
    """A manifest or an output file that cannot be used; the message is one line."""


# -- inputs -----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    paths: list[str]  # images to caption, in order, each once
    missing: list[str] = field(default_factory=list)  # arguments that named nothing (recorded as errors)


def expand_inputs(items: Sequence[str], *, from_list: str | None = None, column: str | None = None) -> Inputs:
    """Files, folders, glob patterns and a manifest -> the images to caption, in order, duplicates dropped.

    A folder gives the files below it (recursively, symbolic links followed, each real folder once)
    whose extension is an image's, sorted. A pattern (``photos/**/*.jpg``) gives its matches, sorted;
    a file named directly is taken whatever its extension. Each file comes once, under the first name
    it was found by. What names nothing is reported in ``missing``, not raised: the run records an
    error for it and goes on.

    A relative path (or pattern, or folder) in the manifest ``from_list`` is relative to the manifest's
    folder, and is named by that folder joined with it (``lists/m.txt``'s ``photo.jpg`` is
    ``lists/photo.jpg``; a manifest in the working folder gives its lines as they are). ``~`` in a
    manifest is not expanded: no shell reads the file.
    """
    named = [("", item) for item in items]  # (the folder a relative item is relative to, the item)
    if from_list:
        folder = _manifest_folder(from_list)
        named += [(folder, line) for line in read_manifest(from_list, column)]
    paths: list[str] = []
    missing: list[str] = []
    for folder, item in named:
        path = os.path.join(folder, item)  # an absolute item stays as it is
        if os.path.isdir(path):
            paths += _walk_images(path)
        elif os.path.exists(path):
            paths.append(path)
        elif _GLOB_CHARS & set(item):
            matches = _glob(item, folder)
            if not matches:
                missing.append(path)
            for match in matches:
                paths += _walk_images(match) if os.path.isdir(match) else [match]
        else:
            missing.append(path)
    return Inputs(_each_file_once(paths), list(dict.fromkeys(missing)))


def _each_file_once(paths: list[str]) -> list[str]:
    """Drop later names of a file already listed (a link to it, or a ``**`` pattern's way round a link loop)."""
    seen: set[str] = set()
    out = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def _walk_images(folder: str) -> list[str]:
    found: list[str] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of each folder entered: a link loop ends here
    for root, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        found += [os.path.join(root, name) for name in files if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _glob(pattern: str, folder: str = "") -> list[str]:
    """``glob.glob(pattern, recursive=True)``, sorted, but no real folder is entered twice for one part of
    the pattern. A relative ``pattern`` is matched inside ``folder``, whose name is not a pattern.

    ``glob`` follows folder links under ``**`` with no memory of where it has been: two links to ``.``
    make it walk 2**40 names before the kernel's limit on links in a path stops it. Here the pattern's
    parts are matched one at a time, from the last folder it names literally, and a folder reached
    again (through a link) at a part already matched in it is skipped: below it the rest of the pattern
    could only match the same files under other names, which :func:`_each_file_once` drops anyway.
    Otherwise as glob: ``**`` as a whole part is any number of folders, none included; ``*``, ``?``
    and ``[...]`` match within one part, and match a leading dot only in a part that starts with one
    (``**`` enters no hidden folder); a trailing separator matches folders only.
    """
    drive, rest = os.path.splitdrive(pattern)
    if os.altsep:
        rest = rest.replace(os.altsep, os.sep)
    parts = rest.split(os.sep)
    first = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = drive + (os.sep.join(parts[:first]) or (os.sep if first else ""))  # "/*.jpg" starts at "/"
    if not os.path.isabs(pattern):
        base = os.path.join(folder, base)
    wanted = [part for part in parts[first:] if part]  # "a//b" is "a/b"
    dirs_only = len(parts) > first and parts[-1] == ""
    found: list[str] = []
    entered: set[tuple[int, int, int]] = set()  # (part, device, inode): a link loop ends here
    stack = [(base, 0)]  # a folder and the index of the part to match in it; at len(wanted), a match
    while stack:
        path, index = stack.pop()
        if index == len(wanted):
            found.append(path)
            continue
        try:
            stat = os.stat(path or os.curdir)
        except OSError:  # gone, a broken link, not allowed: glob skips it too
            continue
        if not S_ISDIR(stat.st_mode) or (index, stat.st_dev, stat.st_ino) in entered:
            continue
        entered.add((index, stat.st_dev, stat.st_ino))
        part, last = wanted[index], index + 1 == len(wanted)
        below = []
        if part == "**":
            below.append((path, index + 1))  # no folder at all
            for name, is_dir in _list_folder(path):
                if not name.startswith(".") and (is_dir or (last and not dirs_only)):
                    below.append((os.path.join(path, name), index if is_dir else index + 1))
        elif _GLOB_CHARS & set(part):
            for name, is_dir in _list_folder(path):
                hidden = name.startswith(".") and not part.startswith(".")
                if not hidden and (is_dir or (last and not dirs_only)) and fnmatch.fnmatch(name, part):
                    below.append((os.path.join(path, name), index + 1))
        else:
            child = os.path.join(path, part)
            if os.path.isdir(child) or (last and not dirs_only and os.path.lexists(child)):
                below.append((child, index + 1))
        stack += reversed(below)  # depth first, in name order: the first name of a folder is the one kept
    return sorted({path for path in found if path})  # glob leaves out "" (the working folder, from "**")


def _list_folder(path: str) -> list[tuple[str, bool]]:
    """The names in folder ``path`` ("" is the working folder), sorted, each with whether it is a folder."""
    try:
        with os.scandir(path or os.curdir) as entries:
            return sorted((entry.name, _is_folder(entry)) for entry in entries)
    except OSError:  # gone or not allowed: nothing in it matches, as for glob
        return []


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder is one
    except OSError:
        return False


def read_manifest(path: str, column: str | None = None) -> list[str]:
    """Paths from a manifest: ``.csv`` (a column: ``column``, else ``path``/``image``/``file``, else the
    first), ``.jsonl`` (a key, chosen the same way), anything else one path per line (``#`` comments).

    The paths are as written, empty ones left out; :func:`expand_inputs` takes relative ones in the
    manifest's folder."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the list {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file") from exc
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        name = _pick_column(reader.fieldnames or [], column, path)
        return [row[name] for row in reader if row.get(name)]
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: not a JSON object")
            name = _pick_column(list(record), column, f"{path}:{number}")
            if record[name] not in (None, ""):  # left out like an empty CSV cell ("" would name the folder)
                out.append(str(record[name]))
        return out
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pick_column(names: Sequence[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{where}: no column {wanted!r} (columns: {', '.join(names) or 'none'})")
        return wanted
    for name in ("path", "image", "file", "filename"):
        if name in names:
            return name
    if not names:
        raise InputError(f"{where}: no columns")
    return names[0]


def _manifest_folder(path: str) -> str:
    """The folder a manifest's relative paths are in, as its path names it ("" for the working folder)."""
    folder = os.path.dirname(path)
    return "" if folder == os.curdir else folder


# -- output -----------------------------------------------------------------------------------------


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"--output {path}: the format comes from the extension: .jsonl or .csv")
    return suffix


def part_path(output: str | os.PathLike, rank: int, world_size: int) -> Path:
    """``out.jsonl`` -> ``out.part-00001-of-00004.jsonl``: rank 1's share of a 4-process run."""
    output = Path(output)
    return output.with_name(f"{output.stem}.part-{rank:05d}-of-{world_size:05d}{output.suffix}")


@dataclass(frozen=True)
class RunSignature:
    """What made a record: the model (its id) and the decoding options it was captioned with. Every record a run
    writes carries them, so a run again with the same output trusts only records made the same way."""

    model: str
    options: dict[str, Any]


# The fields a record of this command has; anything else in a file means it is not this command's.
RECORD_KEYS = frozenset({"image", "captions", "tags", "abstained", "error", "model", "options"})
# Files written before records carried their model and options: still this command's, read and appended as such.
LEGACY_CSV_FIELDS = CSV_FIELDS[:6]
# The header of every version, newest first. A file with an older one gets the new columns when it is opened (its
# rows keep their values; the new cells stay empty): without an ``abstained`` column an abstention would be a row
# with neither a caption nor an error, which no later run could read.
KNOWN_CSV_HEADERS = (CSV_FIELDS, CSV_FIELDS[:8], LEGACY_CSV_FIELDS)
# Decoding options added after records carried their options, each at the value every record written before it
# was made with: such a record was made as a run with that value makes it, so the run resumes the file.
_LATER_OPTIONS = {name: getattr(DecodingOptions(), name) for name in ("min_confidence",)}
_JSONL_RECORD_START = b'{"image": '  # how every record this command writes begins (json.dumps, image first)


@dataclass
class _Record:
    line: int
    image: str
    error: bool
    signature: RunSignature | None  # None: a record from before records carried one


class RecordFile:
    """An output file of one record per image, opened for appending after what it already holds.

    Nothing is written to a file before all of it has been read and found to be this command's records: a file
    that is not (another program's notes, a CSV with other columns, records of another model or other options)
    is refused with a one-line :class:`InputError` and left byte for byte as it was. Only then is a record cut
    off by a kill dropped, and, with ``retry_errors``, the error records taken out so that their images are
    captioned again; a CSV file of an earlier version gets this version's columns (both rewrite the file to a
    temporary file renamed over it).

    A record is an image's ``captions`` (each with its ``confidence``, None without a confidence model), its
    ``tags`` and whether it ``abstained`` (no caption reached ``min_confidence``: ``captions`` is empty, and the
    record is not an error), or its ``error``. Records written before tags and confidence lack those fields.
    """

    def __init__(self, path: str | os.PathLike, run: RunSignature | None = None, *, retry_errors: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.run = run
        self.done: set[str] = set()  # images the file holds a record of: a run again skips them
        self.errors: set[str] = set()  # of those, the images whose record is an error
        self.retried = 0  # error records taken out to be captioned again (retry_errors)
        self.legacy = 0  # records without a model and options (written before records carried them)
        self.upgraded = False  # a CSV file of an earlier version given this version's columns (KNOWN_CSV_HEADERS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self._open_existing(retry_errors) if self.path.exists() else 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close())
        if self.format == ".csv" and existing == 0:
            csv.DictWriter(self._file, fieldnames=CSV_FIELDS, lineterminator="\n").writeheader()

    def _open_existing(self, retry_errors: bool) -> int:
        """Read and check the whole file, then repair it as planned; returns the bytes it holds afterwards."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # a record ends with its newline; anything after was cut off, or is not ours
        complete, tail = data[:end], data[end:]
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._foreign("not UTF-8 text") from exc
        records = self._parse(text)
        tail_record = self._parse_tail(text, tail)
        if tail_record is not None:
            records.append(tail_record)
        self._check_signatures(records)
        # Checked: the file is this command's. Repairs from here on.
        if tail and tail_record is None:  # a record cut off by a kill in the middle of writing it
            with open(self.path, "r+b") as f:
                f.truncate(end)
        elif tail:  # a whole record that only lacks its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")
        errors = {r.image for r in records if r.error}
        if (retry_errors and errors) or self.upgraded:
            retried = errors if retry_errors else set()
            self._rewrite_without(retried)
            records = [r for r in records if r.image not in retried]
            self.retried = len(retried)
            errors -= retried
        self.done = {r.image for r in records}
        self.errors = errors
        self.legacy = sum(r.signature is None for r in records)
        return self.path.stat().st_size

    def _foreign(self, why: str) -> InputError:
        return InputError(
            f"{self.path}: not an output file of this command ({why}); it was left as it was: use another --output"
        )

    def _parse(self, text: str) -> list[_Record]:
        if self.format == ".jsonl":
            return [self._jsonl_record(line, number) for number, line in enumerate(text.splitlines(), 1)]
        if not text:
            return []
        reader = csv.DictReader(io.StringIO(text))
        header = tuple(reader.fieldnames or ())
        if header not in KNOWN_CSV_HEADERS:
            raise self._foreign(f"its columns are {', '.join(header) or 'none'}, not {', '.join(CSV_FIELDS)}")
        self.upgraded = header != CSV_FIELDS
        return [self._csv_record(row, number) for number, row in enumerate(reader, 2)]

    def _parse_tail(self, text: str, tail: bytes) -> _Record | None:
        """The bytes after the last newline: a whole record (returned), a cut-off one of ours (None), or foreign."""
        if not tail:
            return None
        number = text.count("\n") + 1
        try:
            if self.format == ".jsonl":
                return self._jsonl_record(tail.decode("utf-8"), number)
            if text:  # below a header of ours: a row, whole or cut off
                rows = list(csv.DictReader(io.StringIO(text + tail.decode("utf-8"))))
                return self._csv_record(rows[-1], number) if len(rows) == text.count("\n") else None
        except (InputError, UnicodeDecodeError, IndexError):
            pass
        if self.format == ".jsonl" and tail.startswith(_JSONL_RECORD_START) or self.format == ".csv" and text:
            return None
        raise self._foreign(f"line {number} is not a record of it")

    def _jsonl_record(self, line: str, number: int) -> _Record:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise self._foreign(f"line {number} is not JSON") from exc
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            raise self._foreign(f"line {number} has no image")
        if set(record) - RECORD_KEYS:
            raise self._foreign(f"line {number} has fields {', '.join(sorted(set(record) - RECORD_KEYS))}")
        captions, error = record.get("captions"), record.get("error")
        if (captions is None) == (error is None) or error is not None and not isinstance(error, str):
            raise self._foreign(f"line {number} has neither captions nor an error")
        if captions is not None and not (
            isinstance(captions, list)
            and (captions or record.get("abstained") is True)
            and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in captions)
        ):
            raise self._foreign(f"line {number}'s captions are not this command's")
        return _Record(
            number, record["image"], error is not None, _signature(record.get("model"), record.get("options"))
        )

    def _csv_record(self, row: dict[str, Any], number: int) -> _Record:
        if not row.get("image") or None in row or any(v is None for v in row.values()):
            raise self._foreign(f"line {number} is not a row of it")
        if not row["error"] and not row["caption"] and row.get("abstained") != "true":
            raise self._foreign(f"line {number} has neither a caption nor an error")
        options = row.get("options")
        try:
            parsed = json.loads(options) if options else None
        except json.JSONDecodeError as exc:
            raise self._foreign(f"line {number}'s options are not JSON") from exc
        return _Record(number, row["image"], bool(row["error"]), _signature(row.get("model") or None, parsed))

    def _check_signatures(self, records: list[_Record]) -> None:
        if self.run is None:
            return
        other = [r for r in records if r.signature is not None and not _same_run(r.signature, self.run)]
        if other:
            first = other[0].signature
            assert first is not None
            raise InputError(
                f"{self.path}: {len(other)} records were made otherwise (line {other[0].line}: model {first.model}, "
                f"{_words(first.options)}; this run: model {self.run.model}, {_words(self.run.options)}); "
                "use another --output, or the same model and options"
            )

    def _rewrite_without(self, images: set[str]) -> None:
        """The file less the records of ``images``, in this version's columns, written beside it and renamed over it
        (atomic)."""
        kept = [r for r in read_records(self.path) if r["image"] not in images]
        tmp = self.path.with_name(f".{self.path.name}.retry")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if self.format == ".jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
            else:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
                writer.writeheader()
                writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` (each with this run's model and options) and make them durable before returning.

        The records are rendered first and written with one call, which a ``KeyboardInterrupt`` cannot split
        (it is raised between Python operations): they are all in the file buffer, or none is.
        """
        signed = [self._signed(record) for record in records]
        text = io.StringIO()
        if self.format == ".jsonl":
            text.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in signed)
        else:
            writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writerows(map(_csv_row, signed))
        self._file.write(text.getvalue())
        self.done.update(record["image"] for record in signed)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _signed(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.run is None:
            return record
        return {**record, "model": self.run.model, "options": self.run.options}

    def close(self) -> None:
        self._file.close()


def _signature(model: Any, options: Any) -> RunSignature | None:
    if model is None and options is None:
        return None
    return RunSignature(str(model), options if isinstance(options, dict) else {})


def _same_run(made: RunSignature, run: RunSignature) -> bool:
    """Whether a record made as ``made`` says was made as ``run`` makes it: the same model and options, an option
    added since (:data:`_LATER_OPTIONS`) missing on either side taken at the value it was made with."""
    return made.model == run.model and {**_LATER_OPTIONS, **made.options} == {**_LATER_OPTIONS, **run.options}


def _words(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "no options"


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as a CSV row: the best caption's text and numbers, every caption's text when there are several,
    tags as ``name:confidence`` joined by ``;`` (tag names hold neither), ``abstained`` as true/false (empty for
    an error); an empty cell where the record has no value (no confidence model, an error)."""
    captions = record.get("captions") or []
    best = captions[0] if captions else {}
    confidence = best.get("confidence")
    return {
        "image": record["image"],
        "caption": best.get("text", ""),
        "log_prob": best.get("log_prob", ""),
        "score": best.get("score", ""),
        "captions": " | ".join(c["text"] for c in captions) if len(captions) > 1 else "",
        "error": record.get("error") or "",
        "model": record.get("model", ""),
        "options": json.dumps(record["options"], sort_keys=True) if "options" in record else "",
        "confidence": "" if confidence is None else confidence,
        "tags": ";".join(f"{t['name']}:{t['confidence']}" for t in record.get("tags") or []),
        "abstained": "" if "abstained" not in record else str(record["abstained"]).lower(),
    }


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of an output file, in file order (a cut-off last record is left out)."""
    fmt = output_format(path)
    data = Path(path).read_bytes()
    text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    if fmt == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def merge_parts(output: str | os.PathLike, *, world_size: int | None = None) -> tuple[Path, int]:
    """Merge ``output``'s part files into ``output`` (written to a temporary file, then renamed).

    Part ``r`` of ``W`` holds the images ``r, r + W, r + 2W, ...`` of the run's list in order, so
    taking one record from each part in turn restores the list's order. Returns (output, records).
    """
    output = Path(output)
    fmt = output_format(output)
    parts = sorted(output.parent.glob(f"{output.stem}.part-*-of-*{output.suffix}"))
    sizes = {p.name.rsplit("-of-", 1)[1].removesuffix(output.suffix) for p in parts}
    if not parts:
        raise InputError(f"no part files {output.stem}.part-*-of-*{output.suffix} beside {output}")
    if len(sizes) != 1:
        raise InputError(f"part files of different runs beside {output} (world sizes {', '.join(sorted(sizes))})")
    expected = int(sizes.pop())
    if world_size is not None and expected != world_size:
        raise InputError(f"the part files are of a {expected}-process run, not {world_size}")
    if len(parts) != expected:
        raise InputError(f"{len(parts)} of {expected} part files beside {output}; run the missing ranks first")
    shares = [read_records(p) for p in parts]
    merged: list[dict[str, Any]] = []
    for i in range(max(len(s) for s in shares)):
        merged += [s[i] for s in shares if i < len(s)]
    tmp = output.with_name(f".{output.name}.merging")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if fmt == ".jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
        else:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in merged)
    os.replace(tmp, output)
    return output, len(merged)


# -- the pipeline -----------------------------------------------------------------------------------


def _read_crop(path: str, preprocess: Preprocess, max_pixels: int | None) -> tuple[np.ndarray | None, str]:
    """The encoder's crop of ``path`` as uint8 ``(S, S, 3)``, or None and why it could not be read."""
    try:
        return np.asarray(load_crop(path, preprocess, max_pixels=max_pixels), dtype=np.uint8), ""
    except ImageError as exc:
        return None, str(exc)
    except OSError as exc:  # unreadable for the operating system (permissions, I/O error)
        return None, f"cannot read: {exc.strerror or exc}"


@dataclass
class Batch:
    paths: list[str]
    crops: list[np.ndarray | None]  # None where the image could not be read
    errors: list[str]


def decoded_batches(
    paths: Sequence[str],
    preprocess: Preprocess,
    *,
    batch_size: int,
    workers: int,
    max_pixels: int | None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Batches of crops, decoded by ``workers`` threads while the caller runs the model on earlier ones.

    Threads, not processes: PIL releases the GIL while it decodes and resizes, so threads decode in
    parallel with each other and with the model, and they share this process's memory. A worker
    process would load torch again (about 500 MB each with PyTorch's CUDA build) for work that needs
    none. At most ``prefetch`` batches wait decoded, so memory does not grow with the number of photos.
    """
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers == 0:
        for chunk in chunks:
            read = [_read_crop(p, preprocess, max_pixels) for p in chunk]
            yield Batch(chunk, [c for c, _ in read], [e for _, e in read])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captioner-decode") as pool:
        pending: deque[tuple[list[str], list[Future[tuple[np.ndarray | None, str]]]]] = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_read_crop, p, preprocess, max_pixels) for p in chunk]))
            if len(pending) > prefetch:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk: list[str], futures: list[Future[tuple[np.ndarray | None, str]]]) -> Batch:
    read = [f.result() for f in futures]
    return Batch(chunk, [c for c, _ in read], [e for _, e in read])


def caption_records(model: CaptionPipeline, batch: Batch, options: DecodingOptions) -> list[dict[str, Any]]:
    """One record per image of ``batch``: its captions, tags and whether it abstained, or its error."""
    readable = {i: crop for i, crop in enumerate(batch.crops) if crop is not None}
    results: dict[int, CaptionResult] = {}
    if readable:
        pixels = normalize_crops(np.stack(list(readable.values())), model.preprocess_config)
        results = dict(zip(readable, model.caption_pixels(pixels, options), strict=True))
    return [
        _record(path, results[i]) if i in results else {"image": path, "error": batch.errors[i]}
        for i, path in enumerate(batch.paths)
    ]


def _record(image: str, result: CaptionResult) -> dict[str, Any]:
    """An image's record: its captions (an abstention has none), tags and whether it abstained, as JSON gives
    them; numbers rounded to 4 places, which no caller needs more of and keeps files half as long."""
    captions = [
        {
            "text": c.text,
            "log_prob": round(c.log_prob, 4),
            "score": round(c.score, 4),
            "confidence": None if c.confidence is None else round(c.confidence, 4),
        }
        for c in result.captions
    ]
    tags = [tag.to_dict(digits=4) for tag in result.tags]
    return {"image": image, "captions": captions, "tags": tags, "abstained": result.abstained}


def caption_stream(
    model: CaptionPipeline,
    paths: Sequence[str],
    options: DecodingOptions,
    *,
    batch_size: int = 32,
    workers: int = 2,
    max_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Caption ``paths`` batch by batch; yields each batch's records (``image`` + ``captions`` or ``error``)."""
    from captioner.transforms import DEFAULT_MAX_PIXELS

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    for batch in decoded_batches(
        paths, model.preprocess_config, batch_size=batch_size, workers=workers, max_pixels=limit
    ):
        records = caption_records(model, batch, options)
        if progress is not None:
            progress(len(records), sum("error" in r for r in records))
        yield records


def default_workers() -> int:
    """Decoding threads: as many as CPUs, up to 4 (a photo decodes in a few ms; the model is the slow part)."""
    return max(1, min(4, os.cpu_count() or 2))
