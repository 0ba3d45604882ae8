"""captioner: a pretrained CNN encoder feeding an LSTM decoder, and every way to decode from it.

The names below load on first use (PEP 562): ``import captioner.console`` (each console script's first step) and
the package's other light modules do not import torch, so Ctrl-C in a command's first seconds is caught.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from captioner._version import __version__

if TYPE_CHECKING:  # for type checkers, the names as plain re-exports (``X as X``)
    from captioner.config import DecoderConfig as DecoderConfig
    from captioner.config import EncoderConfig as EncoderConfig
    from captioner.config import ModelConfig as ModelConfig
    from captioner.model import Captioner as Captioner
    from captioner.options import DecodingOptions as DecodingOptions
    from captioner.results import Caption as Caption
    from captioner.results import CaptionResult as CaptionResult
    from captioner.vocab import Vocabulary as Vocabulary

_HOMES = {
    "Caption": "captioner.results",
    "CaptionResult": "captioner.results",
    "Captioner": "captioner.model",
    "DecoderConfig": "captioner.config",
    "DecodingOptions": "captioner.options",
    "EncoderConfig": "captioner.config",
    "ModelConfig": "captioner.config",
    "Vocabulary": "captioner.vocab",
}
__all__ = ["__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'captioner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
