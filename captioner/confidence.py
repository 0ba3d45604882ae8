"""Caption confidence: a calibrated probability that a caption is acceptable, from signals the model already has.

A :class:`ConfidenceModel` is fitted once on held-out captions (``training.calibration``: ``captioner calibrate``,
and ``captioner-train`` at the end of a run) and travels in the checkpoint and the ONNX export as plain numbers
(:meth:`ConfidenceModel.to_dict`). At inference it needs, per caption, what every decoding method returns, and per
image, what the encoder pass the captions come from already computed. Two parts multiply:

1. **How good the caption is, in domain**: a logistic regression over standardised signals: the caption's
   ``mean_log_prob`` (log-probability per predicted token: its words and the end token; how sure the decoder was of
   each word), optionally ``words`` (its length), ``tag_entropy`` (of the ImageNet head's softmax),
   ``feature_distance``, and the image's first few whitened principal coordinates of its pooled features against
   the training photos (:attr:`ConfidenceModel.coordinates`: which *kind* of photo it is; the model captions some
   kinds far better than others). Fitted to a target stated in :attr:`ConfidenceModel.target`, e.g. "per-image
   CIDEr-D >= 0.5".
2. **Whether the photo is in the model's domain at all**: held-out photos never show a photo unlike every training
   photo, so the regression cannot learn what to say there. The *feature residual* (how much of the image's
   L2-normalised pooled features lies outside the training photos' top principal components) tells such photos
   apart; the confidence is scaled by ``min(1, p / alpha)``, where ``p`` is the share of held-out photos whose
   residual is at least this photo's (a conformal p-value): photos as typical as all but ``alpha`` of the held-out
   ones are untouched, farther ones lose confidence in proportion to how rare they are.

numpy only: either runtime computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captioner.errors import CaptionerError

SIGNALS = ("mean_log_prob", "words", "feature_distance", "feature_residual", "tag_entropy")
FORMAT_VERSION = 1


class ConfidenceModelError(CaptionerError, ValueError):
    """A stored confidence model is malformed or does not fit this model."""


@dataclass(frozen=True, eq=False)
class ImageStatistics:
    """What the confidence needs from one image's encoder pass."""

    coordinates: np.ndarray  # (k,) whitened principal coordinates of the normalised pooled features
    feature_residual: float  # squared norm of the normalised features outside the principal subspace
    tag_entropy: float | None  # entropy (nats) of the ImageNet head's softmax; None without a head

    @property
    def feature_distance(self) -> float:
        """Mean squared whitened coordinate: a Mahalanobis distance within the principal subspace."""
        return float(np.mean(self.coordinates**2))


