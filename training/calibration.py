"""Fitting a model's caption confidence (:mod:`captioner.confidence`) on held-out captioned photos.

``captioner calibrate CKPT OUT --data DIR`` and the end of a ``captioner-train`` run call :func:`calibrate`:

1. the pooled encoder features of up to ``reference_photos`` training photos (a seeded sample) give the
   :class:`~captioner.confidence.FeatureReference`: what the model's photos look like;
2. every held-out (``val``) photo is captioned with the serving defaults (beam 3), and each best caption is scored
   against the photo's references with per-image CIDEr-D (document frequencies from the held-out set, as
   coco-caption computes them); the target is ``CIDEr-D >= threshold``;
3. a logistic regression (scikit-learn's, L2, ``C = regularisation``) learns the target from the standardised
   signals; the held-out photos' feature residuals become the domain factor's reference. Ten-fold
   cross-validated figures on the held-out set (log loss, calibration error, Spearman with CIDEr-D) go into
   ``fitted_on`` so the checkpoint says how well its confidence was fitted.

Never fit on the test split or on data used to judge out-of-domain behaviour: both would flatter the figures.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.confidence import ConfidenceModel, FeatureReference, image_statistics
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.model import Captioner, class_probabilities, default_checkpoint
from captioner.pipeline import CaptionPipeline, pooled_features
from captioner.progress import progress_bar
from captioner.text import tokenize
from training.corpus import CaptionCorpus, ImageRecord
from training.data import load_corpus
from training.metrics import compute_cider_d

__all__ = ["CalibrationError", "CalibrationSettings", "HeldOutCaptions", "calibrate", "expected_calibration_error"]


class CalibrationError(CaptionerError, ValueError):
    """The data cannot calibrate this model (too few photos, or every caption on one side of the target)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How the confidence is fitted; the defaults are what the bundled model's confidence was fitted with."""

    threshold: float = 0.5  # a caption is acceptable when its per-image CIDEr-D reaches this
    signals: tuple[str, ...] = ("mean_log_prob",)  # named signals (captioner.confidence.SIGNALS)
    # Whitened principal coordinates of the image features used as signals: which kind of photo it is. 8 won
    # Flickr8k dev's 10-fold log loss among 0/4/8/16/32 (0.593 against 0.616 with none)
    coordinates: int = 8
    components: int = 64  # principal directions summarising the training photos (the residual lies outside)
    reference_photos: int = 2000  # training photos sampled for the reference
    domain_alpha: float = 0.02  # photos farther out than all but this share of held-out ones lose confidence
    regularisation: float = 0.1  # inverse L2 strength of the logistic regression (scikit-learn's C)
    seed: int = 0  # which training photos are sampled
    batch_size: int = 16  # photos per encoder pass
    options: DecodingOptions = field(default_factory=DecodingOptions)  # how captions are made: the serving default

    def __post_init__(self) -> None:
        if self.coordinates > self.components:
            raise ValueError(f"coordinates ({self.coordinates}) must be <= components ({self.components})")
        if not 0.0 < self.domain_alpha <= 1.0:
            raise ValueError(f"domain_alpha must be in (0, 1], got {self.domain_alpha}")
        if self.regularisation <= 0:
            raise ValueError(f"regularisation must be > 0, got {self.regularisation}")


@dataclass
class HeldOutCaptions:
    """Every held-out photo's best caption, its per-image CIDEr-D, and the confidence signals it was given."""

    image_ids: list[str]
    captions: list[str]
    cider: np.ndarray  # (N,) per-image CIDEr-D against the photo's references
    signals: np.ndarray  # (N, S + coordinates) raw signals, as ConfidenceModel.signal_matrix gives them
    residuals: np.ndarray  # (N,) feature residuals


def calibrate(
    model: CaptionPipeline,
    corpus: CaptionCorpus,
    settings: CalibrationSettings | None = None,
    *,
    held_out_corpus: CaptionCorpus | None = None,
    progress: bool = False,
) -> tuple[ConfidenceModel, HeldOutCaptions]:
    """Fit ``model``'s confidence on the val split of ``held_out_corpus`` (default: ``corpus``); ``corpus``'s
    train split gives the feature reference."""
    settings = settings or CalibrationSettings()
    train, held_out = corpus.split("train"), (held_out_corpus or corpus).split("val")
    if len(train) <= settings.components:
        raise CalibrationError(
            f"calibration needs more than {settings.components} training photos for the feature reference, "
            f"the data has {len(train)}"
        )
    if len(held_out) < 20:
        raise CalibrationError(f"calibration needs at least 20 held-out (val) photos, the data has {len(held_out)}")
    sample = random.Random(settings.seed).sample(train, min(settings.reference_photos, len(train)))
    pooled = _pooled_features(model, sample, settings.batch_size, progress, "reference photos")
    reference = FeatureReference.fit(pooled, components=settings.components)
    scratch = ConfidenceModel(  # the signals' layout; its numbers are replaced by the fit
        signals=settings.signals,
        center=np.zeros(len(settings.signals) + settings.coordinates),
        scale=np.ones(len(settings.signals) + settings.coordinates),
        weights=np.zeros(len(settings.signals) + settings.coordinates),
        bias=0.0,
        reference=reference,
        target="",
        coordinates=settings.coordinates,
    )
    captions = _held_out_captions(model, held_out, scratch, settings, progress)
    acceptable = captions.cider >= settings.threshold
    if acceptable.all() or not acceptable.any():
        side = "reach" if acceptable.all() else "fall short of"
        raise CalibrationError(
            f"all {len(acceptable)} held-out captions {side} CIDEr-D {settings.threshold}: nothing to learn a "
            "confidence from (train the model further, or choose another --threshold)"
        )
    center, scale = captions.signals.mean(axis=0), captions.signals.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    regression = _regression(settings).fit((captions.signals - center) / scale, acceptable)
    fitted = dataclasses.replace(
        scratch,
        center=center,
        scale=scale,
        weights=regression.coef_[0].astype(np.float64),
        bias=float(regression.intercept_[0]),
        domain_residuals=np.sort(captions.residuals),
        domain_alpha=settings.domain_alpha,
        target=f"per-image CIDEr-D >= {settings.threshold} against the photo's references",
        fitted_on={
            "held_out_photos": len(held_out),
            "reference_photos": len(sample),
            "acceptable_share": round(float(acceptable.mean()), 4),
            "options": settings.options.to_dict(),
            **_cross_validated(captions, acceptable, settings),
        },
    )
    return fitted, captions


