"""Caption confidence: a calibrated probability that a caption is acceptable, from signals the model already has.

A :class:`ConfidenceModel` is fitted once on held-out captions (``training.calibration``, ``captioner calibrate``)
and travels in the checkpoint and the ONNX export as plain numbers (:meth:`ConfidenceModel.to_dict`). At
inference it needs, per caption, what every decoding method returns, and per image, what the encoder pass the
captions come from already computed:

- ``mean_log_prob``: the caption's log-probability per predicted token (its words and the end token): how sure
  the decoder was of each word;
- ``words``: the caption's length in words;
- ``feature_distance``: how far the image's pooled encoder features (L2-normalised) lie from the photos the
  model was trained on, as the mean squared Mahalanobis coordinate over the top principal components of the
  training photos' features, plus the share of the vector outside them (the reconstruction residual);
- ``tag_entropy``: the entropy of the ImageNet head's softmax (a photo the head cannot name spreads it out).

Each signal is standardised with the fitting set's mean and spread, and a logistic regression over them gives
the probability of the fitted target (e.g. "per-image CIDEr-D >= 0.5"; :attr:`ConfidenceModel.target` says
which). numpy only: either runtime computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIGNALS = ("mean_log_prob", "words", "feature_distance", "feature_residual", "tag_entropy")
FORMAT_VERSION = 1


class ConfidenceModelError(ValueError):
    """A stored confidence model is malformed or does not fit this model."""


@dataclass(frozen=True)
class ImageStatistics:
    """What the confidence needs from one image's encoder pass."""

    feature_distance: float  # mean squared Mahalanobis coordinate in the training photos' principal subspace
    feature_residual: float  # squared norm of the normalised features outside that subspace
    tag_entropy: float | None  # entropy (nats) of the ImageNet head's softmax; None without a head


@dataclass(frozen=True, eq=False)
class FeatureReference:
    """The training photos' pooled features, summarised: their mean and top principal directions (of the
    L2-normalised vectors), and the variance along each. ``distance`` of a new image is a Mahalanobis distance
    restricted to those directions; ``residual`` what the directions do not explain."""

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
        """From the pooled features ``(N, C)`` of training photos (N well above ``components``)."""
        x = _normalised(np.asarray(pooled, dtype=np.float64))
        if x.shape[0] <= components:
            raise ValueError(
                f"need more than {components} training photos to fit the feature reference, got {x.shape[0]}"
            )
        mean = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        variances = singular[:components] ** 2 / (x.shape[0] - 1)
        return cls(mean.astype(np.float32), vt[:components].astype(np.float32), variances.astype(np.float32))

    def distances(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` pooled features -> (mean squared Mahalanobis coordinate, squared residual), each ``(N,)``."""
        x = _normalised(np.asarray(pooled, dtype=np.float64)) - self.mean
        coords = x @ self.components.T.astype(np.float64)  # (N, k)
        distance = (coords**2 / self.variances).mean(axis=1)
        residual = np.maximum((x**2).sum(axis=1) - (coords**2).sum(axis=1), 0.0)
        return distance, residual

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
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ConfidenceModelError):
                raise
            raise ConfidenceModelError(f"feature reference is malformed: {error}") from error


def image_statistics(
    reference: FeatureReference, pooled: np.ndarray, class_probabilities: Sequence[np.ndarray | None]
) -> list[ImageStatistics]:
    """Per image, from its pooled features ``(N, C)`` and its ImageNet softmax (or None)."""
    distance, residual = reference.distances(pooled)
    return [
        ImageStatistics(float(d), float(r), _entropy(p) if p is not None else None)
        for d, r, p in zip(distance, residual, class_probabilities, strict=True)
    ]


@dataclass(frozen=True, eq=False)
class ConfidenceModel:
    """Logistic regression over standardised :data:`SIGNALS`, and the feature reference one of them needs."""

    signals: tuple[str, ...]  # which of SIGNALS, in the order of the weights
    center: np.ndarray  # (S,) the fitting set's mean of each signal
    scale: np.ndarray  # (S,) and its standard deviation (> 0)
    weights: np.ndarray  # (S,) logistic weights on the standardised signals
    bias: float
    reference: FeatureReference
    target: str  # what the probability is of, in words: "per-image CIDEr-D >= 0.5 (Flickr8k dev references)"
    fitted_on: dict[str, Any] = field(default_factory=dict)  # data, counts, decoding options, fit figures

    def __post_init__(self) -> None:
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown or not self.signals:
            raise ConfidenceModelError(f"unknown confidence signals {unknown}; expected some of {', '.join(SIGNALS)}")
        n = len(self.signals)
        if any(a.shape != (n,) for a in (self.center, self.scale, self.weights)):
            raise ConfidenceModelError(f"confidence model: center, scale and weights need {n} values each")
        if not (np.all(np.isfinite(self.center)) and np.all(self.scale > 0) and np.all(np.isfinite(self.weights))):
            raise ConfidenceModelError("confidence model: values must be finite and scales positive")
        if not math.isfinite(self.bias):
            raise ConfidenceModelError("confidence model: bias must be finite")

    @property
    def needs_class_head(self) -> bool:
        return "tag_entropy" in self.signals

    def signal_matrix(self, captions: Sequence[tuple[float, int]], images: Sequence[ImageStatistics]) -> np.ndarray:
        """``(N, S)`` raw signals of captions given as (log_prob, words), each with its image's statistics."""
        rows = []
        for (log_prob, words), image in zip(captions, images, strict=True):
            values = {
                "mean_log_prob": log_prob / (words + 1),  # per predicted token: the words and <end>
                "words": float(words),
                "feature_distance": image.feature_distance,
                "feature_residual": image.feature_residual,
                "tag_entropy": image.tag_entropy,
            }
            if values["tag_entropy"] is None and self.needs_class_head:
                raise ConfidenceModelError(
                    "this confidence model needs the encoder's ImageNet head, which the model lacks"
                )
            rows.append([values[s] for s in self.signals])
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(self.signals))

    def probabilities(self, signals: np.ndarray) -> np.ndarray:
        """``(N, S)`` raw signals -> ``(N,)`` probabilities in [0, 1]."""
        z = (signals - self.center) / self.scale @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def confidences(self, captions: Sequence[tuple[float, int]], images: Sequence[ImageStatistics]) -> list[float]:
        return [float(p) for p in self.probabilities(self.signal_matrix(captions, images))]

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: storable in a checkpoint (``weights_only``) and in an export's JSON."""
        return {
            "format_version": FORMAT_VERSION,
            "signals": list(self.signals),
            "center": _floats(self.center),
            "scale": _floats(self.scale),
            "weights": _floats(self.weights),
            "bias": float(self.bias),
            "reference": self.reference.to_dict(),
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
                tuple(str(s) for s in data["signals"]),
                np.asarray(data["center"], dtype=np.float64),
                np.asarray(data["scale"], dtype=np.float64),
                np.asarray(data["weights"], dtype=np.float64),
                float(data["bias"]),
                FeatureReference.from_dict(data["reference"]),
                str(data["target"]),
                dict(data.get("fitted_on") or {}),
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


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]
