"""The public API: :class:`Captioner` = encoder + decoder + vocabulary + preprocessing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from captioner.caption_rules import CaptionRules, RuleMasks
from captioner.checkpoint import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from captioner.confidence import ConfidenceModel, ConfidenceModelError, image_statistics
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.decoder import CaptionDecoder
from captioner.decoding import DecodingOptions, Hypothesis, check_options_apply, constrained_beam_search, decode
from captioner.encoders import ImageEncoder, build_encoder, default_chunk_size, file_sha256
from captioner.errors import CaptionerError, one_line
from captioner.guidance import DEFAULT_POLICY, GuidancePolicy, required_words
from captioner.tags import Tag, tags_from_probabilities
from captioner.transforms import DEFAULT_MAX_PIXELS, ImageSource, Preprocess, preprocess_images, to_tensor
from captioner.vocab import Vocabulary
from captioner.vocabulary_extension import VocabularyExtension, VocabularyExtensionError

BACKENDS = ("torch", "onnxruntime")
BACKEND_CHOICES = ("auto", *BACKENDS)
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "default.pt"


@dataclass
class Caption:
    text: str  # the caption as a sentence of lower-case words
    tokens: list[str]  # its words
    log_prob: float  # model log-probability of the words and the end token
    score: float  # ranking score (length-normalised for beam search)
    attention: list[list[float]] | None = None  # per word, weights over the h*w feature grid
    # Calibrated probability that the caption is acceptable (captioner.confidence); None: the model has no
    # confidence model (see ``captioner calibrate``)
    confidence: float | None = None


@dataclass
class CaptionResult:
    captions: list[Caption]  # best first; empty when abstained
    attention_shape: tuple[int, int] | None = None  # (h, w) of the grid the attention weights cover
    # Softmax of the encoder's ImageNet-1k head, (1000,) float32, from the same encoder pass as the captions;
    # None when the encoder has no known head (see ImageEncoder). Left out of ==: an array has no single truth value.
    class_probabilities: np.ndarray | None = field(default=None, compare=False)
    tags: list[Tag] = field(default_factory=list)  # what the image shows, strongest first (captioner.tags)
    # True when every caption's confidence fell below DecodingOptions.min_confidence: no captions, tags kept
    abstained: bool = False


class ConfidenceUnavailableError(CaptionerError, ValueError):
    """``min_confidence`` was asked of a model without a confidence model."""


class TagsUnavailableError(CaptionerError, ValueError):
    """``guided_by_tags`` was asked without the encoder's ImageNet logits to take the tags from."""


def class_probabilities(class_logits: torch.Tensor | None, count: int) -> list[np.ndarray | None]:
    """Per image, the softmax of its ImageNet-1k logits ``(B, 1000)`` as float32 numpy (both backends' logits
    arrive as torch tensors), or ``count`` Nones when there are none."""
    if class_logits is None:
        return [None] * count
    probabilities = torch.softmax(class_logits.float(), dim=-1).cpu().numpy()  # (B, 1000)
    return list(probabilities)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu")
    return device


def default_checkpoint() -> Path:
    """The bundled default model's file; :class:`CheckpointError` when this install has none."""
    if not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError("no default model is bundled with this install; pass a checkpoint path")
    return DEFAULT_CHECKPOINT


def model_id(checkpoint: str | os.PathLike | None) -> str:
    """The id a model is served and its captions recorded under: the checkpoint's name and the first 12 hex digits
    of its sha256 (of an ONNX export folder: of its metadata file); ``None`` is the bundled model."""
    from captioner.onnx_export import METADATA_FILE  # the loader's known cycle with the ONNX modules (issue 25)

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    sha256 = file_sha256(path / METADATA_FILE if path.is_dir() else path)
    return f"{path.stem}-{sha256[:12]}"


