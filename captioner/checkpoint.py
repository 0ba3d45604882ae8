"""One self-contained checkpoint file, loadable with ``torch.load(weights_only=True)``.

Layout (plain dicts, lists, strings, numbers and tensors only)::

    format, format_version, config, vocab (token list), preprocess, encoder (identity),
    decoder_state, encoder_state (when the encoder cannot be re-created from an installed package
    or was fine-tuned, else None; with the ImageNet-1k class head as ``classifier.*`` when the encoder
    has one, and none in checkpoints from before it was kept), metadata (training data, metrics, ...),
    training (optional optimizer / scheduler / scaler / step / RNG state for resuming).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from captioner.errors import CheckpointError  # both runtimes raise it: it lives below them (still importable here)

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("config", "vocab", "preprocess", "encoder", "decoder_state")


DEFAULT_MODEL_NAME = "default"  # what the command lines accept for the bundled default model


def checkpoint_arg(value: str | os.PathLike | None) -> str | os.PathLike | None:
    """A command line's checkpoint argument: ``default`` (or nothing) means the bundled model (``None``),
    unless a file or folder of that name exists."""
    if value is None or (str(value) == DEFAULT_MODEL_NAME and not Path(value).exists()):
        return None
    return value


def clean_state_dict(state: dict[str, torch.Tensor], *, half: bool = False) -> dict[str, torch.Tensor]:
    """Strip ``torch.compile``/DDP prefixes and optionally store floating tensors as fp16."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "").removeprefix("module.")
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        out[key] = value
    return out


def to_jsonable(value: Any) -> Any:
    """Checkpoint metadata as JSON values: tensors and numpy values become lists or numbers, tuples lists,
    anything else unknown its string."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "tolist"):  # tensors and numpy values
        return to_jsonable(value.tolist())
    return str(value)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: a crash mid-write never leaves a truncated file at ``path``."""
    missing = [k for k in _REQUIRED if k not in payload]
    assert not missing, f"checkpoint payload lacks {missing}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with _ctrl_c_after_writing():  # a Ctrl-C meanwhile is raised once the file is in place
        try:
            import torch  # reading and writing checkpoints needs torch; CheckpointError and the rest do not

            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            # mkstemp makes the file owner-only; give it the permissions a plain open() would (the umask's),
            # or a container running as another user cannot read a mounted checkpoint
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _ctrl_c_after_writing() -> Iterator[None]:
    """Hold a Ctrl-C that arrives while a checkpoint is written until the write is done, then raise it.

    Interrupted inside ``torch.save``, the zip writer fails with a ``RuntimeError`` ("unexpected pos") that hides
    the ``KeyboardInterrupt``: the user got a traceback instead of the one-line "interrupted" and lost the step.
    Only the main thread can handle signals; elsewhere (and where SIGINT is ignored) nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    import torch  # as in save_checkpoint

    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # on arbitrary bytes torch's unpickler raises almost anything (KeyError, ...)
        # torch's own text is not passed on: for a text file it advises weights_only=False, which would let
        # a hostile file run code
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a PyTorch file, truncated, or holding Python objects that a "
            f"captioner checkpoint never contains; {exc.__class__.__name__})"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no '{FORMAT}' marker)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this captioner reads version "
            f"{FORMAT_VERSION}); use the captioner release that wrote it"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is incomplete (missing {', '.join(missing)})")
    return data
