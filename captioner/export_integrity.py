"""What an ONNX export's files must pass before ONNX Runtime loads them, and the threat model behind it.

The ``onnxruntime`` backend serves a ``.pt`` checkpoint through an export it made on first use and keeps in
a cache (:func:`captioner.export_cache.ensure_exported`). That cache is a folder on disk, and folders are
shared: a group-writable home, a volume several containers or users mount, a copy restored from elsewhere.

Threat model. Protected against: anyone who can write to the cache folder (or hand this process a copy of
one) but is neither the user this process runs as nor root. They must not be able to change what the model
says or make it load a file from elsewhere. So an entry ``onnx/v<version>-<sha256 prefix>/`` is used only if

* **nothing descriptive is read from it**: the vocabulary, caption rules, model config, preprocessing and
  metadata come from the checkpoint itself (the source of truth), never from the entry's ``captioner.json``;
* **every file matches the manifest**: ``manifest.json`` lists the sha256 of ``captioner.json`` and of each
  graph, and the digests are computed over the very bytes then handed to ONNX Runtime (each file is read
  once, through one descriptor, so a file swapped after the check is not the one loaded);
* **the manifest is bound to the checkpoint**: the entry's name is derived from the checkpoint's sha256 and
  the export version, and its (digest-checked) ``captioner.json`` must record that same sha256, so a genuine
  entry of another checkpoint renamed into place is refused;
* **only this user or root could have written it**: the entry and every file in it must be owned by this
  process's user or by root, and writable by neither group nor others. Otherwise whoever can write the
  entry could rewrite the manifest along with the graph, and the digests would prove nothing. Root is
  accepted because root can change any file anyway (trusting it adds nobody), and a cache baked into an
  image at build time is written by root and may stay root-owned and read-only when the server runs as
  another user;
* **no symbolic links, no path out**: the entry is opened with ``O_NOFOLLOW`` and its files with
  ``O_NOFOLLOW`` relative to the entry's descriptor; a symlink in place of the entry or of any file in
  it, or any name an export does not write, refuses the entry. File names are the format's own
  (:data:`~captioner.onnx_export.GRAPH_FILES`); a ``captioner.json`` that names other graph paths is refused.

A refused entry is exported again (when the cache is writable) or the load fails with one line naming the
entry and the reason. Not protected against: anyone running as this user or as root (they can rewrite an
entry and its manifest consistently, or the checkpoint, or this code); the checkpoint itself, which is
trusted as given (a different checkpoint is a different model); the folders above the entries
(``$CAPTIONER_CACHE_DIR`` may be a link, as the user configured it; an entry reached through a swapped
parent still has to pass every check); and someone who can write the cache folder holding its lock file
forever or deleting entries (start-up then waits or exports again: denial of service, not poisoning).

An export folder passed directly (``captioner caption --checkpoint DIR --backend onnxruntime``) is the
user's explicit choice and there is no checkpoint to bind it to: its manifest is still checked, which
catches a truncated copy, a corrupted or edited graph and an edited ``captioner.json`` made without
updating the manifest, and its description (vocabulary, rules, config) is read from its ``captioner.json``.
Its owners, modes and links are not checked (a Kubernetes volume may present files through links, owned by
another user).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.errors import CheckpointError
from captioner.export_format import (
    DIGESTED_FILES,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    GRAPH_FILES,
    MANIFEST_FILE,
    METADATA_FILE,
    NOT_WRITABLE_BY_OTHERS,
)

EXPORT_FILES = frozenset({*DIGESTED_FILES, MANIFEST_FILE})  # all an export folder holds
# O_NONBLOCK: a FIFO in place of a file makes the open return (and the file check refuse it) instead of hang
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class UntrustedExport(CheckpointError):
    """An export folder that is absent or failed a check; the message is one line: the folder and the reason."""

    def __init__(self, folder: Path, reason: str, *, absent: bool = False) -> None:
        super().__init__(f"{folder}: {reason}")
        self.folder = folder
        self.reason = reason
        self.absent = absent  # nothing there yet (a first use), rather than something refused


@dataclass(frozen=True)
class VerifiedExport:
    """An export's files as read and checked; load the graphs from these bytes, not from the folder again."""

    folder: Path
    meta: dict[str, Any]  # captioner.json
    graphs: dict[str, bytes]  # part ("encoder", "decoder_init", "decoder_step") -> the graph file's bytes
    sha256: dict[str, str]  # file name -> its sha256, which the bytes above were checked against


def read_cache_entry(folder: Path, source_sha256: str) -> VerifiedExport:
    """The export cache's entry ``folder`` for the checkpoint with ``source_sha256``, if it passes every check
    in this module's docstring; otherwise :class:`UntrustedExport` (``absent`` when there is no entry)."""
    try:
        entry = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UntrustedExport(folder, "not exported yet", absent=True) from None
    except OSError as exc:
        raise UntrustedExport(folder, _unopenable(folder, exc)) from exc
    try:
        _check_writers(folder, os.fstat(entry), "the folder")
        try:
            names = os.listdir(entry)
        except OSError as exc:  # a folder without read permission: refused like any other failing entry
            raise UntrustedExport(folder, f"cannot list the folder ({exc.strerror})") from exc
        foreign = sorted(set(names) - EXPORT_FILES)
        if foreign:
            raise UntrustedExport(folder, f"holds {foreign[0]!r}, which no export writes")
        files = {}
        for name in names:
            try:
                fd = os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=entry)
            except OSError as exc:
                raise UntrustedExport(folder, _unopenable(folder / name, exc, name)) from exc
            files[name] = _read_regular_file(folder, name, fd, trusted_writers=True)
    finally:
        os.close(entry)
    return _verify(folder, files, source_sha256)