def resolve_backend(backend: str, device: str | torch.device | None = "cpu") -> str:
    """``auto``: onnxruntime when the model runs on CPU and onnxruntime is installed, else torch."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_CHOICES)}")
    if backend != "auto":
        return backend
    from captioner.onnx_backend import onnxruntime_available

    return "onnxruntime" if resolve_device(device).type == "cpu" and onnxruntime_available() else "torch"


class Captioner(nn.Module):
    """Caption PIL images (or bytes / paths) with greedy, sampled or beam-search decoding."""

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
        super().__init__()
        if decoder.config.vocab_size != len(vocab):
            raise ValueError(f"decoder vocab_size {decoder.config.vocab_size} != vocabulary size {len(vocab)}")
        if decoder.config.feature_dim != encoder.feature_dim:
            raise ValueError(f"decoder feature_dim {decoder.config.feature_dim} != encoder's {encoder.feature_dim}")
        self.encoder = encoder
        self.decoder = decoder
        self.vocab = vocab
        self.metadata = dict(metadata or {})
        # Where captions may start and end, learned from the training captions (captioner.caption_rules);
        # None (checkpoints from before them): decoding is unconstrained. Set it to None to decode without.
        self.caption_rules = caption_rules
        # Turns each caption's signals into a calibrated confidence (captioner.confidence); None: captions
        # answer confidence None and min_confidence is refused. Fitted by ``captioner calibrate``.
        self.confidence_model = confidence_model
        # Words added after training, each with a known word's weights, that only tag guidance may produce
        # (captioner.vocabulary_extension); None: every word is the model's own.
        self.vocabulary_extension = vocabulary_extension
        # Images per encoder pass; None: encoders.default_chunk_size (a few at a time on CPU, all on GPU).
        self.encoder_chunk_size: int | None = None
        self.backend = "torch"  # or "onnxruntime": see from_checkpoint and captioner.onnx_backend
        self.export_dir: Path | None = None  # the ONNX export the onnxruntime backend runs
        self.export_parameters = 0  # parameter count recorded by that export

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
    def preprocess_config(self) -> Preprocess:
        return self.encoder.preprocess

    @property
    def device(self) -> torch.device:
        if self.backend != "torch":
            return torch.device("cpu")
        return next(self.decoder.parameters()).device

    def parameter_count(self) -> int:
        if self.backend != "torch":
            return self.export_parameters
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = "cpu",
        backend: str = "torch",
    ) -> Captioner:
        """Load a model (``None``: the bundled default) onto ``device`` in eval mode.

        ``backend="torch"`` reads a ``.pt`` checkpoint. ``backend="onnxruntime"`` (CPU only; the ``onnx``
        extra) runs an ONNX export (``captioner export CHECKPOINT DIR --format onnx``): ``path`` may be
        such a folder, or a ``.pt`` checkpoint, exported on first use into a cache keyed by its sha256
        (see :mod:`captioner.onnx_backend`). ``backend="auto"``: :func:`resolve_backend`.
        """
        if backend == "auto" and path is not None and Path(path).is_dir():
            backend = "onnxruntime"  # an export folder only runs there
        backend = resolve_backend(backend, device)
        if backend == "onnxruntime":
            if device is not None and str(device) != "auto" and torch.device(device).type != "cpu":
                raise ValueError("the onnxruntime backend runs on CPU; use backend 'torch' for CUDA")
            from captioner.onnx_backend import load_onnx_captioner

            return load_onnx_captioner(path).eval()
        path = default_checkpoint() if path is None else path
        from captioner.onnx_backend import is_export_dir

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
        if self.backend != "torch":
            raise RuntimeError(f"a model on the {self.backend} backend cannot be saved: save the PyTorch checkpoint")
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

    # -- inference --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[ImageSource], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Images -> pixel batch ``(B, 3, S, S)`` exactly as the model was trained on."""
        return preprocess_images(images, self.preprocess_config, max_pixels=max_pixels)

    def crops_to_pixels(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        """Crops made by ``transforms.resize_crop`` -> the normalised batch ``(B, 3, S, S)``."""
        return to_tensor(crops, self.preprocess_config)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, S, S)`` -> feature grids ``(B, C, h, w)``, :attr:`encoder_chunk_size` images per pass."""
        pixels = pixels.to(self.device)
        chunk_size = self.encoder_chunk_size or default_chunk_size(pixels.device)
        return self.encoder.forward_features(pixels, chunk_size=chunk_size)

    @torch.inference_mode()
    def encode_with_class_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like :meth:`encode`, with the ImageNet-1k logits ``(B, 1000)`` of the same pass (None without a head)."""
        pixels = pixels.to(self.device)
        chunk_size = self.encoder_chunk_size or default_chunk_size(pixels.device)
        return self.encoder.forward_features_and_logits(pixels, chunk_size=chunk_size)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[CaptionResult]:
        """Caption an already preprocessed batch ``(B, 3, S, S)``, with each image's class probabilities."""
        grid, class_logits = self.encode_with_class_logits(pixels)  # (B, C, h, w), (B, 1000) or None
        return self.caption_features(grid, options, class_logits=class_logits)

    @torch.inference_mode()
    def caption_features(
        self, grid: torch.Tensor, options: DecodingOptions, *, class_logits: torch.Tensor | None = None
    ) -> list[CaptionResult]:
        """Caption encoder feature grids ``(B, C, h, w)`` (e.g. from a feature cache); ``class_logits`` ``(B, 1000)``
        from the same pass (:meth:`encode_with_class_logits`) give each result its class probabilities."""
        self.check_options(options)
        grid = grid.to(self.device)
        shape = (grid.shape[2], grid.shape[3]) if self.decoder.config.attention else None
        hypotheses = decode(self.decoder, grid, options, self.rule_masks())
        probabilities = class_probabilities(class_logits, len(hypotheses))
        confidences = self._confidences(grid, hypotheses, probabilities)
        tags = [tags_from_probabilities(p) if p is not None else [] for p in probabilities]
        if options.guided_by_tags:
            if class_logits is None:
                raise TagsUnavailableError(
                    "guided_by_tags needs the encoder's ImageNet head logits, which this model or call lacks"
                )
            if self._guide(grid, options, hypotheses, tags, confidences):
                confidences = self._confidences(grid, hypotheses, probabilities)
        results = []
        for hyps, p, image_tags, sure in zip(hypotheses, probabilities, tags, confidences, strict=True):
            captions = [self._to_caption(h, c) for h, c in zip(hyps, sure, strict=True)]
            kept = [c for c in captions if c.confidence is None or c.confidence >= options.min_confidence]
            results.append(CaptionResult(kept, shape, p, image_tags, abstained=not kept))
        return results

    def _guide(
        self,
        grid: torch.Tensor,
        options: DecodingOptions,
        hypotheses: list[list[Hypothesis]],
        tags: list[list[Tag]],
        confidences: list[list[float | None]],
        policy: GuidancePolicy = DEFAULT_POLICY,
    ) -> bool:
        """Replace, in place, the plain beams of the images :mod:`captioner.guidance` picks by constrained beams that
        name a confident tag (where such a complete caption exists); True when any image was re-decoded."""
        required = torch.zeros(len(hypotheses), len(self.vocab), dtype=torch.bool)  # (B, V)
        for i, (hyps, image_tags, sure) in enumerate(zip(hypotheses, tags, confidences, strict=True)):
            words = required_words(image_tags, self.vocab.decode_tokens(hyps[0].tokens), sure[0], self.vocab, policy)
            required[i, [self.vocab.token_id(word) for word in words]] = True
        picked = required.any(dim=1).nonzero().view(-1).tolist()
        if not picked:
            return False
        index = torch.tensor(picked, device=grid.device)
        guided = constrained_beam_search(
            self.decoder, grid.index_select(0, index), options, required[picked], self.rule_masks()
        )
        for i, found in zip(picked, guided, strict=True):
            if found is not None:  # else no complete caption could name the tag: the plain one stays
                hypotheses[i] = found
        return True

    def check_options(self, options: DecodingOptions) -> None:
        """Raise :class:`ConfidenceUnavailableError` when ``options`` ask for what this model cannot give
        (``min_confidence`` without a confidence model). Captioning checks it on every batch; front ends call it
        once after loading, so a bulk run is refused before it opens its output or reads a photo."""
        if options.min_confidence > 0 and self.confidence_model is None:
            raise ConfidenceUnavailableError(
                "min_confidence needs a model with a confidence calibration, and this one has none "
                "(add one with `captioner calibrate`)"
            )

    def _confidences(
        self, grid: torch.Tensor, hypotheses: list[list[Hypothesis]], probabilities: list[np.ndarray | None]
    ) -> list[list[float | None]]:
        """Each hypothesis's calibrated confidence (all None without a confidence model)."""
        if self.confidence_model is None:
            return [[None] * len(hyps) for hyps in hypotheses]
        pooled = grid.float().mean(dim=(2, 3)).cpu().numpy()  # (B, C)
        images = image_statistics(self.confidence_model.reference, pooled, probabilities)
        return [
            list(self.confidence_model.confidences([(h.log_prob, len(h.tokens)) for h in hyps], [image] * len(hyps)))
            for hyps, image in zip(hypotheses, images, strict=True)
        ]

    def rule_masks(self) -> RuleMasks | None:
        """:attr:`caption_rules` and the locked words of :attr:`vocabulary_extension` compiled for this vocabulary on
        this device (cached), or None when there are neither."""
        if self.caption_rules is None and not self.vocabulary_extension:
            return None
        key = (self.caption_rules, self.vocabulary_extension, len(self.vocab), str(self.device))
        if getattr(self, "_rule_masks_key", None) != key:
            rules = self.caption_rules if self.caption_rules is not None else CaptionRules.none()
            locked = self.vocabulary_extension.locked_mask(self.vocab) if self.vocabulary_extension else None
            self._rule_masks = rules.compile(self.vocab, self.device, locked)
            self._rule_masks_key = key
        return self._rule_masks

    def caption(
        self,
        images: Sequence[ImageSource] | ImageSource,
        options: DecodingOptions | None = None,
        **kwargs: Any,
    ) -> list[CaptionResult]:
        """Caption images; pass a :class:`DecodingOptions` or its fields (``method="beam", beam_size=5``)."""
        if options is None:
            options = DecodingOptions(**kwargs)
            check_options_apply(options.method, kwargs)  # method="sample", beam_size=3: refused, whatever the value
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        if not isinstance(images, list | tuple):
            images = [cast(ImageSource, images)]  # one image (a path given as str is a Sequence too)
        self.eval()
        return self.caption_pixels(self.preprocess(images), options)

    def _to_caption(self, hyp: Hypothesis, confidence: float | None = None) -> Caption:
        words = self.vocab.decode_tokens(hyp.tokens)
        attention = hyp.attention.tolist() if hyp.attention is not None else None
        return Caption(" ".join(words), words, hyp.log_prob, hyp.score, attention, confidence)


