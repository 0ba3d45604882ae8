"""``GET /model``: what is being served, as recorded in its checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from captioner.checkpoint import to_jsonable
from captioner.confidence import ConfidenceModel
from captioner.tags import DEFAULT_MIN_TAG_CONFIDENCE, DEFAULT_TAG_COUNT
from service.deps import ApiKeyDep, LoadedDep
from service.schemas import ConfidenceInfo, EncoderInfo, ErrorResponse, ModelInfo, TagSettings

router = APIRouter(tags=["model"], dependencies=[ApiKeyDep])

_TRAINING_DATA_KEYS = ("training", "training_data", "data", "dataset")


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="Encoder, decoder, vocabulary size, training data, metrics, confidence calibration and tag settings "
    "of the served checkpoint",
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def model_info(loaded: LoadedDep) -> ModelInfo:
    model = loaded.model
    config = model.config
    metadata = without_server_paths(to_jsonable(model.metadata))
    training_data = next((metadata[k] for k in _TRAINING_DATA_KEYS if k in metadata), None)
    if isinstance(training_data, dict):  # the training engine's record: data, format, splits, epochs, config
        training_data = {k: v for k, v in training_data.items() if k != "config"}  # the config stays in metadata
    metrics = metadata.get("metrics")
    return ModelInfo(
        id=loaded.id,
        checkpoint=Path(loaded.checkpoint).name,
        checkpoint_sha256=loaded.checkpoint_sha256,
        backend=model.backend,
        encoder=EncoderInfo(
            **without_server_paths(model.encoder.identity()),
            trainable=config.encoder.trainable,
            feature_dim=model.encoder.feature_dim,
            preprocess=model.preprocess_config.to_dict(),
        ),
        decoder=dataclasses.asdict(config.decoder) if config.decoder is not None else {},
        vocab_size=len(model.vocab),
        attention=bool(config.decoder is not None and config.decoder.attention),
        confidence=_confidence_info(model.confidence_model) if model.confidence_model is not None else None,
        tags=TagSettings(count=DEFAULT_TAG_COUNT, min_confidence=DEFAULT_MIN_TAG_CONFIDENCE)
        if model.encoder.has_class_head
        else None,
        added_words=dict(model.vocabulary_extension.sources) if model.vocabulary_extension else None,
        parameters=model.parameter_count(),
        training_data=training_data,
        metrics=metrics if isinstance(metrics, dict) else None,
        metadata=metadata,
    )


def _confidence_info(confidence: ConfidenceModel) -> ConfidenceInfo:
    return ConfidenceInfo(
        target=confidence.target,
        signals=confidence.described_signals,
        fitted_on=without_server_paths(to_jsonable(confidence.fitted_on)),  # it may name the calibration data's folder
    )


def without_server_paths(value: Any) -> Any:
    """``value`` with every absolute or home-relative path cut to its last part (``/data/flickr8k`` ->
    ``flickr8k``): a checkpoint's metadata records where it was trained, and ``/model`` must not map the
    server's disk for whoever asks."""
    if isinstance(value, dict):
        return {k: without_server_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_server_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return Path(value).name or "/"
    return value
