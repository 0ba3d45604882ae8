"""Model hyperparameters as frozen dataclasses; checkpoints store them as plain dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

CELLS = ("lstm", "gru", "rnn")
IMAGE_INPUTS = ("init", "first_word")


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "resnet50"  # a key of captioner.encoders.ENCODERS
    weights: str | None = "imagenet"  # "imagenet" (download / bundled package), a local state-dict path, or None
    trainable: bool = False  # fine-tune the last stage; everything else stays frozen


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int  # number of tokens including the four specials
    feature_dim: int  # channels of the encoder's feature grid
    embed_dim: int = 512  # word (and projected image) embedding size
    hidden_dim: int = 512  # recurrent state size
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.5  # on embeddings and on the state fed to the output layer
    cell: str = "lstm"  # lstm | gru | rnn (vanilla tanh RNN)
    attention: bool = False  # soft attention over the feature grid (Show, Attend and Tell)
    attention_dim: int = 512  # size of the additive attention's hidden layer
    image_input: str = "init"  # "init": image initialises the state; "first_word": image is the first input

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {', '.join(CELLS)}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"unknown image_input {self.image_input!r}; expected one of {', '.join(IMAGE_INPUTS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("vocab_size", "feature_dim", "embed_dim", "hidden_dim", "num_layers", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig | None = None  # filled in once the vocabulary and encoder are known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        decoder = data.get("decoder")
        return cls(
            encoder=EncoderConfig(**_known(EncoderConfig, data.get("encoder", {}))),
            decoder=DecoderConfig(**_known(DecoderConfig, decoder)) if decoder else None,
        )


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` declares so that a newer checkpoint's extra fields do not break loading."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
