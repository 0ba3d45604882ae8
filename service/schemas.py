"""Request options and response bodies; the option limits are the library's, so both report the same range."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from captioner.decoding import (
    BEAM_SIZE_RANGE,
    LENGTH_PENALTY_RANGE,
    MAX_LENGTH_RANGE,
    METHODS,
    NUM_CAPTIONS_RANGE,
    TEMPERATURE_MAX,
    DecodingOptions,
)

_DEFAULTS = DecodingOptions()
SEED_MAX = 2**63 - 1

# The valid values of each option, as error messages and the OpenAPI descriptions state them.
_RANGES = {
    "method": f"one of {', '.join(METHODS)}",
    "max_length": "an integer in [{}, {}]".format(*MAX_LENGTH_RANGE),
    "beam_size": "an integer in [{}, {}]".format(*BEAM_SIZE_RANGE),
    "num_captions": "an integer in [{}, {}]".format(*NUM_CAPTIONS_RANGE),
    "length_penalty": "a number in [{}, {}]".format(*LENGTH_PENALTY_RANGE),
    "temperature": f"a number in (0, {TEMPERATURE_MAX}]",
    "top_k": "an integer >= 0 (0 keeps all words)",
    "top_p": "a number in (0, 1]",
    "seed": f"an integer in [0, {SEED_MAX}]",
    "attention": "true or false",
}


def option_range(name: str) -> str | None:
    """The valid values of option ``name`` in words, or None for an unknown name."""
    return _RANGES.get(name)


class CaptionOptions(BaseModel):
    """Decoding options of ``POST /caption``, as query parameters or multipart form fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["greedy", "sample", "beam"] = Field(_DEFAULTS.method, description=_RANGES["method"])
    max_length: int = Field(
        _DEFAULTS.max_length,
        ge=MAX_LENGTH_RANGE[0],
        le=MAX_LENGTH_RANGE[1],
        description=f"most words per caption; {_RANGES['max_length']}",
    )
    beam_size: int = Field(
        _DEFAULTS.beam_size,
        ge=BEAM_SIZE_RANGE[0],
        le=BEAM_SIZE_RANGE[1],
        description=f"beams per image (beam); {_RANGES['beam_size']}",
    )
    length_penalty: float = Field(
        _DEFAULTS.length_penalty,
        ge=LENGTH_PENALTY_RANGE[0],
        le=LENGTH_PENALTY_RANGE[1],
        description=f"beam ranking by log_prob / (words + 1) ** length_penalty; {_RANGES['length_penalty']}",
    )
    temperature: float = Field(
        _DEFAULTS.temperature,
        gt=0.0,
        le=TEMPERATURE_MAX,
        description=f"softmax temperature (sample); {_RANGES['temperature']}",
    )
    top_k: int = Field(_DEFAULTS.top_k, ge=0, description=f"sample from the k likeliest words; {_RANGES['top_k']}")
    top_p: float = Field(_DEFAULTS.top_p, gt=0.0, le=1.0, description=f"nucleus sampling; {_RANGES['top_p']}")
    num_captions: int = Field(
        _DEFAULTS.num_captions,
        ge=NUM_CAPTIONS_RANGE[0],
        le=NUM_CAPTIONS_RANGE[1],
        description=f"captions returned (sample: draws, beam: best beams, <= beam_size); {_RANGES['num_captions']}",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description=f"same seed, same samples (sample); {_RANGES['seed']}"
    )
    attention: bool = Field(False, description="return per-word attention maps (models with attention only)")

    def decoding_options(self) -> DecodingOptions:
        """The library's options; raises ``ValueError`` for combinations (greedy with num_captions > 1, ...)."""
        return DecodingOptions(**self.model_dump(exclude={"attention"}))


OPTION_NAMES = tuple(CaptionOptions.model_fields)


