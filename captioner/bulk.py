"""Caption a collection: files, folders, globs and manifests in; one record per image out, streamed.

``captioner caption`` runs on this module. The pieces, each with one job:

- :func:`expand_inputs`: files, folders (recursive, image extensions, sorted, symbolic links
  followed without looping), glob patterns and manifests (``--from-list``: one path per line, or a
  CSV / JSONL column) -> one ordered list of paths, duplicates dropped.
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
import glob
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner.transforms import IMAGE_EXTENSIONS, ImageError, Preprocess, load_crop, normalize_crops

OUTPUT_FORMATS = (".jsonl", ".csv")
CSV_FIELDS = ("image", "caption", "log_prob", "score", "captions", "error")
_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
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
    """
    listed = read_manifest(from_list, column) if from_list else []
    paths: list[str] = []
    missing: list[str] = []
    for item in [*items, *listed]:
        if os.path.isdir(item):
            paths += _walk_images(item)
        elif os.path.exists(item):
            paths.append(item)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append(item)
            for match in matches:
                paths += _walk_images(match) if os.path.isdir(match) else [match]
        else:
            missing.append(item)
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


def read_manifest(path: str, column: str | None = None) -> list[str]:
    """Paths from a manifest: ``.csv`` (a column: ``column``, else ``path``/``image``/``file``, else the
    first), ``.jsonl`` (a key, chosen the same way), anything else one path per line (``#`` comments)."""
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


class RecordFile:
    """An output file of one record per image, opened for appending after what it already holds."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.done: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self._recover() if self.path.exists() else 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close())
        if self.format == ".csv" and existing == 0:
            csv.DictWriter(self._file, fieldnames=CSV_FIELDS, lineterminator="\n").writeheader()

    def _recover(self) -> int:
        """Read the images already recorded; cut a trailing half-written record away. Returns the bytes kept."""
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a record ends with its newline; anything after was cut off
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        text = complete.decode("utf-8", errors="replace")
        if self.format == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    self.done.add(json.loads(line)["image"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise InputError(
                        f"{self.path}:{number}: not a record this command wrote; use another --output"
                    ) from exc
        elif text:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise InputError(f"{self.path}: not a CSV this command wrote (no 'image' column); use another --output")
            self.done.update(row["image"] for row in reader)
        return len(complete)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` and make them durable (flush + fsync) before returning.

        The records are rendered first and written with one call, which a ``KeyboardInterrupt`` cannot split
        (it is raised between Python operations): they are all in the file buffer, or none is.
        """
        records = list(records)
        text = io.StringIO()
        if self.format == ".jsonl":
            text.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        else:
            csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n").writerows(map(_csv_row, records))
        self._file.write(text.getvalue())
        self.done.update(record["image"] for record in records)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    captions = record.get("captions") or []
    best = captions[0] if captions else {}
    return {
        "image": record["image"],
        "caption": best.get("text", ""),
        "log_prob": best.get("log_prob", ""),
        "score": best.get("score", ""),
        "captions": " | ".join(c["text"] for c in captions) if len(captions) > 1 else "",
        "error": record.get("error") or "",
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
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_read_crop, p, preprocess, max_pixels) for p in chunk]))
            if len(pending) > prefetch:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(chunk: list[str], futures: list) -> Batch:
    read = [f.result() for f in futures]
    return Batch(chunk, [c for c, _ in read], [e for _, e in read])


def caption_records(model, batch: Batch, options) -> list[dict[str, Any]]:
    """One record per image of ``batch``: its captions, or its error."""
    readable = {i: crop for i, crop in enumerate(batch.crops) if crop is not None}
    results = {}
    if readable:
        pixels = normalize_crops(np.stack(list(readable.values())), model.preprocess_config)
        results = dict(zip(readable, model.caption_pixels(pixels, options), strict=True))
    records = []
    for i, path in enumerate(batch.paths):
        if i in results:
            captions = [
                {"text": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4)}
                for c in results[i].captions
            ]
            records.append({"image": path, "captions": captions})
        else:
            records.append({"image": path, "error": batch.errors[i]})
    return records


def caption_stream(
    model,
    paths: Sequence[str],
    options,
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


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under ``torchrun``; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} and WORLD_SIZE={world} do not make sense together")
    return rank, world


def default_workers() -> int:
    """Decoding threads: as many as CPUs, up to 4 (a photo decodes in a few ms; the model is the slow part)."""
    return max(1, min(4, os.cpu_count() or 2))
