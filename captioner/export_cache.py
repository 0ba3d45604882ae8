"""The cache of ONNX exports made on first use, so that ``backend="onnxruntime"`` can run a ``.pt`` checkpoint.

A checkpoint is exported once into a folder keyed by its sha256:
``$CAPTIONER_CACHE_DIR/onnx/v<EXPORT_VERSION>-<sha256[:16]>/``, where ``CAPTIONER_CACHE_DIR`` defaults to
``$XDG_CACHE_HOME/captioner`` (``~/.cache/captioner``). Later loads find it there, and use it only after the
checks of :mod:`captioner.export_integrity` (the threat model is there): an entry that fails one is exported
again, or refused with one line when the cache cannot be written. The graphs are the only thing taken from the
cache; what the model says (vocabulary, caption rules, metadata) comes from the checkpoint. Exporting needs torch:
the caller passes the exporter (:func:`captioner.model.export_checkpoint`); finding and checking needs none.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from captioner.digests import file_sha256
from captioner.errors import CheckpointError
from captioner.export_format import EXPORT_VERSION
from captioner.export_integrity import UntrustedExport, VerifiedExport, read_cache_entry

log = logging.getLogger(__name__)

# Writes the export of a checkpoint (path, its sha256) into a folder (captioner.onnx_export.export_onnx's layout).
Exporter = Callable[[Path, str, Path], None]


def cache_dir() -> Path:
    """Where exports made on first use live: ``$CAPTIONER_CACHE_DIR``, else ``$XDG_CACHE_HOME/captioner``."""
    explicit = os.environ.get("CAPTIONER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def cached_export_dir(checkpoint: str | os.PathLike) -> Path:
    """The cache folder for ``checkpoint``'s export, whether or not it exists yet."""
    return _cache_folder(file_sha256(checkpoint))


def _cache_folder(sha256: str) -> Path:
    return cache_dir() / "onnx" / f"v{EXPORT_VERSION}-{sha256[:16]}"


# The cache folder cannot be written: permissions, or a read-only file system (a container's root).
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def ensure_exported(checkpoint: str | os.PathLike, export: Exporter) -> VerifiedExport:
    """The checked export of ``checkpoint`` in the cache, exporting it first (``export(checkpoint, sha256,
    folder)``, which needs torch) when it is not there yet or an entry there fails a check
    (:mod:`captioner.export_integrity`); a failure to mend it is one line.

    Processes starting together on one cache (replicas sharing a volume) take turns through a lock
    file beside the export: one exports, the others then find its export.
    """
    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint)
    folder = _cache_folder(sha)
    try:
        return read_cache_entry(folder, sha)
    except UntrustedExport as exc:
        refused = exc
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(folder):
            try:
                return read_cache_entry(folder, sha)  # another process exported it while this one waited
            except UntrustedExport as exc:
                refused = exc
            if not refused.absent:
                _set_aside(folder)  # before the warning: when it fails, the error alone says it all, in one line
                log.warning("refused the cached ONNX export %s; exporting it again", refused)
            _remove_abandoned_exports(folder)
            _export_into_cache(export, checkpoint, sha, folder)
    except OSError as exc:
        raise CheckpointError(_cache_failure(checkpoint, folder, refused, exc)) from exc
    return read_cache_entry(folder, sha)  # the new export, checked as any other


def _cache_failure(checkpoint: Path, folder: Path, refused: UntrustedExport, exc: OSError) -> str:
    """One line for an export into the cache that failed on the file system."""
    if refused.absent:
        what = f"cannot write the ONNX export of {checkpoint} to {folder}"
    else:
        what = f"the cached ONNX export {folder} was refused ({refused.reason}) and cannot be exported again"
    if exc.errno in _UNWRITABLE:
        return (
            f"{what} ({exc.strerror}); set CAPTIONER_CACHE_DIR to a writable folder, or export it beforehand "
            f"with: captioner export {checkpoint} DIR --format onnx"
        )
    return f"{what} ({exc.strerror or exc.__class__.__name__}: {exc.filename or folder})"


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold the lock file beside ``folder``. A symbolic link there (a lock file never is one) is removed, not
    followed; one put back in the meantime makes the lock fail with ELOOP (a one-line error above)."""
    from filelock import FileLock

    lock = folder.parent / f".{folder.name}.lock"
    if lock.is_symlink():
        log.warning("removing %s: a symbolic link where the export cache keeps its lock file", lock)
        lock.unlink()
    with FileLock(str(lock)):
        yield


def _set_aside(folder: Path) -> None:
    """Move a refused entry out of the export's way, under a name :func:`_remove_abandoned_exports` clears
    (a rename moves a symbolic link itself, never what it points to)."""
    os.rename(folder, folder.parent / f".{folder.name}.{secrets.token_hex(4)}.tmp")


def _export_into_cache(export: Exporter, checkpoint: Path, sha: str, folder: Path) -> None:
    log.info(
        "exporting %s to ONNX for onnxruntime (first use only; cached in %s, set CAPTIONER_CACHE_DIR to move it) ...",
        checkpoint.name,
        folder,
    )
    started = time.perf_counter()
    export(checkpoint, sha, folder)
    log.info("exported in %.0f s; later runs load it from the cache", time.perf_counter() - started)


def _remove_abandoned_exports(folder: Path) -> None:
    """Delete the temporary folders of exports into ``folder`` that never finished (a process stopped at once,
    as ``captioner-serve`` does on Ctrl-C while the model loads), and entries set aside as refused. Called
    under the cache lock: no export into ``folder`` is running. Links are removed, never followed."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):  # export_onnx's temporary folders, _set_aside's
        if tmp.is_symlink():
            tmp.unlink(missing_ok=True)
        elif tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
