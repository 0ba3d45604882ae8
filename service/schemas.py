"""Request options and response bodies; the options' names, defaults, bounds and valid values in words are the
library's (:mod:`captioner.options`), so the API states and enforces the same ranges as the library and the CLI."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, create_model, model_serializer

from captioner.options import APPLIES_TO, RANGES, VALID_VALUES, DecodingOptions, check_options_apply
from captioner.tags import DEFAULT_MIN_TAG_CONFIDENCE, DEFAULT_TAG_COUNT

# The service's own option, beside the library's: whether the response carries attention maps.
_ATTENTION_VALUES = "true or false"
# The request and response models are made from DecodingOptions' fields (names, types, defaults, help, ranges), in
# its order, then the service's own option, attention: an option, a default or a range is written there only.
_OPTIONS = dataclasses.fields(DecodingOptions)
_TYPES = typing.get_type_hints(DecodingOptions)


def option_range(name: str) -> str | None:
    """The valid values of option ``name`` in words (as 422 messages and the OpenAPI descriptions state them), or
    None for a name that is no option."""
    return _ATTENTION_VALUES if name == "attention" else VALID_VALUES.get(name)


def _request_field(option: dataclasses.Field[Any]) -> tuple[Any, Any]:
    """A DecodingOptions field as a request option: its type (its choices as a Literal), default and range.

    The range is enforced by pydantic too (DecodingOptions checks it again), so a 422 names the field."""
    choices = option.metadata.get("choices")
    kind = Literal[choices] if choices else _TYPES[option.name]
    described = "; ".join(filter(None, (option.metadata.get("help"), option_range(option.name))))
    # dict[str, Any]: as keywords, mypy checks its values against every parameter of Field (alias: str, ...)
    bounds: dict[str, Any] = dict(RANGES[option.name].constraints()) if option.name in RANGES else {}
    return kind, Field(option.default, description=described, **bounds)


def _field_definitions(make: Callable[[dataclasses.Field[Any]], tuple[Any, Any]]) -> dict[str, Any]:
    # dict[str, Any], not dict[str, tuple[Any, Any]]: mypy checks a **-unpacked dict's values against every
    # keyword parameter of create_model, __config__ and __base__ included, and no overload would match.
    return {option.name: make(option) for option in _OPTIONS}


class _CaptionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    if typing.TYPE_CHECKING:  # the fields are made by create_model below
        attention: bool

    def decoding_options(self) -> DecodingOptions:
        """The library's options; raises ``ValueError`` for an option the request gave that its method does not
        use (``method=sample&beam_size=3``, whatever the value) and for combinations (greedy with
        num_captions > 1, ...)."""
        options = DecodingOptions(**self.model_dump(exclude={"attention"}))
        check_options_apply(options.method, self.model_fields_set)  # what the request named, defaults left out
        return options


CaptionOptions = create_model(
    "CaptionOptions",
    __base__=_CaptionOptions,
    __doc__="Decoding options of ``POST /caption``, as query parameters or multipart form fields.",
    **_field_definitions(_request_field),
    attention=(bool, Field(False, description="return per-word attention maps (models with attention only)")),
)

OPTION_NAMES = tuple(CaptionOptions.model_fields)


class _AppliedOptions(BaseModel):
    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # an option another method uses is left out, not shown as null; an unseeded sample has no seed
        return {name: value for name, value in handler(self).items() if value is not None}


def _applied_field(option: dataclasses.Field[Any]) -> tuple[Any, Any]:
    """A DecodingOptions field as a response states it: required when every method uses it, else optional."""
    kind = _TYPES[option.name]
    return (kind, ...) if option.name not in APPLIES_TO else (kind | None, None)


AppliedOptions = create_model(
    "AppliedOptions",
    __base__=_AppliedOptions,
    __doc__="The options the caption was made with: only those its method uses (``beam_size`` only for beam, ...).",
    **_field_definitions(_applied_field),
    attention=(bool, ...),
)


# Confidences are probabilities: 4 decimals (0.01 %) say all they can; the rest is noise of the float32 maths.
CONFIDENCE_DECIMALS = 4


class CaptionOut(BaseModel):
    text: str = Field(description="the caption, lower-case words separated by spaces")
    tokens: list[str] = Field(description="its words")
    log_prob: float = Field(description="model log-probability of the words and the end token")
    score: float = Field(description="ranking score (length-normalised for beam search)")
    confidence: float | None = Field(
        description="calibrated probability, in [0, 1], that the caption is acceptable (what 'acceptable' means: "
        "GET /model, confidence.target); rounded to 4 decimals; null when the model has no confidence calibration"
    )
    attention: list[list[float]] | None = Field(
        None, description="per word, attention weights over the h*w feature grid (row-major); attention=true only"
    )


class TagOut(BaseModel):
    """One thing the image shows, from the encoder's ImageNet-1k head (captioner.tags)."""

    name: str = Field(description="a readable name; families of classes share one (every dog breed is 'dog')")
    confidence: float = Field(
        description="the head's probability, summed over the classes sharing the name; rounded to 4 decimals"
    )
    parents: list[str] = Field(description="broader groups from WordNet, nearest first (e.g. mammal, animal)")


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
    captions: list[CaptionOut] = Field(description="best first; empty when abstained")
    abstained: bool = Field(
        description="true when every caption's confidence was below min_confidence: no captions, the tags are kept"
    )
    tags: list[TagOut] = Field(
        description=f"what the image shows, strongest first: up to {DEFAULT_TAG_COUNT} tags with confidence "
        f">= {DEFAULT_MIN_TAG_CONFIDENCE}; empty when the encoder has no ImageNet head (GET /model, tags)"
    )
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
                            "confidence": 0.8312,
                            "attention": None,
                        }
                    ],
                    "abstained": False,
                    "tags": [
                        {"name": "dog", "confidence": 0.7421, "parents": ["mammal", "animal"]},
                        {"name": "tennis ball", "confidence": 0.0315, "parents": ["sports equipment"]},
                    ],
                    "options": {
                        "method": "beam",
                        "max_length": 20,
                        "beam_size": 3,
                        "length_penalty": 0.0,
                        "num_captions": 1,
                        "min_confidence": 0.0,
                        "guided_by_tags": False,
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


class ConfidenceInfo(BaseModel):
    """The calibration that turns a caption's signals into its confidence (captioner.confidence)."""

    target: str = Field(description="what the confidence is the probability of, e.g. per-image CIDEr-D >= a bar")
    signals: list[str] = Field(description="what it is computed from (caption log-probability, feature distance, ...)")
    fitted_on: dict[str, Any] = Field(description="the data and figures of the fit, as the checkpoint records them")


class TagSettings(BaseModel):
    count: int = Field(description="most tags per image")
    min_confidence: float = Field(description="tags below this confidence are left out")


class ModelInfo(BaseModel):
    id: str
    checkpoint: str = Field(description="the checkpoint's file name (no folder: the server's paths stay private)")
    checkpoint_sha256: str
    backend: Literal["torch", "onnxruntime"] = Field(description="what runs the model")
    encoder: EncoderInfo
    decoder: dict[str, Any] = Field(description="the decoder's configuration")
    vocab_size: int
    attention: bool = Field(description="whether captions can come with attention maps")
    confidence: ConfidenceInfo | None = Field(
        description="the confidence calibration; null: captions answer confidence null and min_confidence > 0 "
        "is refused (add one with `captioner calibrate`)"
    )
    tags: TagSettings | None = Field(
        description="how responses pick their tags; null: the encoder has no ImageNet head and responses have none"
    )
    added_words: dict[str, str] | None = Field(
        None,
        description="words added after training (vocabulary extension), each with the known word whose weights it "
        "took; only guided_by_tags says them, for a photo whose tag names them; null: none",
    )
    parameters: int
    training_data: Any | None = Field(None, description="what the checkpoint says it was trained on")
    metrics: dict[str, Any] | None = Field(None, description="evaluation metrics stored in the checkpoint")
    metadata: dict[str, Any] = Field(description="everything else the checkpoint records")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model_id: str
    uploads_saturated: str | None = Field(
        None,
        description="set while all slots for slow uploads are taken (clients that send slowly or not at all): "
        "new fast uploads are still served, a slow one is refused",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. invalid_image")
    message: str = Field(description="one line for humans, naming the valid values where it can")


class ErrorResponse(BaseModel):
    error: ErrorDetail
