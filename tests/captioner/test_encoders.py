import urllib.error

import pytest
import torch

from captioner.config import EncoderConfig
from captioner.encoders import (
    CPU_CHUNK_SIZE,
    ENCODERS,
    EncoderWeightsError,
    _package_weights_file,
    build_encoder,
    default_chunk_size,
    file_sha256,
)
from tests.helpers import count_encoder_passes

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_shapes(name):
    encoder = build_encoder(EncoderConfig(name, weights=None))
    grid, pooled = encoder(torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, encoder.feature_dim, 2, 2)
    assert pooled.shape == (1, encoder.feature_dim)
    assert torch.allclose(pooled, grid.mean(dim=(2, 3)))
    assert encoder.preprocess.crop == 224


@pytest.mark.parametrize(
    ("name", "size", "grid_side"), [("efficientnet_lite0", 224, 7), ("efficientnet_lite2", 260, 9)]
)
def test_efficientnet_lite_loads_its_real_imagenet_weights(name, size, grid_side):
    encoder = build_encoder(EncoderConfig(name, weights="imagenet"))
    path = _package_weights_file(name)
    assert encoder.weights_sha256 == file_sha256(path)
    assert encoder.from_package
    reference = torch.load(path, map_location="cpu", weights_only=True)
    state = encoder.body.state_dict()
    for key in ("_conv_stem.weight", "_conv_head.weight", "_blocks.3._depthwise_conv.weight"):
        assert torch.equal(state[key], reference[key])
    assert encoder.preprocess.crop == size and encoder.preprocess.mean == (0.5, 0.5, 0.5)
    grid, pooled = encoder(torch.randn(2, 3, size, size))
    assert grid.shape == (2, 1280, grid_side, grid_side)
    assert pooled.shape == (2, 1280)


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError, match="unknown encoder 'vgg16'; expected one of resnet18.*efficientnet_lite2"):
        build_encoder(EncoderConfig("vgg16"))
    assert set(RESNETS) | {"efficientnet_lite0", "efficientnet_lite2"} == set(ENCODERS)


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderWeightsError, match=r"--encoder-weights /path/to/resnet18-.*\.pth"):
        build_encoder(EncoderConfig("resnet18", weights="imagenet"))


def test_resnet_from_local_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    encoder = build_encoder(EncoderConfig("resnet18", weights=str(path)))
    assert torch.equal(encoder.body[0].weight, net.conv1.weight)
    assert encoder.weights_sha256 == file_sha256(path)


def test_bad_local_weights_files(tmp_path):
    with pytest.raises(EncoderWeightsError, match="not found"):
        build_encoder(EncoderConfig("resnet18", weights=str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EncoderWeightsError, match="cannot load"):
        build_encoder(EncoderConfig("resnet18", weights=str(junk)))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(EncoderWeightsError, match="not a resnet18 state dict"):
        build_encoder(EncoderConfig("resnet18", weights=str(wrong)))


def test_frozen_by_default_and_last_stage_trainable():
    frozen = build_encoder(EncoderConfig("resnet18", weights=None))
    assert not any(p.requires_grad for p in frozen.parameters())
    tuned = build_encoder(EncoderConfig("resnet18", weights=None, trainable=True))
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("body.7.") for n in trainable)  # layer4 only
    tuned.train()
    assert not any(m.training for m in tuned.modules())  # BatchNorm statistics never move, even when tuned
    assert all(k.startswith("body.") for k in tuned.state_dict())  # the last stage is not stored twice
    lite = build_encoder(EncoderConfig("efficientnet_lite0", weights="imagenet", trainable=True))
    names = {n for n, p in lite.named_parameters() if p.requires_grad}
    assert "body._conv_head.weight" in names and "body._conv_stem.weight" not in names


def test_a_trainable_last_stage_computes_features_as_at_inference():
    """Fine-tuning moves the last stage's weights, not how features are computed: no batch statistics."""
    encoder = build_encoder(EncoderConfig("efficientnet_lite0", weights="imagenet", trainable=True))
    statistics = {k: v.clone() for k, v in encoder.state_dict().items() if "running_" in k}
    images = torch.randn(4, 3, 224, 224)
    encoder.train()
    training = encoder.forward_features(images)
    training.square().mean().backward()
    assert encoder.body._conv_head.weight.grad is not None  # the last stage does train
    encoder.eval()
    with torch.no_grad():
        inference = encoder.forward_features(images)
    torch.testing.assert_close(training.detach(), inference)
    for key, value in encoder.state_dict().items():
        if key in statistics:
            assert torch.equal(value, statistics[key]), key


def test_chunked_features_equal_one_pass():
    encoder = build_encoder(EncoderConfig("resnet18", weights=None))
    passes = count_encoder_passes(encoder)
    images = torch.randn(7, 3, 64, 64)
    with torch.inference_mode():
        whole = encoder.forward_features(images)
        chunked = encoder.forward_features(images, chunk_size=3)
        small = encoder.forward_features(images[:2], chunk_size=3)
    assert passes == [7, 3, 3, 1, 2]
    assert chunked.shape == whole.shape and torch.allclose(chunked, whole, atol=1e-5)
    assert torch.allclose(small, whole[:2], atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        encoder.forward_features(images, chunk_size=0)


def test_chunks_on_cpu_only_by_default():
    assert default_chunk_size("cpu") == CPU_CHUNK_SIZE
    assert default_chunk_size(torch.device("cuda", 0)) is None


def _randomise_batchnorm(encoder) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(0)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize(
    ("name", "weights", "size"),
    [("efficientnet_lite0", "imagenet", 224), ("resnet18", None, 64), ("resnet50", None, 64)],
)
def test_fusing_batchnorm_for_inference_keeps_the_features(name, weights, size):
    encoder = build_encoder(EncoderConfig(name, weights=weights))
    if weights is None:
        _randomise_batchnorm(encoder)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = encoder.forward_features(images)
        encoder.fuse_for_inference()
        after = encoder.forward_features(images)
    assert encoder.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())  # every one was folded
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    with pytest.raises(RuntimeError, match="cannot be trained"):
        encoder.set_trainable(True)


def test_a_trainable_encoder_is_not_fused():
    encoder = build_encoder(EncoderConfig("resnet18", weights=None, trainable=True))
    with pytest.raises(RuntimeError, match="trainable"):
        encoder.fuse_for_inference()