@dataclass(frozen=True, eq=False)
class FeatureReference:
    """The training photos' pooled features, summarised: the mean and top principal directions of the
    L2-normalised vectors, and the variance along each."""

    mean: np.ndarray  # (C,) float32
    components: np.ndarray  # (k, C) float32, orthonormal rows
    variances: np.ndarray  # (k,) float32, > 0

    def __post_init__(self) -> None:
        c = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if c < 1 or self.components.ndim != 2 or self.components.shape[1] != c:
            raise ConfidenceModelError(
                f"feature reference: components {self.components.shape} do not fit mean {self.mean.shape}"
            )
        if self.variances.shape != (self.components.shape[0],) or not np.all(self.variances > 0):
            raise ConfidenceModelError("feature reference: need one positive variance per component")

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, pooled: np.ndarray, *, components: int = 64) -> FeatureReference:
        """From the pooled features ``(N, C)`` of training photos (N above ``components``)."""
        x = _normalised(np.asarray(pooled, dtype=np.float64))
        if x.shape[0] <= components:
            raise ValueError(f"need more than {components} photos to fit the feature reference, got {x.shape[0]}")
        mean = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        variances = np.maximum(singular[:components] ** 2 / (x.shape[0] - 1), 1e-12)
        return cls(mean.astype(np.float32), vt[:components].astype(np.float32), variances.astype(np.float32))

    def describe(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` pooled features -> whitened principal coordinates ``(N, k)`` and squared residuals ``(N,)``."""
        x = _normalised(np.asarray(pooled, dtype=np.float64)) - self.mean
        coords = x @ self.components.T.astype(np.float64)  # (N, k)
        residual = np.maximum((x**2).sum(axis=1) - (coords**2).sum(axis=1), 0.0)
        return coords / np.sqrt(self.variances.astype(np.float64)), residual

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": _floats(self.mean),
            "components": [_floats(row) for row in self.components],
            "variances": _floats(self.variances),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureReference:
        try:
            return cls(
                np.asarray(data["mean"], dtype=np.float32),
                np.asarray(data["components"], dtype=np.float32),
                np.asarray(data["variances"], dtype=np.float32),
            )
        except ConfidenceModelError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ConfidenceModelError(f"feature reference is malformed: {error}") from error


def image_statistics(
    reference: FeatureReference, pooled: np.ndarray, class_probabilities: Sequence[np.ndarray | None]
) -> list[ImageStatistics]:
    """Per image, from its pooled features ``(N, C)`` and its ImageNet softmax (or None)."""
    coordinates, residual = reference.describe(pooled)
    return [
        ImageStatistics(c, float(r), _entropy(p) if p is not None else None)
        for c, r, p in zip(coordinates, residual, class_probabilities, strict=True)
    ]


@dataclass(frozen=True, eq=False)
class ConfidenceModel:
    """Logistic regression over standardised signals, times the domain factor; see the module docstring."""

    signals: tuple[str, ...]  # named signals (of SIGNALS), in the order of the first weights
    center: np.ndarray  # (S + coordinates,) the fitting set's mean of each signal
    scale: np.ndarray  # (S + coordinates,) and its standard deviation (> 0)
    weights: np.ndarray  # (S + coordinates,) logistic weights on the standardised signals
    bias: float
    reference: FeatureReference
    target: str  # what the probability is of, in words: "per-image CIDEr-D >= 0.5 (Flickr8k dev references)"
    fitted_on: dict[str, Any] = field(default_factory=dict)  # data, counts, decoding options, fit figures
    coordinates: int = 0  # the image's first principal coordinates used as signals after the named ones
    # Feature residuals of the held-out photos, ascending (empty: no domain factor), and the share of them beyond
    # which a photo starts losing confidence
    domain_residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    domain_alpha: float = 0.02

    def __post_init__(self) -> None:
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ConfidenceModelError(f"unknown confidence signals {unknown}; expected some of {', '.join(SIGNALS)}")
        if not 0 <= self.coordinates <= self.reference.components.shape[0]:
            raise ConfidenceModelError(
                f"confidence model: {self.coordinates} coordinates, but the reference has "
                f"{self.reference.components.shape[0]} components"
            )
        n = len(self.signals) + self.coordinates
        if n == 0:
            raise ConfidenceModelError("confidence model: no signals")
        if any(a.shape != (n,) for a in (self.center, self.scale, self.weights)):
            raise ConfidenceModelError(f"confidence model: center, scale and weights need {n} values each")
        if not (np.all(np.isfinite(self.center)) and np.all(self.scale > 0) and np.all(np.isfinite(self.weights))):
            raise ConfidenceModelError("confidence model: values must be finite and scales positive")
        if not math.isfinite(self.bias) or not 0.0 < self.domain_alpha <= 1.0:
            raise ConfidenceModelError("confidence model: bias must be finite and domain_alpha in (0, 1]")
        if self.domain_residuals.ndim != 1 or np.any(np.diff(self.domain_residuals) < 0):
            raise ConfidenceModelError("confidence model: domain_residuals must be a sorted list")

    @property
    def described_signals(self) -> list[str]:
        """Everything the confidence is computed from, in words (for ``captioner info`` and the service's /model)."""
        named = list(self.signals)
        if self.coordinates:
            named.append(f"{self.coordinates} principal coordinates of the image's features")
        if self.domain_residuals.size:
            named.append(f"domain factor: feature residual against {self.domain_residuals.size} held-out photos")
        return named

    @property
    def needs_class_head(self) -> bool:
        return "tag_entropy" in self.signals

    def signal_matrix(self, captions: Sequence[tuple[float, int]], images: Sequence[ImageStatistics]) -> np.ndarray:
        """``(N, S + coordinates)`` raw signals of captions given as (log_prob, words), each with its image's
        statistics."""
        if self.needs_class_head and any(image.tag_entropy is None for image in images):
            raise ConfidenceModelError("this confidence model needs the encoder's ImageNet head, which the model lacks")
        rows = []
        for (log_prob, words), image in zip(captions, images, strict=True):
            values = {
                "mean_log_prob": log_prob / (words + 1),  # per predicted token: the words and <end>
                "words": float(words),
                "feature_distance": image.feature_distance,
                "feature_residual": image.feature_residual,
                "tag_entropy": image.tag_entropy,
            }
            rows.append([*(values[s] for s in self.signals), *image.coordinates[: self.coordinates]])
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(self.center))

    def in_domain_probabilities(self, signals: np.ndarray) -> np.ndarray:
        """``(N, S + coordinates)`` raw signals -> the regression's ``(N,)`` probabilities (part 1)."""
        z = (signals - self.center) / self.scale @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def domain_factors(self, residuals: np.ndarray) -> np.ndarray:
        """``(N,)`` feature residuals -> ``min(1, p / alpha)`` (part 2); all 1 without held-out residuals."""
        held_out = self.domain_residuals
        if held_out.size == 0:
            return np.ones(len(residuals))
        at_least = held_out.size - np.searchsorted(held_out, np.asarray(residuals, dtype=np.float64), side="left")
        p = (1.0 + at_least) / (1.0 + held_out.size)
        return np.minimum(1.0, p / self.domain_alpha)

    def confidences(self, captions: Sequence[tuple[float, int]], images: Sequence[ImageStatistics]) -> list[float]:
        """Each caption's confidence: part 1 times part 2."""
        signals = self.signal_matrix(captions, images)
        factors = self.domain_factors(np.array([image.feature_residual for image in images]))
        return [float(p) for p in self.in_domain_probabilities(signals) * factors]

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: storable in a checkpoint (``weights_only``) and in an export's JSON."""
        return {
            "format_version": FORMAT_VERSION,
            "signals": list(self.signals),
            "coordinates": self.coordinates,
            "center": _floats(self.center, np.float64),
            "scale": _floats(self.scale, np.float64),
            "weights": _floats(self.weights, np.float64),
            "bias": float(self.bias),
            "reference": self.reference.to_dict(),
            "domain_residuals": _floats(self.domain_residuals, np.float64),
            "domain_alpha": float(self.domain_alpha),
            "target": self.target,
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceModel:
        if not isinstance(data, Mapping):
            raise ConfidenceModelError("confidence model is not a mapping")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfidenceModelError(
                f"confidence model format {version!r} is not supported (this release reads {FORMAT_VERSION}); "
                "refit it with `captioner calibrate`"
            )
        try:
            return cls(
                signals=tuple(str(s) for s in data["signals"]),
                center=np.asarray(data["center"], dtype=np.float64),
                scale=np.asarray(data["scale"], dtype=np.float64),
                weights=np.asarray(data["weights"], dtype=np.float64),
                bias=float(data["bias"]),
                reference=FeatureReference.from_dict(data["reference"]),
                target=str(data["target"]),
                fitted_on=dict(data.get("fitted_on") or {}),
                coordinates=int(data.get("coordinates", 0)),
                domain_residuals=np.asarray(data.get("domain_residuals", []), dtype=np.float64).reshape(-1),
                domain_alpha=float(data.get("domain_alpha", 0.02)),
            )
        except ConfidenceModelError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ConfidenceModelError(f"confidence model is malformed: {error}") from error


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _entropy(p: np.ndarray) -> float:
    q = np.asarray(p, dtype=np.float64)
    return float(-(q * np.log(np.clip(q, 1e-12, 1.0))).sum())


def _floats(values: np.ndarray, dtype: type = np.float32) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=dtype)]
