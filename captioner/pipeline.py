"""Captioning from images to results, the same for every backend: :class:`CaptionPipeline`.

Preprocessing (numpy), decoding (:mod:`captioner.decoding`, written once over the array API), caption rules,
confidence, tags, tag guidance and abstention live here, on arrays of whichever kind the backend computes: torch
tensors for :class:`captioner.model.Captioner` (training, CUDA), numpy arrays for
:class:`captioner.onnx_model.OnnxCaptioner` (ONNX Runtime; no torch installed). A backend supplies the encoder,
the decoder (:class:`~captioner.decoding.StepDecoder`) and how arrays reach its device. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from PIL import Image

from captioner.arrays import Array, array_namespace, convert_like, softmax, to_numpy
from captioner.caption_rules import CaptionRules, RuleMasks
from captioner.confidence import ConfidenceModel, ConfidenceModelError, image_statistics
from captioner.config import ModelConfig
from captioner.decoding import (
    DecodingOptions,
    Hypothesis,
    StepDecoder,
    check_options_apply,
    constrained_beam_search,
    decode,
)
from captioner.errors import CaptionerError, CheckpointError
from captioner.guidance import DEFAULT_POLICY, GuidancePolicy, required_words
from captioner.results import Caption, CaptionResult
from captioner.tags import Tag, tags_from_probabilities
from captioner.transforms import DEFAULT_MAX_PIXELS, ImageSource, Preprocess, crops_to_array, preprocess_images
from captioner.vocab import Vocabulary
from captioner.vocabulary_extension import VocabularyExtension, VocabularyExtensionError

BACKENDS = ("torch", "onnxruntime")


class ConfidenceUnavailableError(CaptionerError, ValueError):
    """``min_confidence`` was asked of a model without a confidence model."""


class TagsUnavailableError(CaptionerError, ValueError):
    """``guided_by_tags`` was asked without the encoder's ImageNet logits to take the tags from."""


class ImageEncoderLike(Protocol):
    """What captioning needs of an encoder (``ImageEncoder``, torch; ``OnnxEncoder``, ONNX Runtime)."""

    name: str
    feature_dim: int
    preprocess: Preprocess

    @property
    def has_class_head(self) -> bool:
        """Whether it computes the ImageNet-1k logits (what tags and tag guidance read)."""
        ...

    def forward_features_and_logits(self, images: Any, *, chunk_size: int | None = None) -> tuple[Any, Any | None]:
        """Pixels ``(B, 3, S, S)`` -> feature grids ``(B, C, h, w)`` and ImageNet-1k logits (None without a head)."""
        ...

    def identity(self) -> dict[str, Any]:
        """Its name and weights, as a checkpoint records them."""
        ...


def class_probabilities(class_logits: Array | None, count: int) -> list[np.ndarray | None]:
    """Per image, the softmax of its ImageNet-1k logits ``(B, 1000)`` (a torch tensor or a numpy array) as float32
    numpy, or ``count`` Nones when there are none."""
    if class_logits is None:
        return [None] * count
    xp = array_namespace(class_logits)
    probabilities = to_numpy(softmax(xp.astype(class_logits, xp.float32)))  # (B, 1000)
    return list(probabilities)


def pooled_features(grid: Array) -> np.ndarray:
    """The grids ``(B, C, h, w)`` averaged over their cells, ``(B, C)`` float32 numpy: what the confidence model
    reads (:mod:`captioner.confidence`), computed alike when it is fitted and when it is used."""
    xp = array_namespace(grid)
    return to_numpy(xp.mean(xp.astype(grid, xp.float32), axis=(2, 3)))


