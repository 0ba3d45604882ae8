"""Loading a model to caption with, whichever backend runs it: the front door of the command line, the service and
bulk captioning. Torch is imported only when the torch backend, or a ``.pt`` checkpoint, needs it: an install
without torch (``captioner[runtime]``) runs ONNX export folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from captioner.backends import backend_for, torch_available
from captioner.default_model import DEFAULT_MODEL_ENV, default_checkpoint
from captioner.errors import CheckpointError
from captioner.export_format import is_export_dir
from captioner.onnx_backend import BackendUnavailable
from captioner.onnx_model import load_export
from captioner.pipeline import CaptionPipeline

TORCH_HINT = "pip install 'captioner[torch]'"


def load_captioner(
    path: str | os.PathLike | None = None, *, backend: str = "auto", device: Any = "cpu"
) -> CaptionPipeline:
    """The model at ``path`` (a ``.pt`` checkpoint or an ONNX export folder; None: the default model) on
    ``backend`` (``auto``, ``torch`` or ``onnxruntime``: :func:`~captioner.backends.backend_for`), in eval mode.

    An export folder on ONNX Runtime needs no torch; anything else is :meth:`captioner.model.Captioner.from_checkpoint`.
    """
    path = default_checkpoint() if path is None else Path(path)
    backend = backend_for(path, backend, device)
    if backend == "onnxruntime" and is_export_dir(path):
        return load_export(path)
    if not torch_available():
        if backend == "torch":
            raise BackendUnavailable(f"the torch backend needs torch, which this install lacks: {TORCH_HINT}")
        raise CheckpointError(
            f"{path}: reading a .pt checkpoint needs torch, which this install lacks ({TORCH_HINT}); it runs ONNX "
            f"export folders: make one where torch is installed (captioner export {path.name} DIR --format onnx) "
            f"and pass DIR, or set {DEFAULT_MODEL_ENV}=DIR"
        )
    from captioner.model import Captioner

    return Captioner.from_checkpoint(path, device=device, backend=backend)
