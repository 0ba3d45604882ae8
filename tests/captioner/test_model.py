import itertools

import pytest
import torch

from captioner import Captioner, DecodingOptions, EncoderConfig
from tests.helpers import count_encoder_passes, tiny_captioner, tiny_vocab

ENCODERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0", "efficientnet_lite2"]


# Every encoder with attention (which reads the whole grid); without attention on the light ones.
@pytest.mark.parametrize(
    ("encoder", "attention"), [(e, True) for e in ENCODERS] + [("resnet18", False), ("efficientnet_lite0", False)]
)
def test_every_encoder_with_and_without_attention(encoder, attention):
    weights = "imagenet" if encoder.startswith("efficientnet") else None
    model = Captioner.build(
        EncoderConfig(encoder, weights=weights),
        tiny_vocab(),
        embed_dim=8,
        hidden_dim=8,
        attention=attention,
        attention_dim=8,
        cell="lstm",
    ).eval()
    pixels = torch.randn(2, 3, 96, 96)
    grid = model.encode(pixels)
    assert grid.shape[:2] == (2, model.encoder.feature_dim)
    results = model.caption_pixels(pixels, DecodingOptions(method="beam", beam_size=2, num_captions=2, max_length=4))
    assert len(results) == 2 and all(len(r.captions) == 2 for r in results)
    assert (results[0].attention_shape is not None) == attention
    for caption in results[0].captions:
        assert len(caption.tokens) <= 4
        assert caption.text == " ".join(caption.tokens)


@pytest.mark.parametrize(("cell", "attention"), list(itertools.product(["lstm", "gru", "rnn"], [False, True])))
def test_every_cell_captions_end_to_end(cell, attention):
    model = Captioner.build(
        EncoderConfig("resnet18", weights=None),
        tiny_vocab(),
        embed_dim=8,
        hidden_dim=8,
        attention=attention,
        attention_dim=8,
        cell=cell,
        num_layers=2,
    ).eval()
    for method in ("greedy", "sample", "beam"):
        seeded = {"seed": 0} if method == "sample" else {}
        result = model.caption_pixels(torch.randn(3, 3, 64, 64), DecodingOptions(method=method, max_length=5, **seeded))
        assert len(result) == 3


def test_mismatched_parts_are_refused():
    from captioner.config import DecoderConfig
    from captioner.decoder import CaptionDecoder
    from captioner.encoders import build_encoder

    encoder = build_encoder(EncoderConfig("resnet18", weights=None))
    with pytest.raises(ValueError, match="vocab_size"):
        Captioner(encoder, CaptionDecoder(DecoderConfig(vocab_size=99, feature_dim=512)), tiny_vocab())
    with pytest.raises(ValueError, match="feature_dim"):
        Captioner(encoder, CaptionDecoder(DecoderConfig(vocab_size=len(tiny_vocab()), feature_dim=64)), tiny_vocab())


def test_encode_runs_the_encoder_in_chunks():
    """On CPU a big batch goes through the encoder a few images at a time (CPU_CHUNK_SIZE), or as set."""
    from captioner.encoders import CPU_CHUNK_SIZE

    model = Captioner.build(EncoderConfig("resnet18", weights=None), tiny_vocab(), embed_dim=8, hidden_dim=8).eval()
    passes = count_encoder_passes(model.encoder)
    pixels = torch.randn(CPU_CHUNK_SIZE + 2, 3, 64, 64)
    default = model.encode(pixels)
    assert passes == [CPU_CHUNK_SIZE, 2]
    passes.clear()
    model.encoder_chunk_size = 4
    assert torch.allclose(model.encode(pixels), default, atol=1e-5)
    assert passes == [4] * (CPU_CHUNK_SIZE // 4) + [2]


def test_a_model_optimized_for_inference_captions_the_same_and_cannot_be_saved(tmp_path):
    model = tiny_captioner(seed=3)
    images = torch.rand(2, 3, 64, 64)
    expected = model.caption_pixels(images, DecodingOptions(method="beam", beam_size=3))
    assert model.optimize_for_inference() is model
    got = model.caption_pixels(images, DecodingOptions(method="beam", beam_size=3))
    assert [c.text for r in got for c in r.captions] == [c.text for r in expected for c in r.captions]
    with pytest.raises(RuntimeError, match="cannot be saved"):
        model.save(tmp_path / "fused.pt")


def test_caption_refuses_an_option_its_method_does_not_use_even_at_its_default():
    from PIL import Image

    model = tiny_captioner(seed=3)
    photo = Image.new("RGB", (64, 48), (120, 80, 40))
    with pytest.raises(ValueError, match=r"method sample does not use beam_size \(beam_size is for beam\)"):
        model.caption([photo], method="sample", beam_size=1)  # 1 is beam_size's default
    assert model.caption([photo], method="beam", beam_size=1)[0].captions