def _held_out_captions(
    model: CaptionPipeline,
    records: Sequence[ImageRecord],
    layout: ConfidenceModel,
    settings: CalibrationSettings,
    progress: bool,
) -> HeldOutCaptions:
    options = dataclasses.replace(settings.options, min_confidence=0.0)
    texts: list[str] = []
    rows: list[np.ndarray] = []
    residuals: list[float] = []
    bar = progress_bar(len(records), "held-out captions", progress)
    for start in range(0, len(records), settings.batch_size):
        batch = records[start : start + settings.batch_size]
        grid, class_logits = model.encode_with_class_logits(model.preprocess([r.path for r in batch]))
        probabilities = class_probabilities(class_logits, len(batch))
        images = image_statistics(layout.reference, pooled_features(grid), probabilities)
        best = [result.captions[0] for result in model.caption_features(grid, options, class_logits=class_logits)]
        texts += [c.text for c in best]
        rows.append(layout.signal_matrix([(c.log_prob, len(c.tokens)) for c in best], images))
        residuals += [image.feature_residual for image in images]
        bar.update(len(batch))
    bar.close()
    cider = compute_cider_d([t.split() for t in texts], [[tokenize(c) for c in r.captions] for r in records])
    return HeldOutCaptions([r.image_id for r in records], texts, cider, np.concatenate(rows), np.array(residuals))


def _pooled_features(
    model: CaptionPipeline, records: Sequence[ImageRecord], batch_size: int, progress: bool, desc: str
) -> np.ndarray:
    """Pooled encoder features ``(N, C)`` of ``records``' photos (the reference needs no class head)."""
    pooled = []
    bar = progress_bar(len(records), desc, progress)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        pooled.append(pooled_features(model.encode(model.preprocess([r.path for r in batch]))))
        bar.update(len(batch))
    bar.close()
    return np.concatenate(pooled)


def _regression(settings: CalibrationSettings) -> LogisticRegression:
    return LogisticRegression(C=settings.regularisation, max_iter=5000)


def _cross_validated(captions: HeldOutCaptions, acceptable: np.ndarray, settings: CalibrationSettings) -> dict:
    """Ten-fold (fewer for small sets) out-of-fold figures of the regression on the held-out set."""
    folds = int(min(10, acceptable.sum(), (~acceptable).sum()))
    if folds < 2:
        return {}
    x = (captions.signals - captions.signals.mean(axis=0)) / np.where(
        captions.signals.std(axis=0) > 0, captions.signals.std(axis=0), 1.0
    )
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=settings.seed)
    p = cross_val_predict(_regression(settings), x, acceptable, cv=split, method="predict_proba")[:, 1]
    return {
        "cross_validated": {
            "folds": folds,
            "log_loss": round(float(log_loss(acceptable, p)), 4),
            "calibration_error": round(expected_calibration_error(p, acceptable), 4),
            "spearman_with_cider": round(float(spearmanr(p, captions.cider).statistic), 4),
        }
    }


def expected_calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, *, bins: int = 10) -> float:
    """The share-weighted mean gap between predicted probability and observed frequency over ``bins`` equal-width
    bins of the probability (Guo et al., 2017)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(p[members].mean() - y[members].mean())
    return float(error)


def calibrate_checkpoint(
    source: str | os.PathLike | None,
    target: str,
    data: str,
    *,
    data_format: str = "auto",
    settings: CalibrationSettings | None = None,
    backend: str = "auto",
    device: str = "cpu",
    progress: bool = False,
) -> ConfidenceModel:
    """``captioner calibrate``: write ``source`` (None: the bundled model) to ``target`` as it is (weights, dtype,
    training state), with the confidence model fitted on ``data``."""
    path = default_checkpoint() if source is None else source
    stored = load_checkpoint(path)
    model = Captioner.from_checkpoint(path, backend=backend, device=device)
    corpus = load_corpus(data, format=data_format)
    confidence, _ = calibrate(model, corpus, settings, progress=progress)
    stored["confidence_model"] = confidence.to_dict()
    stored["metadata"] = {**(stored.get("metadata") or {}), "confidence_from": {"data": Path(data).name}}
    save_checkpoint(target, stored)
    return confidence
