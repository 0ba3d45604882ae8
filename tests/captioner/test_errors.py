"""One base for the project's errors (captioner.errors.CaptionerError) and one way to report them in a line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import captioner
import service
import training
from captioner.errors import CaptionerError, CheckpointError, one_line


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("cannot read x.pt", "cannot read x.pt"),
        ("first line\nsecond line\n", "first line"),
        ("\n\n  indented first  \nnext", "indented first"),
        (
            "[ONNXRuntimeError] : 1 : FAIL : Load model failed\nStack trace:\n  0: ...",
            "[ONNXRuntimeError] : 1 : FAIL : Load model failed",
        ),
    ],
)
def test_one_line_is_the_first_non_empty_line(message: str, line: str) -> None:
    assert one_line(ValueError(message)) == line


@pytest.mark.parametrize("exc", [KeyError(), RuntimeError(""), OSError(" \n\t\n")])
def test_one_line_names_the_class_when_the_message_is_empty(exc: BaseException) -> None:
    assert one_line(exc) == type(exc).__name__


# (module, class, the standard base its callers catch)
PROJECT_ERRORS = [
    ("captioner.checkpoint", "CheckpointError", RuntimeError),
    ("captioner.export_integrity", "UntrustedExport", RuntimeError),
    ("captioner.onnx_backend", "BackendUnavailable", RuntimeError),
    ("captioner.onnx_export", "ExportError", RuntimeError),
    ("captioner.encoders", "EncoderWeightsError", RuntimeError),
    ("captioner.model", "ConfidenceUnavailableError", ValueError),
    ("captioner.model", "TagsUnavailableError", ValueError),
    ("captioner.confidence", "ConfidenceModelError", ValueError),
    ("captioner.vocabulary_extension", "VocabularyExtensionError", ValueError),
    ("captioner.transforms", "ImageError", ValueError),
    ("captioner.tags", "TagTableError", ValueError),
    ("captioner.tag_words", "TagWordsError", ValueError),
    ("captioner.bulk", "InputError", ValueError),
    ("training.data", "DataError", ValueError),
    ("training.calibration", "CalibrationError", ValueError),
    ("service.app", "ModelLoadError", RuntimeError),
    ("service.batching", "BatcherStopped", RuntimeError),
    ("service.batching", "QueueTimeout", RuntimeError),
    ("service.batching", "OutOfMemory", RuntimeError),
]


@pytest.mark.parametrize(("module", "name", "standard"), PROJECT_ERRORS, ids=[e[1] for e in PROJECT_ERRORS])
def test_each_error_is_a_captioner_error_importable_where_it_was(module: str, name: str, standard: type) -> None:
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, CaptionerError) and issubclass(error, standard)


def test_checkpoint_error_is_one_class_wherever_it_is_imported_from() -> None:
    from captioner.checkpoint import CheckpointError as from_checkpoint

    assert from_checkpoint is CheckpointError


# Exceptions defined in the packages that are deliberately not CaptionerError: the HTTP answer itself (its handler
# turns it into the JSON error body).
NOT_PROJECT_ERRORS = {"service.errors.ApiError"}


def _defined_exceptions() -> dict[str, type]:
    found = {}
    for package in (captioner, training, service):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):  # runs a command when imported
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                    found[f"{info.name}.{name}"] = value
    return found


def test_every_error_the_packages_define_derives_from_captioner_error() -> None:
    defined = _defined_exceptions()
    assert {getattr(importlib.import_module(m), n) for m, n, _ in PROJECT_ERRORS} <= set(defined.values())
    strays = sorted(name for name, cls in defined.items() if not issubclass(cls, CaptionerError))
    assert set(strays) == NOT_PROJECT_ERRORS, f"errors outside CaptionerError: {set(strays) - NOT_PROJECT_ERRORS}"
