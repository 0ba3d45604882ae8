"""The PyTorch model: :class:`Captioner` = encoder + decoder + vocabulary + preprocessing, trainable, on CPU or CUDA.

Captioning itself (decoding, rules, confidence, tags, guidance) is :class:`~captioner.pipeline.CaptionPipeline`'s,
shared with the ONNX Runtime backend (:class:`~captioner.onnx_model.OnnxCaptioner`); this module adds what needs
torch: building, loading and saving checkpoints, devices, and exporting a checkpoint for ONNX Runtime on first use.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from captioner.arrays import Array, convert_like
from captioner.backends import BACKEND_CHOICES, BACKENDS, backend_for, resolve_backend
from captioner.caption_rules import CaptionRules
from captioner.checkpoint import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from captioner.confidence import ConfidenceModel
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.decoder import CaptionDecoder
from captioner.default_model import DEFAULT_CHECKPOINT, default_checkpoint, model_id
from captioner.encoders import ImageEncoder, build_encoder, default_chunk_size
from captioner.errors import one_line
from captioner.export_cache import ensure_exported
from captioner.export_format import is_export_dir
from captioner.guidance import DEFAULT_POLICY, GuidancePolicy
from captioner.onnx_backend import require_onnxruntime
from captioner.onnx_model import OnnxCaptioner, load_export, onnx_captioner
from captioner.pipeline import (
    CaptionPipeline,
    ConfidenceUnavailableError,
    TagsUnavailableError,
    class_probabilities,
    confidence_model_from,
    vocabulary_extension_from,
)
from captioner.results import Caption, CaptionResult
from captioner.transforms import Preprocess
from captioner.vocab import Vocabulary
from captioner.vocabulary_extension import VocabularyExtension

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "DEFAULT_CHECKPOINT",
    "Caption",
    "CaptionPipeline",
    "CaptionResult",
    "Captioner",
    "ConfidenceUnavailableError",
    "TagsUnavailableError",
    "class_probabilities",
    "confidence_model_from",
    "default_checkpoint",
    "export_checkpoint",
    "load_onnx_checkpoint",
    "model_id",
    "resolve_backend",
    "resolve_device",
    "vocabulary_extension_from",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu")
    return device


class Captioner(nn.Module, CaptionPipeline):
    """Caption PIL images (or bytes / paths) with greedy, sampled or beam-search decoding; train; save."""

    backend = "torch"
    encoder: ImageEncoder
    decoder: CaptionDecoder

    def __init__(
        self,
        encoder: ImageEncoder,
        decoder: CaptionDecoder,
        vocab: Vocabulary,
        *,
        metadata: dict[str, Any] | None = None,
        caption_rules: CaptionRules | None = None,
        confidence_model: ConfidenceModel | None = None,
        vocabulary_extension: VocabularyExtension | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.encoder = encoder
        self.decoder = decoder
        self._init_pipeline(
            vocab,
            metadata=metadata,
            caption_rules=caption_rules,
            confidence_model=confidence_model,
            vocabulary_extension=vocabulary_extension,
        )

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def build(cls, encoder: EncoderConfig, vocab: Vocabulary, **decoder_kwargs: Any) -> Captioner:
        """A new (untrained) model: ``decoder_kwargs`` are :class:`DecoderConfig` fields."""
        enc = build_encoder(encoder)
        dec = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), feature_dim=enc.feature_dim, **decoder_kwargs))
        return cls(enc, dec, vocab)

    @property
    def config(self) -> ModelConfig:
        enc = self.encoder
        return ModelConfig(EncoderConfig(enc.name, enc.weights, enc.trainable), self.decoder.config)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @overload
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = "cpu",
        backend: Literal["torch"] = "torch",
    ) -> Captioner: ...

    @overload
    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike | None = None, *, device: str | torch.device | None = "cpu", backend: str
    ) -> CaptionPipeline: ...

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = "cpu",
        backend: str = "torch",
    ) -> CaptionPipeline:
        """Load a model (``None``: the default model, :mod:`captioner.default_model`) onto ``device`` in eval mode.

        ``backend="torch"`` reads a ``.pt`` checkpoint. ``backend="onnxruntime"`` (CPU only; the ``onnx``
        extra) gives an :class:`~captioner.onnx_model.OnnxCaptioner` running an ONNX export (``captioner export
        CHECKPOINT DIR --format onnx``): ``path`` may be such a folder, or a ``.pt`` checkpoint, exported on first
        use into a cache keyed by its sha256 (:mod:`captioner.export_cache`). ``backend="auto"``:
        :func:`~captioner.backends.backend_for`.
        """
        path = default_checkpoint() if path is None else Path(path)
        if backend_for(path, backend, device) == "onnxruntime":
            return load_export(path) if is_export_dir(path) else load_onnx_checkpoint(path)
        if is_export_dir(path):
            raise CheckpointError(f"{path} is an ONNX export: load it with backend 'onnxruntime'")
        data = load_checkpoint(path)
        return cls.from_state(data, source=str(path)).to(resolve_device(device)).eval()

    @classmethod
    def from_state(cls, data: dict[str, Any], *, source: str = "checkpoint") -> Captioner:
        """Rebuild a model from an already loaded and validated checkpoint dict."""
        try:
            config = ModelConfig.from_dict(data["config"])
            vocab = Vocabulary(data["vocab"])
            identity = data["encoder"]
            encoder_state = data.get("encoder_state")
            enc_config = config.encoder
            if encoder_state is not None:  # weights travel in the file: build empty, no download
                enc_config = dataclasses.replace(enc_config, weights=None)
            encoder = build_encoder(enc_config)
            if encoder_state is not None:  # with the class head when it was saved with one
                encoder.load_encoder_state({k: v.float() for k, v in encoder_state.items()})
                encoder.weights, encoder.weights_sha256 = (
                    identity.get("weights"),
                    identity.get("weights_sha256"),
                )
            elif identity.get("weights_sha256") and identity["weights_sha256"] != encoder.weights_sha256:
                raise CheckpointError(
                    f"{source}: the installed {encoder.name} weights (sha256 {str(encoder.weights_sha256)[:12]}…) "
                    f"differ from those the model was trained with ({identity['weights_sha256'][:12]}…)"
                )
            if config.decoder is None:
                raise CheckpointError(f"{source}: the checkpoint's config has no decoder")
            decoder = CaptionDecoder(config.decoder)
            decoder.load_state_dict({k: v.float() for k, v in data["decoder_state"].items()})
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: checkpoint does not match this model code: {one_line(exc)}") from exc
        encoder.preprocess = Preprocess.from_dict(data["preprocess"])  # what the model was trained with
        rules = data.get("caption_rules")
        return cls(
            encoder,
            decoder,
            vocab,
            metadata=data.get("metadata") or {},
            caption_rules=CaptionRules.from_dict(rules) if rules else None,
            confidence_model=confidence_model_from(data, source, encoder.feature_dim),
            vocabulary_extension=vocabulary_extension_from(data, source, vocab),
        )

    def optimize_for_inference(self) -> Captioner:
        """Fold the encoder's BatchNorm layers into its convolutions (:meth:`ImageEncoder.fuse_for_inference`):
        the same captions, a ~1.4x faster encoder on CPU. For serving: the model can no longer be trained
        or saved (load the checkpoint again for that), and its fused weights no longer match a training
        run's feature cache (keyed by the weights), which evaluation reuses. Returns the model, in eval mode."""
        self.encoder.set_trainable(False)
        self.encoder.fuse_for_inference()
        return self.eval()

    def state_payload(self, *, half: bool = False, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a checkpoint holds about the model (the training loop adds its own state)."""
        if self.encoder.fused:
            raise RuntimeError("a model fused for inference cannot be saved: load the checkpoint again to save it")
        store_encoder = self.encoder.trainable or not self.encoder.from_package
        return {
            "config": self.config.to_dict(),
            "vocab": list(self.vocab.tokens),
            "preprocess": self.encoder.preprocess.to_dict(),
            "encoder": self.encoder.identity(),
            "decoder_state": clean_state_dict(self.decoder.state_dict(), half=half),
            "encoder_state": clean_state_dict(self.encoder.state_dict(), half=half) if store_encoder else None,
            "metadata": {**self.metadata, **(metadata or {})},
            "caption_rules": self.caption_rules.to_dict() if self.caption_rules is not None else None,
            "confidence_model": self.confidence_model.to_dict() if self.confidence_model is not None else None,
            "vocabulary_extension": self.vocabulary_extension.to_dict() if self.vocabulary_extension else None,
        }

    def save(self, path: str | os.PathLike, *, half: bool = False, metadata: dict[str, Any] | None = None) -> None:
        save_checkpoint(path, self.state_payload(half=half, metadata=metadata))

    # -- what the pipeline asks of a backend ------------------------------------------------------------

    def on_backend(self, array: Array) -> torch.Tensor:
        """``array`` (numpy or torch) as a tensor on this model's device."""
        return convert_like(array, torch.empty(0, device=self.device))

    @torch.inference_mode()
    def encode_with_class_logits(self, pixels: Array) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels ``(B, 3, S, S)`` -> grids ``(B, C, h, w)`` and the ImageNet-1k logits ``(B, 1000)`` of the same pass
        (None without a head), :attr:`encoder_chunk_size` images per pass."""
        pixels = self.on_backend(pixels)
        chunk_size = self.encoder_chunk_size or default_chunk_size(pixels.device)
        return self.encoder.forward_features_and_logits(pixels, chunk_size=chunk_size)

    @torch.inference_mode()
    def encode(self, pixels: Array) -> torch.Tensor:
        """Pixels ``(B, 3, S, S)`` -> feature grids ``(B, C, h, w)``, :attr:`encoder_chunk_size` images per pass."""
        pixels = self.on_backend(pixels)
        chunk_size = self.encoder_chunk_size or default_chunk_size(pixels.device)
        return self.encoder.forward_features(pixels, chunk_size=chunk_size)

    @torch.inference_mode()
    def caption_pixels(self, pixels: Array, options: Any) -> list[CaptionResult]:
        return CaptionPipeline.caption_pixels(self, pixels, options)

    @torch.inference_mode()
    def caption_features(
        self, grid: Array, options: Any, *, class_logits: Array | None = None, guidance: GuidancePolicy = DEFAULT_POLICY
    ) -> list[CaptionResult]:
        return CaptionPipeline.caption_features(self, grid, options, class_logits=class_logits, guidance=guidance)


def export_checkpoint(checkpoint: Path, sha256: str, folder: Path) -> None:
    """Export ``checkpoint`` (whose sha256 is ``sha256``) into ``folder`` for ONNX Runtime (the export cache's
    exporter, :mod:`captioner.export_cache`)."""
    from captioner.onnx_export import export_onnx

    model = Captioner.from_state(load_checkpoint(checkpoint), source=str(checkpoint))
    export_onnx(model, folder, source=str(checkpoint), source_sha256=sha256)


def load_onnx_checkpoint(path: str | os.PathLike, *, threads: int | None = None) -> OnnxCaptioner:
    """A ``.pt`` checkpoint on ONNX Runtime: its graphs from the export cache (exported on first use), everything
    it says (vocabulary, caption rules, config, preprocessing, metadata) from the checkpoint itself, so no edit to
    the cache changes what the model says."""
    require_onnxruntime()  # before exporting: the export needs it too
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    described = load_checkpoint(path)
    return onnx_captioner(ensure_exported(path, export_checkpoint), described, str(path), threads=threads)
