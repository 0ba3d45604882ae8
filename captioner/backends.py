"""Which backend runs a model: torch (training, CUDA) or ONNX Runtime (CPU; no torch needed)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from captioner.export_format import is_export_dir
from captioner.onnx_backend import onnxruntime_available

BACKENDS = ("torch", "onnxruntime")
BACKEND_CHOICES = ("auto", *BACKENDS)


def torch_available() -> bool:
    """Whether torch is installed (the runtime install, ``captioner[runtime]``, has none), without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import blocker, or sys.modules["torch"] set to None
        return False


def resolve_backend(backend: str, device: Any = "cpu") -> str:
    """``auto``: onnxruntime when the model runs on CPU and onnxruntime is installed, else torch.

    ``device`` None or ``"auto"`` means CUDA when torch sees one, else the CPU; without torch it is the CPU."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    if not onnxruntime_available():
        return "torch"
    if device is not None and str(device) != "auto":
        return "onnxruntime" if str(device).split(":")[0] == "cpu" else "torch"
    if not torch_available():
        return "onnxruntime"
    import torch

    return "torch" if torch.cuda.is_available() else "onnxruntime"


def backend_for(path: str | os.PathLike, backend: str, device: Any = "cpu") -> str:
    """The backend that runs the model at ``path``: an export folder runs on onnxruntime under ``auto``, anything
    else as :func:`resolve_backend` decides; ``ValueError`` for onnxruntime on a device other than the CPU."""
    if backend == "auto" and is_export_dir(path):
        backend = "onnxruntime"  # an export folder only runs there
    backend = resolve_backend(backend, device)
    if backend == "onnxruntime" and device is not None and str(device) != "auto" and str(device).split(":")[0] != "cpu":
        raise ValueError("the onnxruntime backend runs on CPU; use backend 'torch' for CUDA")
    return backend
