""":class:`OnnxCaptioner`: captioning on ONNX Runtime, numpy only (no torch), from an export's checked graphs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from captioner.arrays import Array, to_numpy
from captioner.caption_rules import CaptionRules
from captioner.config import ModelConfig
from captioner.errors import CheckpointError
from captioner.export_format import METADATA_FILE
from captioner.export_integrity import VerifiedExport, read_export_folder
from captioner.onnx_backend import OnnxDecoder, OnnxEncoder, require_onnxruntime
from captioner.pipeline import CaptionPipeline, confidence_model_from, vocabulary_extension_from
from captioner.vocab import Vocabulary


class OnnxCaptioner(CaptionPipeline):
    """An exported model on ONNX Runtime (CPU): the same captions, options, tags and confidences as the torch
    :class:`~captioner.model.Captioner`, with numpy arrays throughout."""

    backend = "onnxruntime"
    encoder: OnnxEncoder
    decoder: OnnxDecoder

    def __init__(
        self,
        config: ModelConfig,
        encoder: OnnxEncoder,
        decoder: OnnxDecoder,
        vocab: Vocabulary,
        export: VerifiedExport,
        **described: Any,
    ) -> None:
        self._config = config  # the model's configuration, as its checkpoint gives it
        self.encoder = encoder
        self.decoder = decoder
        self._init_pipeline(vocab, **described)
        self.export_dir = export.folder
        self.export_parameters = int(export.meta.get("parameters") or 0)  # parameter count recorded by the export

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def device(self) -> str:
        return "cpu"

    def parameter_count(self) -> int:
        return self.export_parameters

    def on_backend(self, array: Array) -> np.ndarray:
        return to_numpy(array)

    def encode_with_class_logits(self, pixels: Array) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encoder.forward_features_and_logits(pixels, chunk_size=self.encoder_chunk_size)

    def state_payload(self, **_: Any) -> dict[str, Any]:
        raise RuntimeError(f"a model on the {self.backend} backend cannot be saved: save the PyTorch checkpoint")

    def save(self, path: str | os.PathLike, **_: Any) -> None:
        self.state_payload()


def onnx_captioner(
    export: VerifiedExport, described: Mapping[str, Any], source: str, *, threads: int | None = None
) -> OnnxCaptioner:
    """An :class:`OnnxCaptioner` over ``export``'s checked graphs, saying what ``described`` says (a checkpoint's
    contents, or the export's own ``captioner.json``): vocabulary, caption rules, confidence model, metadata."""
    require_onnxruntime()
    try:
        config = ModelConfig.from_dict(described["config"])
        if config.decoder is None:
            raise ValueError("its config has no decoder")
        encoder = OnnxEncoder(export, described, threads)
        decoder = OnnxDecoder(export, config.decoder, threads)
        vocab = Vocabulary(described["vocab"])
        rules = CaptionRules.from_dict(described["caption_rules"]) if described.get("caption_rules") else None
        return OnnxCaptioner(
            config,
            encoder,
            decoder,
            vocab,
            export,
            metadata=described.get("metadata") or {},
            caption_rules=rules,
            confidence_model=confidence_model_from(dict(described), source, config.decoder.feature_dim),
            vocabulary_extension=vocabulary_extension_from(dict(described), source, vocab),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} does not describe a model this captioner can run: {exc}") from exc


def load_export(folder: str | os.PathLike, *, threads: int | None = None) -> OnnxCaptioner:
    """The model of an export folder (``captioner export CHECKPOINT DIR --format onnx``), described by its own
    checked ``captioner.json``; no torch needed."""
    folder = Path(folder)
    require_onnxruntime()
    export = read_export_folder(folder)
    return onnx_captioner(export, export.meta, f"{folder}'s {METADATA_FILE}", threads=threads)
