"""The bundled default model: present, small, loadable offline, and describing real photos."""

import pytest

from captioner import Captioner
from captioner.model import DEFAULT_CHECKPOINT
from captioner.text import tokenize
from tests.helpers import require_data

STOPWORDS = set(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "with",
        "and",
        "is",
        "are",
        "his",
        "her",
        "its",
        "their",
        "while",
        "for",
        "by",
        "from",
        "into",
    ]
)


def test_default_model_is_bundled_and_small():
    assert DEFAULT_CHECKPOINT.is_file(), "captioner/assets/default.pt is missing"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024


@pytest.fixture(scope="module")
def default_model():
    return Captioner.from_checkpoint(None)


@pytest.mark.slow
def test_default_model_describes_real_test_photos(default_model):
    flickr = require_data("flickr8k")
    test_files = (flickr / "splits" / "Flickr_8k.testImages.txt").read_text().split()[:8]
    references: dict[str, list[str]] = {}
    for line in (flickr / "captions.txt").read_text().splitlines()[1:]:
        name, caption = line.split(",", 1)
        if name in test_files:
            references.setdefault(name, []).append(caption)
    results = default_model.caption([flickr / "images" / name for name in test_files], method="beam", beam_size=3)
    hits = 0
    for name, result in zip(test_files, results, strict=True):
        words = set(result.captions[0].tokens) - STOPWORDS
        reference_words = {w for ref in references[name] for w in tokenize(ref)} - STOPWORDS
        assert words, f"{name}: empty caption"
        hits += bool(words & reference_words)
    assert hits >= 6, f"only {hits}/8 captions share a content word with their references"


def test_default_model_records_its_training(default_model):
    assert default_model.encoder.name == "efficientnet_lite2"
    assert default_model.metadata["training"]["format"] == "flickr8k"
    assert "CIDEr" in default_model.metadata["metrics"]["val"]
