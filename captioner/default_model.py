"""The default model: the one bundled with the package, or the one ``CAPTIONER_DEFAULT_MODEL`` names.

``CAPTIONER_DEFAULT_MODEL`` (a checkpoint or an ONNX export folder) stands in for the bundled model wherever the
default is meant (no ``--checkpoint``, ``default``, the service without ``CAPTIONER_CHECKPOINT``). The slim serving
image sets it to the bundled model's export, which runs without torch; a ``.pt`` checkpoint needs torch to read.
"""

from __future__ import annotations

import os
from pathlib import Path

from captioner.digests import file_sha256
from captioner.errors import CheckpointError
from captioner.export_format import METADATA_FILE

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "default.pt"
DEFAULT_MODEL_ENV = "CAPTIONER_DEFAULT_MODEL"


def default_checkpoint() -> Path:
    """The default model's file or export folder; :class:`CheckpointError` when there is none."""
    named = os.environ.get(DEFAULT_MODEL_ENV)
    if named:
        if not Path(named).exists():
            raise CheckpointError(f"{DEFAULT_MODEL_ENV}={named}: no such checkpoint or export folder")
        return Path(named)
    if not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError("no default model is bundled with this install; pass a checkpoint path")
    return DEFAULT_CHECKPOINT


def model_id(checkpoint: str | os.PathLike | None) -> str:
    """The id a model is served and its captions recorded under: the checkpoint's name and the first 12 hex digits
    of its sha256 (of an ONNX export folder: of its metadata file); ``None`` is the default model."""
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    sha256 = file_sha256(path / METADATA_FILE if path.is_dir() else path)
    return f"{path.stem}-{sha256[:12]}"