class CaptionPipeline:
    """Caption PIL images (or bytes / paths) with greedy, sampled or beam-search decoding, on any backend.

    Subclasses set :attr:`encoder`, :attr:`decoder` and :attr:`vocab` (through :meth:`_init_pipeline`) and say
    how pixels are encoded (:meth:`encode_with_class_logits`) and how arrays reach the backend (:meth:`on_backend`).
    """

    backend: str
    encoder: ImageEncoderLike
    decoder: StepDecoder

    def _init_pipeline(
        self,
        vocab: Vocabulary,
        *,
        metadata: dict[str, Any] | None,
        caption_rules: CaptionRules | None,
        confidence_model: ConfidenceModel | None,
        vocabulary_extension: VocabularyExtension | None,
    ) -> None:
        if self.decoder.config.vocab_size != len(vocab):
            raise ValueError(f"decoder vocab_size {self.decoder.config.vocab_size} != vocabulary size {len(vocab)}")
        if self.decoder.config.feature_dim != self.encoder.feature_dim:
            feature_dim = self.encoder.feature_dim
            raise ValueError(f"decoder feature_dim {self.decoder.config.feature_dim} != encoder's {feature_dim}")
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
        # Images per encoder pass; None: the backend's default (a few at a time on CPU, all on GPU).
        self.encoder_chunk_size: int | None = None
        self.export_dir: Path | None = None  # the ONNX export the onnxruntime backend runs

    # -- what a backend supplies ---------------------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        """The model's configuration (encoder and decoder)."""
        raise NotImplementedError

    @property
    def device(self) -> Any:
        """Where the model runs (``torch.device`` for the torch model, ``"cpu"`` for ONNX Runtime)."""
        raise NotImplementedError

    def encode_with_class_logits(self, pixels: Array) -> tuple[Array, Array | None]:
        """Pixels ``(B, 3, S, S)`` -> feature grids ``(B, C, h, w)`` and the ImageNet-1k logits ``(B, 1000)`` of the
        same pass (None without a head), as this backend's arrays."""
        raise NotImplementedError

    def on_backend(self, array: Array) -> Array:
        """``array`` as this backend's kind of array, on its device."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        raise NotImplementedError

    # -- inference --------------------------------------------------------------------------------

    @property
    def preprocess_config(self) -> Preprocess:
        return self.encoder.preprocess

    def preprocess(self, images: Sequence[ImageSource], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Array:
        """Images -> pixel batch ``(B, 3, S, S)`` exactly as the model was trained on, as this backend's arrays."""
        return self.on_backend(preprocess_images(images, self.preprocess_config, max_pixels=max_pixels))

    def crops_to_pixels(self, crops: Sequence[Image.Image]) -> Array:
        """Crops made by ``transforms.resize_crop`` -> the normalised batch ``(B, 3, S, S)``."""
        return self.on_backend(crops_to_array(crops, self.preprocess_config))

    def encode(self, pixels: Array) -> Array:
        """Pixels ``(B, 3, S, S)`` -> feature grids ``(B, C, h, w)``."""
        return self.encode_with_class_logits(pixels)[0]

    def caption_pixels(self, pixels: Array, options: DecodingOptions) -> list[CaptionResult]:
        """Caption an already preprocessed batch ``(B, 3, S, S)``, with each image's class probabilities."""
        grid, class_logits = self.encode_with_class_logits(pixels)  # (B, C, h, w), (B, 1000) or None
        return self.caption_features(grid, options, class_logits=class_logits)

    def caption_features(
        self,
        grid: Array,
        options: DecodingOptions,
        *,
        class_logits: Array | None = None,
        guidance: GuidancePolicy = DEFAULT_POLICY,
    ) -> list[CaptionResult]:
        """Caption encoder feature grids ``(B, C, h, w)`` (e.g. from a feature cache); ``class_logits`` ``(B, 1000)``
        from the same pass (:meth:`encode_with_class_logits`) give each result its class probabilities.
        ``guidance``: when ``options.guided_by_tags`` fires (its thresholds; the default was chosen on Flickr8k dev,
        other values are for measuring it, as ``bench/novel_objects.py`` does)."""
        self.check_options(options)
        grid = self.on_backend(grid)
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
            if self._guide(grid, options, hypotheses, tags, confidences, guidance):
                confidences = self._confidences(grid, hypotheses, probabilities)
        results = []
        for hyps, p, image_tags, sure in zip(hypotheses, probabilities, tags, confidences, strict=True):
            captions = [self._to_caption(h, c) for h, c in zip(hyps, sure, strict=True)]
            kept = [c for c in captions if c.confidence is None or c.confidence >= options.min_confidence]
            results.append(CaptionResult(kept, shape, p, image_tags, abstained=not kept))
        return results

    def _guide(
        self,
        grid: Array,
        options: DecodingOptions,
        hypotheses: list[list[Hypothesis]],
        tags: list[list[Tag]],
        confidences: list[list[float | None]],
        policy: GuidancePolicy,
    ) -> bool:
        """Replace, in place, the plain beams of the images :mod:`captioner.guidance` picks by constrained beams that
        name a confident tag (where such a complete caption exists); True when any image was re-decoded."""
        required = np.zeros((len(hypotheses), len(self.vocab)), dtype=bool)  # (B, V)
        for i, (hyps, image_tags, sure) in enumerate(zip(hypotheses, tags, confidences, strict=True)):
            words = required_words(image_tags, self.vocab.decode_tokens(hyps[0].tokens), sure[0], self.vocab, policy)
            required[i, [self.vocab.token_id(word) for word in words]] = True
        picked = np.flatnonzero(required.any(axis=1)).tolist()
        if not picked:
            return False
        xp = array_namespace(grid)
        index = convert_like(np.asarray(picked, dtype=np.int64), grid)
        guided = constrained_beam_search(
            self.decoder, xp.take(grid, index, axis=0), options, required[picked], self.rule_masks()
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
        self, grid: Array, hypotheses: list[list[Hypothesis]], probabilities: list[np.ndarray | None]
    ) -> list[list[float | None]]:
        """Each hypothesis's calibrated confidence (all None without a confidence model)."""
        if self.confidence_model is None:
            return [[None] * len(hyps) for hyps in hypotheses]
        images = image_statistics(self.confidence_model.reference, pooled_features(grid), probabilities)
        return [
            list(self.confidence_model.confidences([(h.log_prob, len(h.tokens)) for h in hyps], [image] * len(hyps)))
            for hyps, image in zip(hypotheses, images, strict=True)
        ]

    def rule_masks(self) -> RuleMasks | None:
        """:attr:`caption_rules` and the locked words of :attr:`vocabulary_extension` compiled for this vocabulary,
        as this backend's arrays on its device (cached), or None when there are neither."""
        if self.caption_rules is None and not self.vocabulary_extension:
            return None
        key = (self.caption_rules, self.vocabulary_extension, len(self.vocab), str(self.device))
        if getattr(self, "_rule_masks_key", None) != key:
            rules = self.caption_rules if self.caption_rules is not None else CaptionRules.none()
            locked = self.vocabulary_extension.locked_mask(self.vocab) if self.vocabulary_extension else None
            probe = self.on_backend(np.zeros(0, dtype=np.float32))  # an array of the backend's kind, on its device
            self._rule_masks = rules.compile(self.vocab, locked).like(probe)
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

    def optimize_for_inference(self) -> Any:
        """Make inference faster where the backend can (the torch model folds its encoder's BatchNorm layers; an
        ONNX export's encoder is fused already). Returns the model."""
        return self

    def eval(self) -> Any:
        """Inference mode (torch's ``nn.Module.eval`` for the torch model, which comes first in its MRO)."""
        return self

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