class AppliedOptions(BaseModel):
    """The options the caption was made with: only those its method uses (``beam_size`` only for beam, ...)."""

    method: str
    max_length: int
    beam_size: int | None = None
    length_penalty: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    num_captions: int | None = None
    seed: int | None = None
    attention: bool

    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler):
        # an option another method uses is left out, not shown as null; an unseeded sample has no seed
        return {name: value for name, value in handler(self).items() if value is not None}


class CaptionOut(BaseModel):
    text: str = Field(description="the caption, lower-case words separated by spaces")
    tokens: list[str] = Field(description="its words")
    log_prob: float = Field(description="model log-probability of the words and the end token")
    score: float = Field(description="ranking score (length-normalised for beam search)")
    attention: list[list[float]] | None = Field(
        None, description="per word, attention weights over the h*w feature grid (row-major); attention=true only"
    )


class ImageInfo(BaseModel):
    width: int = Field(description="upright width in pixels (after EXIF rotation)")
    height: int


class AttentionRegion(BaseModel):
    """The part of the upright image the attention grid covers (the encoder's centre crop), as fractions."""

    left: float
    top: float
    width: float
    height: float


class Timing(BaseModel):
    total_ms: float = Field(description="from the request reaching the route to the response")
    decode_ms: float = Field(description="decoding the upload into an upright RGB image")
    queue_ms: float = Field(description="waiting for the micro-batch to start")
    model_ms: float = Field(description="resize/normalise + encoder + decoder time of the whole micro-batch")
    batch_size: int = Field(description="requests encoded together in this micro-batch")


class CaptionResponse(BaseModel):
    captions: list[CaptionOut] = Field(description="best first")
    options: AppliedOptions = Field(description="the decoding options used, defaults filled in")
    model_id: str
    image: ImageInfo
    attention_shape: list[int] | None = Field(None, description="(h, w) of the attention grid; attention=true only")
    attention_region: AttentionRegion | None = None
    timing: Timing

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "captions": [
                        {
                            "text": "a dog runs across the grass",
                            "tokens": ["a", "dog", "runs", "across", "the", "grass"],
                            "log_prob": -4.21,
                            "score": -4.21,
                            "attention": None,
                        }
                    ],
                    "options": {
                        "method": "beam",
                        "max_length": 20,
                        "beam_size": 3,
                        "length_penalty": 0.0,
                        "temperature": 1.0,
                        "top_k": 0,
                        "top_p": 1.0,
                        "num_captions": 1,
                        "seed": None,
                        "attention": False,
                    },
                    "model_id": "default-3f2a9c1b7e4d",
                    "image": {"width": 640, "height": 480},
                    "attention_shape": None,
                    "attention_region": None,
                    "timing": {"total_ms": 61.2, "decode_ms": 4.9, "queue_ms": 0.3, "model_ms": 51.0, "batch_size": 1},
                }
            ]
        }
    )


class EncoderInfo(BaseModel):
    name: str
    weights: str | None
    weights_sha256: str | None
    trainable: bool
    feature_dim: int
    preprocess: dict[str, Any]


class ModelInfo(BaseModel):
    id: str
    checkpoint: str = Field(description="the checkpoint's file name (no folder: the server's paths stay private)")
    checkpoint_sha256: str
    backend: Literal["torch", "onnxruntime"] = Field(description="what runs the model")
    encoder: EncoderInfo
    decoder: dict[str, Any] = Field(description="the decoder's configuration")
    vocab_size: int
    attention: bool = Field(description="whether captions can come with attention maps")
    parameters: int
    training_data: Any | None = Field(None, description="what the checkpoint says it was trained on")
    metrics: dict[str, Any] | None = Field(None, description="evaluation metrics stored in the checkpoint")
    metadata: dict[str, Any] = Field(description="everything else the checkpoint records")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model_id: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. invalid_image")
    message: str = Field(description="one line for humans, naming the valid values where it can")


class ErrorResponse(BaseModel):
    error: ErrorDetail
