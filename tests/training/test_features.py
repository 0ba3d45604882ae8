import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.config import EncoderConfig
from captioner.encoders import build_encoder
from captioner.transforms import Preprocess, build_transform, load_image
from tests.helpers import make_flickr_folder
from training.features import build_feature_cache, encoder_fingerprint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_flickr_folder(tmp_path_factory.mktemp("data"), per_split=(6, 0, 0))
    return sorted(str(p) for p in (root / "images").glob("*.jpg"))


def _encoder(seed=0):
    torch.manual_seed(seed)
    encoder = build_encoder(EncoderConfig("resnet18", weights=None))
    encoder.preprocess = Preprocess(resize=64, crop=64)
    return encoder


def test_cache_matches_the_encoder_and_is_reused(images, tmp_path, monkeypatch):
    encoder = _encoder()
    store = build_feature_cache(encoder, images, tmp_path, batch_size=4, num_workers=0, progress=False)
    assert store.array.dtype == np.float16 and store.grid_shape == (512, 2, 2)
    transform = build_transform(encoder.preprocess)
    with torch.inference_mode():
        expected = encoder.forward_features(torch.stack([transform(load_image(p)) for p in images[:2]]))
    assert torch.allclose(store.get([1, 0]).float(), expected[[1, 0]], atol=2e-2, rtol=1e-2)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(encoder, "forward_features", no_encoding)
    again = build_feature_cache(encoder, images, tmp_path, num_workers=0, progress=False)
    assert again.path == store.path
    # the same files named by relative paths (another working directory) reuse it too
    monkeypatch.chdir(Path(images[0]).parent)
    relative = build_feature_cache(encoder, [Path(p).name for p in images], tmp_path, num_workers=0, progress=False)
    assert relative.path == store.path


def test_fingerprint_changes_with_weights_and_preprocessing(images, tmp_path):
    a, b = _encoder(0), _encoder(1)
    assert encoder_fingerprint(a) == encoder_fingerprint(_encoder(0))
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    c = _encoder(0)
    c.preprocess = Preprocess(resize=72, crop=64)
    assert encoder_fingerprint(a) != encoder_fingerprint(c)
    first = build_feature_cache(a, images, tmp_path, num_workers=0, progress=False)
    second = build_feature_cache(b, images, tmp_path, num_workers=0, progress=False)
    assert first.path.parent != second.path.parent  # rebuilt, not reused
    assert not np.array_equal(first.array, second.array)


def test_unreadable_images_are_reported_not_fatal(images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(images[0]).read_bytes()[:200])
    missing = str(tmp_path / "missing.jpg")
    store = build_feature_cache(
        _encoder(), [images[0], str(bad), missing], tmp_path / "cache", num_workers=2, progress=False
    )
    assert set(store.failed) == {str(bad), missing}
    assert "truncated" in store.failed[str(bad)].lower() and "no such file" in store.failed[missing]
    assert not list((tmp_path / "cache").rglob("*.tmp.npy"))  # no leftovers


def test_building_the_cache_leaves_the_global_random_state_alone(images, tmp_path):
    """A run that builds its cache must train exactly like one that finds it built (same dropout masks)."""
    encoder = _encoder()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_feature_cache(encoder, images, tmp_path, batch_size=4, num_workers=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_cache_is_computed_in_fp32_on_cuda_too():
    """Serving encodes in fp32: a cache built under bf16 autocast on CUDA trained on features serving never sees."""
    from training.features import encoding_dtype

    for device in ("cuda", "cuda:1", "cpu"):
        assert encoding_dtype(torch.device(device)) is torch.float32, device


def test_the_fingerprint_covers_the_precision(images, tmp_path):
    """A cache computed in another precision (an earlier version's bf16 one, say) is never reused."""
    encoder = _encoder()
    assert encoder_fingerprint(encoder, dtype=torch.float32) != encoder_fingerprint(encoder, dtype=torch.bfloat16)
    store = build_feature_cache(encoder, images, tmp_path, batch_size=4, num_workers=0, progress=False)
    meta = json.loads(store.path.with_suffix(".json").read_text())
    assert meta["dtype"] == "torch.float32"
    assert meta["fingerprint"] == encoder_fingerprint(encoder, dtype=torch.float32)
