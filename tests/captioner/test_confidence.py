"""Caption confidence (captioner.confidence) and abstention, on tiny models: the numbers, the round trips through a
checkpoint and an ONNX export, ``confidence: None`` without a confidence model, and ``min_confidence``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner
from captioner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.confidence import ConfidenceModel, ConfidenceModelError, FeatureReference, image_statistics
from captioner.model import ConfidenceUnavailableError
from tests.helpers import fake_confidence_model, tiny_captioner

BEAM: dict[str, Any] = {"method": "beam", "beam_size": 3, "num_captions": 3}


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (70 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(n)]


def test_feature_reference_coordinates_and_residuals_by_hand() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 6))
    reference = FeatureReference.fit(train, components=3)
    np.testing.assert_allclose(reference.components @ reference.components.T, np.eye(3), atol=1e-5)
    x = rng.normal(size=(4, 6))
    coordinates, residual = reference.describe(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True) - reference.mean
    projected = unit @ reference.components.T
    np.testing.assert_allclose(coordinates, projected / np.sqrt(reference.variances), rtol=1e-5)
    np.testing.assert_allclose(residual, (unit**2).sum(axis=1) - (projected**2).sum(axis=1), rtol=1e-4, atol=1e-6)
    # whitened: the training photos' own coordinates have unit variance along each component
    np.testing.assert_allclose(reference.describe(train)[0].var(axis=0, ddof=1), np.ones(3), rtol=1e-4)
    with pytest.raises(ValueError, match="need more than 3 photos"):
        FeatureReference.fit(train[:3], components=3)


def test_confidence_is_the_logistic_of_the_standardised_signals() -> None:
    model = fake_confidence_model(6)
    images = image_statistics(model.reference, np.ones((2, 6)), [None, None])
    got = model.confidences([(-6.0, 5), (-1.0, 1)], images)
    for (log_prob, words), image, p in zip([(-6.0, 5), (-1.0, 1)], images, got, strict=True):
        z = (log_prob / (words + 1) + 2.0) * 1.0 + (image.feature_residual - 0.5) / 0.5 * -0.5
        assert p == pytest.approx(1 / (1 + np.exp(-z)))
    assert got[1] > got[0]  # a likelier caption, the same image: more confident


def test_principal_coordinates_are_signals_after_the_named_ones() -> None:
    base = fake_confidence_model(6)
    model = dataclasses.replace(
        base,
        coordinates=2,
        center=np.array([-2.0, 0.5, 0.0, 0.0]),
        scale=np.array([1.0, 0.5, 1.0, 1.0]),
        weights=np.array([1.0, -0.5, 0.7, -0.3]),
    )
    images = image_statistics(model.reference, np.random.default_rng(2).normal(size=(1, 6)), [None])
    (p,) = model.confidences([(-3.0, 2)], images)
    c = images[0].coordinates
    z = (-1.0 + 2.0) + (images[0].feature_residual - 0.5) / 0.5 * -0.5 + 0.7 * c[0] - 0.3 * c[1]
    assert p == pytest.approx(1 / (1 + np.exp(-z)))
    assert model.described_signals[-1] == "2 principal coordinates of the image's features"


def test_photos_farther_out_than_the_held_out_ones_lose_confidence_in_proportion() -> None:
    held_out = np.arange(1, 101, dtype=np.float64) / 100  # residuals 0.01 .. 1.00
    model = dataclasses.replace(fake_confidence_model(6), domain_residuals=held_out, domain_alpha=0.05)
    # p = (1 + held-out residuals >= r) / 101; factor = min(1, p / 0.05)
    factors = model.domain_factors(np.array([0.0, 0.5, 0.96, 0.99, 1.0, 5.0]))
    expected = [1.0, 1.0, min(1.0, 6 / 101 / 0.05), 3 / 101 / 0.05, 2 / 101 / 0.05, 1 / 101 / 0.05]
    np.testing.assert_allclose(factors, expected)
    images = image_statistics(model.reference, np.ones((1, 6)), [None])
    plain = fake_confidence_model(6).confidences([(-2.0, 3)], images)[0]
    far = dataclasses.replace(model, domain_residuals=held_out * 0.0)  # every held-out photo nearer than this one
    assert far.confidences([(-2.0, 3)], images)[0] == pytest.approx(plain * (1 / 101) / 0.05)
    assert ConfidenceModel.from_dict(model.to_dict()).domain_factors(np.array([0.99]))[0] == pytest.approx(expected[3])
    with pytest.raises(ConfidenceModelError, match="sorted"):
        dataclasses.replace(model, domain_residuals=held_out[::-1])
    assert model.described_signals == [
        "mean_log_prob",
        "feature_residual",
        "domain factor: feature residual against 100 held-out photos",
    ]


def test_a_confidence_model_round_trips_through_its_dict_and_refuses_bad_ones() -> None:
    model = fake_confidence_model(6)
    again = ConfidenceModel.from_dict(model.to_dict())
    signals = np.array([[-1.5, 0.3], [-3.0, 1.2]])
    np.testing.assert_allclose(
        again.in_domain_probabilities(signals), model.in_domain_probabilities(signals), rtol=1e-6
    )
    bad = model.to_dict()
    bad["signals"] = ["mean_log_prob", "moon_phase"]
    with pytest.raises(ConfidenceModelError, match="unknown confidence signals"):
        ConfidenceModel.from_dict(bad)
    with pytest.raises(ConfidenceModelError, match="format"):
        ConfidenceModel.from_dict({**model.to_dict(), "format_version": 99})
    with pytest.raises(ConfidenceModelError, match="scales positive"):
        ConfidenceModel.from_dict({**model.to_dict(), "scale": [1.0, 0.0]})


def test_captions_get_a_confidence_and_a_model_without_one_answers_none() -> None:
    with_confidence = tiny_captioner(confidence=True)
    without = tiny_captioner()
    for a, b in zip(with_confidence.caption(_images(3), **BEAM), without.caption(_images(3), **BEAM), strict=True):
        assert [c.text for c in a.captions] == [c.text for c in b.captions]  # the captions do not change
        assert [c.log_prob for c in a.captions] == [c.log_prob for c in b.captions]
        assert all(c.confidence is not None and 0.0 < c.confidence < 1.0 for c in a.captions)
        assert all(c.confidence is None for c in b.captions)
        assert not a.abstained and not b.abstained


def test_min_confidence_abstains_keeping_the_tags() -> None:
    model = tiny_captioner(confidence=True, class_head=True)
    confident = model.caption(_images(2), **BEAM)
    lowest = min(c.confidence for r in confident for c in r.captions)  # type: ignore[type-var]
    highest = max(c.confidence for r in confident for c in r.captions)  # type: ignore[type-var]
    assert lowest < highest
    kept = model.caption(_images(2), **BEAM, min_confidence=lowest)
    assert [len(r.captions) for r in kept] == [len(r.captions) for r in confident]
    some = model.caption(_images(2), **BEAM, min_confidence=(lowest + highest) / 2)
    for r in some:
        assert all(c.confidence >= (lowest + highest) / 2 for c in r.captions)  # type: ignore[operator]
    none = model.caption(_images(2), **BEAM, min_confidence=1.0)
    for before, r in zip(confident, none, strict=True):
        assert r.abstained and r.captions == []
        assert r.tags and r.tags == before.tags


def test_min_confidence_without_a_confidence_model_is_refused() -> None:
    with pytest.raises(ConfidenceUnavailableError, match="captioner calibrate"):
        tiny_captioner().caption(_images(1), method="greedy", min_confidence=0.5)
    assert tiny_captioner().caption(_images(1), method="greedy", min_confidence=0.0)[0].captions
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0.0, 1.0\]"):
        tiny_captioner().caption(_images(1), method="greedy", min_confidence=1.5)


def test_the_confidence_model_travels_in_the_checkpoint(tmp_path: Path) -> None:
    model = tiny_captioner(confidence=True)
    model.save(tmp_path / "m.pt")
    again = Captioner.from_checkpoint(tmp_path / "m.pt")
    assert again.confidence_model is not None
    a = model.caption(_images(2), **BEAM)
    b = again.caption(_images(2), **BEAM)
    for x, y in zip(a, b, strict=True):
        assert [c.confidence for c in x.captions] == pytest.approx([c.confidence for c in y.captions], abs=1e-6)
    # an old checkpoint (no key at all) loads and answers None
    data = load_checkpoint(tmp_path / "m.pt")
    del data["confidence_model"]
    save_checkpoint(tmp_path / "old.pt", data)
    old = Captioner.from_checkpoint(tmp_path / "old.pt")
    assert old.confidence_model is None
    assert old.caption(_images(1), **BEAM)[0].captions[0].confidence is None


def test_a_confidence_model_for_other_features_is_refused(tmp_path: Path) -> None:
    model = tiny_captioner()
    model.confidence_model = fake_confidence_model(7)  # resnet18 gives 512
    model.save(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="fitted on 7-d features, the encoder gives 512"):
        Captioner.from_checkpoint(tmp_path / "m.pt")


@pytest.mark.slow
def test_the_onnx_backend_gives_the_same_confidences(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from captioner.onnx_export import export_onnx

    model = tiny_captioner(confidence=True, class_head=True)
    model.save(tmp_path / "m.pt")
    export_onnx(
        Captioner.from_checkpoint(tmp_path / "m.pt"), tmp_path / "export", source="m.pt", source_sha256="0" * 64
    )
    for path in (tmp_path / "export", tmp_path / "m.pt"):  # the export folder's metadata, and a checkpoint
        onnx_model = Captioner.from_checkpoint(path, backend="onnxruntime")
        assert onnx_model.confidence_model is not None
        for x, y in zip(model.caption(_images(3), **BEAM), onnx_model.caption(_images(3), **BEAM), strict=True):
            assert [c.text for c in x.captions] == [c.text for c in y.captions]
            assert [c.confidence for c in x.captions] == pytest.approx([c.confidence for c in y.captions], abs=1e-3)
            assert [t.name for t in x.tags] == [t.name for t in y.tags]
            assert [t.confidence for t in x.tags] == pytest.approx([t.confidence for t in y.tags], abs=1e-3)