def confidence_model_from(described: dict[str, Any], source: str, feature_dim: int) -> ConfidenceModel | None:
    """The confidence model a checkpoint (or an export's metadata) carries, checked against the encoder;
    None when it has none (checkpoints from before confidence)."""
    stored = described.get("confidence_model")
    if stored is None:
        return None
    try:
        confidence = ConfidenceModel.from_dict(stored)
    except ConfidenceModelError as error:
        raise CheckpointError(f"{source}: {error}") from error
    if confidence.reference.feature_dim != feature_dim:
        raise CheckpointError(
            f"{source}: the confidence model was fitted on {confidence.reference.feature_dim}-d features, "
            f"the encoder gives {feature_dim}"
        )
    return confidence


def vocabulary_extension_from(described: dict[str, Any], source: str, vocab: Vocabulary) -> VocabularyExtension | None:
    """The vocabulary extension a checkpoint (or an export's metadata) carries, checked against its vocabulary;
    None when it has none."""
    stored = described.get("vocabulary_extension")
    if not stored:
        return None
    try:
        extension = VocabularyExtension.from_dict(stored)
    except VocabularyExtensionError as error:
        raise CheckpointError(f"{source}: {error}") from error
    strays = [word for word in (*extension.sources, *extension.sources.values()) if word not in vocab]
    if strays:
        raise CheckpointError(f"{source}: the vocabulary extension names words the vocabulary lacks: {strays[:5]}")
    return extension
