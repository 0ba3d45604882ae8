"""The encoder's ImageNet-1k class head: computed from the decoder's own features, saved, loaded, exported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioner import Captioner, EncoderConfig, Vocabulary
from captioner.encoders import IMAGENET_CLASSES, _load_state_dict_file, _package_weights_file, build_encoder
from tests.helpers import tiny_captioner
from training.features import encoder_fingerprint

GREEDY = {"method": "greedy", "max_length": 6}


def _images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (70 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(count)]


def _said(result) -> list[tuple[str, float, float]]:
    return [(c.text, c.score, c.log_prob) for c in result.captions]


def _softmax_by_hand(model: Captioner, images: list[Image.Image]) -> np.ndarray:
    """The head's linear map on the average-pooled grid, and a softmax, in float64 numpy."""
    grid = model.encoder.forward_features(model.preprocess(images)).double().numpy()  # (B, C, h, w)
    pooled = grid.mean(axis=(2, 3))  # (B, C)
    head = model.encoder.classifier
    assert head is not None
    logits = pooled @ head.weight.double().numpy().T + head.bias.double().numpy()  # (B, 1000)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_class_probabilities_are_the_softmax_of_the_head_on_pooled_features() -> None:
    model = tiny_captioner(class_head=True)
    images = _images()
    results = model.caption(images, **GREEDY)
    expected = _softmax_by_hand(model, images)
    for result, row in zip(results, expected, strict=True):
        assert result.class_probabilities is not None
        assert result.class_probabilities.shape == (IMAGENET_CLASSES,)
        assert result.class_probabilities.dtype == np.float32
        np.testing.assert_allclose(result.class_probabilities, row, rtol=1e-5, atol=1e-7)
        assert abs(float(result.class_probabilities.sum()) - 1.0) < 1e-5
    assert expected.max() > 0.05  # a peaked distribution: the comparison above is not between near-uniform rows
    # each image gets its own row, the same as when captioned alone (the batch's order is kept)
    assert len({int(r.class_probabilities.argmax()) for r in results}) > 1  # type: ignore[union-attr]
    for image, result in zip(images, results, strict=True):
        alone = model.caption([image], **GREEDY)[0].class_probabilities
        np.testing.assert_allclose(alone, result.class_probabilities, atol=1e-6)  # type: ignore[arg-type]


def test_the_head_changes_neither_the_features_nor_the_captions() -> None:
    with_head, without = tiny_captioner(class_head=True), tiny_captioner()
    images = _images()
    beam = {"method": "beam", "beam_size": 3, "num_captions": 2}
    for a, b in zip(with_head.caption(images, **beam), without.caption(images, **beam), strict=True):
        assert _said(a) == _said(b)
        assert b.class_probabilities is None
    # a training run's feature cache stays valid: the head is not part of what determines the features
    assert encoder_fingerprint(with_head.encoder) == encoder_fingerprint(without.encoder)


def test_encoders_without_known_head_weights_have_no_head() -> None:
    assert tiny_captioner().caption(_images(1), **GREEDY)[0].class_probabilities is None
    for name in ("resnet18", "efficientnet_lite0"):  # random weights: a random classifier would be made up
        assert build_encoder(EncoderConfig(name, weights=None)).classifier is None


def test_efficientnet_lite_head_is_the_packages_own_classifier() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(_load_state_dict_file(_package_weights_file("efficientnet_lite0")))
    reference.eval()
    encoder = build_encoder(EncoderConfig("efficientnet_lite0"))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixels)  # the package's forward: features, pool, dropout (off), _fc
        _, logits = encoder.forward_features_and_logits(pixels)
        assert logits is not None
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        _, fused = encoder.fuse_for_inference().forward_features_and_logits(pixels)
        assert fused is not None
        torch.testing.assert_close(fused, expected, atol=1e-3, rtol=1e-3)


def test_resnet_head_comes_from_the_weights_file_when_it_has_one(tmp_path) -> None:
    import torchvision

    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None).eval()
    whole, features_only = tmp_path / "whole.pth", tmp_path / "no-fc.pth"
    torch.save(net.state_dict(), whole)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, features_only)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, logits = build_encoder(EncoderConfig("resnet18", weights=str(whole))).forward_features_and_logits(pixels)
        assert logits is not None
        torch.testing.assert_close(logits, net(pixels), atol=1e-4, rtol=1e-4)
    assert build_encoder(EncoderConfig("resnet18", weights=str(features_only))).classifier is None


def test_checkpoint_round_trip_keeps_the_head(tmp_path) -> None:
    model = tiny_captioner(class_head=True)
    path = tmp_path / "model.pt"
    model.save(path)
    data = torch.load(path, weights_only=True)
    assert data["encoder_state"]["classifier.weight"].shape == (IMAGENET_CLASSES, model.encoder.feature_dim)
    loaded = Captioner.from_checkpoint(path)
    images = _images()
    for a, b in zip(model.caption(images, **GREEDY), loaded.caption(images, **GREEDY), strict=True):
        assert a.class_probabilities is not None and b.class_probabilities is not None
        np.testing.assert_array_equal(a.class_probabilities, b.class_probabilities)
        assert a.captions[0].text == b.captions[0].text


def test_an_old_checkpoint_without_the_head_loads_and_gives_none(tmp_path) -> None:
    model = tiny_captioner(class_head=True)
    path = tmp_path / "old.pt"
    model.save(path)
    data = torch.load(path, weights_only=True)
    # as this project wrote checkpoints before the head was kept: the encoder's state without it
    data["encoder_state"] = {k: v for k, v in data["encoder_state"].items() if not k.startswith("classifier.")}
    torch.save(data, path)
    old = Captioner.from_checkpoint(path)
    assert old.encoder.classifier is None
    images = _images()
    for a, b in zip(model.caption(images, **GREEDY), old.caption(images, **GREEDY), strict=True):
        assert b.class_probabilities is None
        assert a.captions[0].text == b.captions[0].text and a.captions[0].score == b.captions[0].score


def test_a_package_encoder_takes_its_head_from_the_package(tmp_path) -> None:
    model = Captioner.build(EncoderConfig("efficientnet_lite0"), Vocabulary.build(["a dog"], min_count=1), embed_dim=8)
    path = tmp_path / "lite.pt"
    model.save(path)
    assert torch.load(path, weights_only=True)["encoder_state"] is None  # re-created from the package, head and all
    loaded = Captioner.from_checkpoint(path)
    package = _load_state_dict_file(_package_weights_file("efficientnet_lite0"))
    assert loaded.encoder.classifier is not None
    assert torch.equal(loaded.encoder.classifier.weight, package["_fc.weight"])
    result = loaded.caption(_images(1), **GREEDY)[0]
    assert result.class_probabilities is not None and result.class_probabilities.shape == (IMAGENET_CLASSES,)


def test_the_head_stays_frozen_and_travels_when_the_last_stage_trains(tmp_path) -> None:
    model = tiny_captioner(class_head=True)
    model.encoder.set_trainable(True)
    head = model.encoder.classifier
    assert head is not None and not any(p.requires_grad for p in head.parameters())
    assert not {id(p) for p in head.parameters()} & {id(p) for p in model.encoder.last_stage_parameters()}
    assert "classifier.bias" in model.state_payload()["encoder_state"]


def test_a_head_of_another_shape_is_refused() -> None:
    encoder = build_encoder(EncoderConfig("resnet18", weights=None))
    with pytest.raises(ValueError, match="maps 512 features to 1000 ImageNet classes, not 512 to 10"):
        encoder.set_classifier(nn.Linear(512, 10))
