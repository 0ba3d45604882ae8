"""captioner: a pretrained CNN encoder feeding an LSTM decoder, and every way to decode from it."""

from captioner._version import __version__
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.decoding import DecodingOptions
from captioner.model import Caption, Captioner, CaptionResult
from captioner.vocab import Vocabulary

__all__ = [
    "__version__",
    "Caption",
    "CaptionResult",
    "Captioner",
    "DecoderConfig",
    "DecodingOptions",
    "EncoderConfig",
    "ModelConfig",
    "Vocabulary",
]
