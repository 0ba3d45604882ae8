"""Shared test helpers: tiny models and the location of the real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, EncoderConfig, Vocabulary
from captioner.confidence import ConfidenceModel, FeatureReference
from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder
from captioner.encoders import IMAGENET_CLASSES, build_encoder
from captioner.tags import load_tag_table
from captioner.transforms import Preprocess

CAPTIONS = [
    "a dog runs on the grass",
    "a black dog jumps over a log",
    "two children play in the water",
    "a man rides a bike down the street",
    "a girl in a pink dress sits on a bench",
]


LARGE_IMAGE_SIZE = (7360, 4912)  # 36 megapixels, under the service's 40-megapixel limit


def write_large_image(kind: str, path: Path) -> Path:
    """A 36-megapixel ``"cmyk-jpeg"`` or RGB ``"png"``, smooth enough to stay a few MB on disk (an upload
    under the service's 10 MB limit), written in 1-2 s."""
    rng = np.random.default_rng(0)
    if kind == "cmyk-jpeg":
        small = Image.fromarray(rng.integers(0, 256, (31, 46, 4), dtype=np.uint8), "CMYK")
        small.resize(LARGE_IMAGE_SIZE, Image.Resampling.BILINEAR).save(path, "JPEG", quality=75)
    elif kind == "png":
        small = Image.fromarray(rng.integers(0, 256, (307, 460, 3), dtype=np.uint8), "RGB")
        small.resize(LARGE_IMAGE_SIZE, Image.Resampling.NEAREST).save(path, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected cmyk-jpeg or png")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_root() -> Path:
    return Path(os.environ.get("CAPTIONER_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def require_data(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path} (set CAPTIONER_DATA_DIR)")
    return path


def tiny_vocab() -> Vocabulary:
    return Vocabulary.build(CAPTIONS, min_count=1)


def tiny_captioner(
    *, seed: int = 0, size: int | None = 64, class_head: bool = False, confidence: bool = False, **decoder_kwargs
) -> Captioner:
    """resnet18 (random weights) + a 16-unit decoder on 64x64 images: builds and runs in well under a second.

    ``size=None`` keeps resnet18's own preprocessing (resize 256, crop 224), as a served model has.
    ``class_head``: give the encoder a fake ImageNet-1k head (:func:`fake_class_head`); the rest of the model is
    the same as without it. ``confidence``: attach :func:`fake_confidence_model` (captions get a confidence).
    """
    torch.manual_seed(seed)
    vocab = tiny_vocab()
    encoder = build_encoder(EncoderConfig("resnet18", weights=None))
    if size is not None:
        encoder.preprocess = Preprocess(resize=size, crop=size)
    kwargs = {"embed_dim": 16, "hidden_dim": 16, "attention_dim": 8, "dropout": 0.1, **decoder_kwargs}
    decoder = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.feature_dim, **kwargs))
    if class_head:  # drawn after the decoder: its weights stay those of the same seed without a head
        encoder.set_classifier(fake_class_head(encoder.feature_dim))
    model = Captioner(encoder, decoder, vocab).eval()
    if confidence:
        model.confidence_model = fake_confidence_model(encoder.feature_dim)
    return model


def fake_confidence_model(feature_dim: int, *, bias: float = 0.0) -> ConfidenceModel:
    """A confidence model over the caption's mean log-probability and the image's feature residual (no class head
    needed), with a reference fitted on random features: confidences strictly inside (0, 1) that differ between
    captions. ``bias`` shifts them all (-20: every caption near 0)."""
    rng = np.random.default_rng(0)
    reference = FeatureReference.fit(rng.normal(size=(40, feature_dim)).astype(np.float32), components=8)
    return ConfidenceModel(
        signals=("mean_log_prob", "feature_residual"),
        center=np.array([-2.0, 0.5]),
        scale=np.array([1.0, 0.5]),
        weights=np.array([1.0, -0.5]),
        bias=bias,
        reference=reference,
        target="test: made up",
        fitted_on={"data": "random"},
    )


def fake_class_head(feature_dim: int) -> torch.nn.Linear:
    """A random ``Linear(feature_dim, 1000)`` whose weights are large enough that a random encoder's pooled
    features get a peaked softmax (top classes well above 1/1000), so comparisons within 1e-3 mean something."""
    head = torch.nn.Linear(feature_dim, IMAGENET_CLASSES)
    torch.nn.init.normal_(head.weight, std=0.1)
    return head


def class_logits_for(display: str, strength: float = 20.0) -> torch.Tensor:
    """ImageNet-1k logits ``(1, 1000)`` where the tag ``display`` (a merged display name) has probability ~1."""
    table = load_tag_table()
    logits = torch.zeros(1, IMAGENET_CLASSES)
    logits[0, int(np.flatnonzero(table.slot_of_class == table.display_names.index(display))[0])] = strength
    return logits


def class_head_seeing(feature_dim: int, display: str) -> torch.nn.Linear:
    """An ImageNet head that tags every photo ``display`` with probability ~1, whatever its features."""
    head = torch.nn.Linear(feature_dim, IMAGENET_CLASSES)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(class_logits_for(display)[0])
    return head


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def count_encoder_passes(encoder) -> list[int]:
    """Record the batch size of every pass through ``encoder``'s body (an ``ImageEncoder``)."""
    passes: list[int] = []
    features = encoder._features
    encoder._features = lambda images: passes.append(images.shape[0]) or features(images)
    return passes


def make_flickr_folder(root: Path, *, per_split: tuple[int, int, int] = (24, 8, 8)) -> Path:
    """A small data set in Flickr8k's distributed layout whose captions really describe the images."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    rows, names = ["image,caption"], {"train": [], "dev": [], "test": []}
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    index = 0
    for split, count in zip(("train", "dev", "test"), per_split, strict=True):
        for _ in range(count):
            colour, shape = combos[index % len(combos)]
            name = f"{index:04d}_{colour}_{shape}.jpg"
            image = Image.new("RGB", (96, 96), (245, 245, 245))
            draw = ImageDraw.Draw(image)
            box = (20 + index % 7, 20, 76, 76 - index % 5)
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
            image.save(root / "images" / name)
            names[split].append(name)
            for template in ("a {c} {s}", "a {c} {s} on white", "the {s} is {c}", "one {c} {s}", "a {s} that is {c}"):
                rows.append(f"{name},{template.format(c=colour, s=shape)} .")
            index += 1
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    for split, files in names.items():
        (root / "splits" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(files) + "\n")
    return root