def read_export_folder(folder: Path) -> VerifiedExport:
    """An export folder the user passed directly, its manifest checked (no owners, modes or links: see above)."""
    files = {}
    for name in EXPORT_FILES:  # by the format's own names: nothing in the folder chooses a path
        try:
            fd = os.open(folder / name, _READ_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UntrustedExport(folder, f"cannot read {name} ({exc.strerror})") from exc
        files[name] = _read_regular_file(folder, name, fd, trusted_writers=False)
    return _verify(folder, files, None)


def _unopenable(path: Path, exc: OSError, name: str = "the folder") -> str:
    """Why ``path`` could not be opened, said as the refusal's reason."""
    if path.is_symlink():  # only to word the reason: the open itself refused to follow it
        return f"{name} is a symbolic link, which the export cache never follows"
    if exc.errno == errno.ENOTDIR:
        return f"{name} is not a folder"
    return f"cannot open {name} ({exc.strerror})"


def _trusted_owners() -> set[int]:
    return {os.getuid(), 0}


def _check_writers(folder: Path, status: os.stat_result, what: str) -> None:
    """Refuse ``what`` unless only this user or root can write it (this module's docstring says why)."""
    if status.st_uid not in _trusted_owners():
        owner = f"uid {status.st_uid}, neither this user ({os.getuid()}) nor root"
        raise UntrustedExport(folder, f"{what} is owned by {owner}")
    mode = stat.S_IMODE(status.st_mode)
    if mode & ~NOT_WRITABLE_BY_OTHERS:
        raise UntrustedExport(folder, f"{what} is writable by group or others (mode {mode:o})")


def _read_regular_file(folder: Path, name: str, fd: int, *, trusted_writers: bool) -> bytes:
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise UntrustedExport(folder, f"{name} is not a regular file")
        if trusted_writers:
            _check_writers(folder, status, name)
        try:
            return file.read()
        except OSError as exc:
            raise UntrustedExport(folder, f"cannot read {name} ({exc.strerror})") from exc


def _verify(folder: Path, files: dict[str, bytes], source_sha256: str | None) -> VerifiedExport:
    """Check the files of an export: its format, completeness, manifest, graph names and (when given) source."""
    meta = _metadata(folder, files)
    missing = [name for name in GRAPH_FILES.values() if name not in files]
    if missing:
        raise UntrustedExport(folder, f"the export is incomplete (missing {', '.join(missing)})")
    manifest = _manifest(folder, files)
    for name in DIGESTED_FILES:
        if hashlib.sha256(files[name]).hexdigest() != manifest[name]:
            raise UntrustedExport(folder, f"{name} does not match its sha256 in {MANIFEST_FILE} (changed since export)")
    if meta.get("graphs") != GRAPH_FILES:
        raise UntrustedExport(folder, f"{METADATA_FILE} names graph files other than the export's own {GRAPH_FILES}")
    source = meta.get("source")
    made_from = source.get("sha256") if isinstance(source, dict) else None
    if source_sha256 is not None and made_from != source_sha256:
        raise UntrustedExport(folder, f"made from another checkpoint (sha256 {str(made_from)[:16]}…)")
    graphs = {part: files[name] for part, name in GRAPH_FILES.items()}
    return VerifiedExport(folder, meta, graphs, manifest)


def _metadata(folder: Path, files: dict[str, bytes]) -> dict[str, Any]:
    if METADATA_FILE not in files:
        raise UntrustedExport(folder, f"not an ONNX export (no {METADATA_FILE})")
    try:
        meta = json.loads(files[METADATA_FILE])
    except ValueError as exc:
        raise UntrustedExport(folder, f"{METADATA_FILE} is unreadable ({exc.__class__.__name__})") from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UntrustedExport(folder, f"not a captioner ONNX export (no '{EXPORT_FORMAT}' marker in {METADATA_FILE})")
    if meta.get("format_version") != EXPORT_VERSION:
        raise UntrustedExport(
            folder,
            f"export format version {meta.get('format_version')!r} is not supported (this captioner reads version "
            f"{EXPORT_VERSION}); export the checkpoint again",
        )
    return meta


def _manifest(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    if MANIFEST_FILE not in files:
        raise UntrustedExport(folder, f"the export is incomplete (missing {MANIFEST_FILE})")
    try:
        digests = json.loads(files[MANIFEST_FILE])["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UntrustedExport(folder, f"{MANIFEST_FILE} is unreadable ({exc.__class__.__name__})") from exc
    if not isinstance(digests, dict) or sorted(digests) != sorted(DIGESTED_FILES):
        raise UntrustedExport(folder, f"{MANIFEST_FILE} does not list exactly {', '.join(DIGESTED_FILES)}")
    return digests
