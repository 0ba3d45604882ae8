"""Suite-wide set-up: ONNX exports made on first use go to a temporary cache, never the user's."""

from __future__ import annotations

import os
import shutil
import tempfile

_created: list[str] = []


def pytest_configure(config) -> None:
    # set before any test (or a server it starts as a subprocess) loads a model on the onnxruntime backend
    if "CAPTIONER_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="captioner-test-cache-")
        os.environ["CAPTIONER_CACHE_DIR"] = path
        _created.append(path)


def pytest_unconfigure(config) -> None:
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)
