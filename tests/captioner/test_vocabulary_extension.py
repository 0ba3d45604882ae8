"""Vocabulary extension: new words take a known word's weights, only tag guidance says them, and they travel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, DecodingOptions
from captioner.caption_rules import CaptionRules
from captioner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.cli import main as captioner_main
from captioner.vocabulary_extension import (
    VocabularyExtensionError,
    extend_vocabulary,
    load_word_transfers,
)
from tests.helpers import class_head_seeing, class_logits_for, tiny_captioner

OPTIONS = (
    DecodingOptions(method="greedy", max_length=8),
    DecodingOptions(method="beam", beam_size=3, num_captions=3, max_length=8),
    DecodingOptions(method="sample", num_captions=2, seed=5, max_length=8),
)


def _grid(model: Captioner, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, model.encoder.feature_dim, 2, 2)


def test_new_words_copy_their_source_and_old_ids_keep_their_meaning() -> None:
    model = tiny_captioner(attention=True)
    before = list(model.vocab.tokens)
    added = extend_vocabulary(model, {"zebra": "dog", "sofa": "bench"})
    assert added == ["zebra", "sofa"]
    assert model.vocab.tokens == [*before, "zebra", "sofa"]
    assert model.decoder.config.vocab_size == len(model.vocab) == model.decoder.head.out_features
    decoder, vocab = model.decoder, model.vocab
    for new, source in (("zebra", "dog"), ("sofa", "bench")):
        new_id, source_id = vocab.token_id(new), vocab.token_id(source)
        assert torch.equal(decoder.embed.weight[new_id], decoder.embed.weight[source_id])
        assert torch.equal(decoder.head.weight[new_id], decoder.head.weight[source_id])
        assert decoder.head.bias[new_id] == decoder.head.bias[source_id]
    assert extend_vocabulary(model, {"zebra": "dog"}) == []  # already there: extending again changes nothing
    assert len(model.vocab) == len(before) + 2


def test_plain_decoding_gives_exactly_the_captions_of_the_model_before() -> None:
    """Greedy and beam: the same captions and log-probabilities. Sampling draws from the same distributions (a
    seeded draw over a longer vocabulary consumes the generator differently, so not the same draws): it never says
    a new word either."""
    model = tiny_captioner(attention=True)
    model.caption_rules = CaptionRules.learn(["a dog runs", "two children play in the water", "a man sits"])
    grid = _grid(model)
    before = [model.caption_features(grid, options) for options in OPTIONS]
    extend_vocabulary(model, {"zebra": "dog", "sofa": "bench"})
    with torch.no_grad():  # however strongly the decoder would like a new word, it never says it unguided
        model.decoder.head.bias[model.vocab.token_id("zebra")] = 50.0
    after = [model.caption_features(grid, options) for options in OPTIONS]
    for old, new in zip(before[:2], after[:2], strict=True):
        for x, y in zip(old, new, strict=True):
            assert [c.tokens for c in x.captions] == [c.tokens for c in y.captions]
            assert [c.log_prob for c in x.captions] == pytest.approx([c.log_prob for c in y.captions], abs=1e-5)
    many = DecodingOptions(method="sample", num_captions=20, max_length=8, temperature=2.0)
    assert all("zebra" not in c.tokens for result in model.caption_features(grid, many) for c in result.captions)


def test_new_words_follow_their_sources_caption_rules() -> None:
    rules = CaptionRules(frozenset({"a", "dog"}), frozenset({("the", "bench")}), frozenset({"runs"}))
    extended = rules.with_words_like({"zebra": "dog", "sofa": "bench", "trots": "runs"})
    assert {"zebra", "dog", "a"} <= extended.no_end
    assert ("the", "sofa") in extended.no_end_pairs
    assert "trots" in extended.no_start
    assert "sofa" not in extended.no_end


def test_tag_guidance_unlocks_the_new_word_of_a_confident_tag() -> None:
    model = tiny_captioner()
    extend_vocabulary(model, {"zebra": "dog"})
    zebra, dog = model.vocab.token_id("zebra"), model.vocab.token_id("dog")
    with torch.no_grad():  # the decoder says "dog" (then ends); "zebra" has the same weights
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        model.decoder.head.bias[[dog, zebra]] = 4.0
        model.decoder.head.bias[2] = 3.0
    grid = _grid(model, 2)
    logits = torch.cat([class_logits_for("zebra"), class_logits_for("mountain bike")])
    guided = model.caption_features(grid, DecodingOptions(guided_by_tags=True, max_length=4), class_logits=logits)
    plain = model.caption_features(grid, DecodingOptions(max_length=4), class_logits=logits)
    assert "zebra" in guided[0].captions[0].tokens
    assert all("zebra" not in c.tokens for result in (*plain, guided[1]) for c in result.captions)
    assert "bike" in guided[1].captions[0].tokens  # the other image is guided to its own tag's word, not zebra


def test_the_extension_travels_in_the_checkpoint(tmp_path: Path) -> None:
    model = tiny_captioner()
    extend_vocabulary(model, {"zebra": "dog"})
    model.save(tmp_path / "m.pt")
    loaded = Captioner.from_checkpoint(tmp_path / "m.pt")
    assert loaded.vocab == model.vocab
    assert loaded.vocabulary_extension is not None and dict(loaded.vocabulary_extension.sources) == {"zebra": "dog"}
    grid = _grid(model)
    for options in OPTIONS:
        assert [r.captions for r in loaded.caption_features(grid, options)] == [
            r.captions for r in model.caption_features(grid, options)
        ]
    data = load_checkpoint(tmp_path / "m.pt")
    data["vocabulary_extension"]["sources"]["okapi"] = "giraffe"  # words the vocabulary lacks
    save_checkpoint(tmp_path / "bad.pt", data)
    with pytest.raises(CheckpointError, match="names words the vocabulary lacks"):
        Captioner.from_checkpoint(tmp_path / "bad.pt")


def test_a_transfer_that_cannot_apply_is_refused() -> None:
    model = tiny_captioner()
    with pytest.raises(VocabularyExtensionError, match="source word 'giraffe' of 'okapi' is not in"):
        extend_vocabulary(model, {"okapi": "giraffe"})
    with pytest.raises(VocabularyExtensionError, match="cannot be a word"):
        extend_vocabulary(model, {"two words": "dog"})
    assert "okapi" not in model.vocab and "two words" not in model.vocab


def test_cli_extends_a_copy_keeping_its_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_captioner()
    model.save(tmp_path / "m.pt", half=True)
    table = tmp_path / "words.json"
    table.write_text(json.dumps({"words": {"zebra": {"source": "dog"}, "sofa": {"source": "bench"}}}))
    assert (
        captioner_main(["extend-vocabulary", str(tmp_path / "m.pt"), str(tmp_path / "x.pt"), "--words", str(table)])
        == 0
    )
    assert "2 words added" in capsys.readouterr().out
    data = load_checkpoint(tmp_path / "x.pt")
    assert data["vocab"][-2:] == ["zebra", "sofa"]
    assert data["decoder_state"]["head.weight"].dtype == torch.float16
    assert Captioner.from_checkpoint(tmp_path / "x.pt").vocabulary_extension is not None
    table.write_text("{not json")
    assert (
        captioner_main(["extend-vocabulary", str(tmp_path / "m.pt"), str(tmp_path / "y.pt"), "--words", str(table)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: word-transfer table") and "\n" not in err
    assert not (tmp_path / "y.pt").exists()


def test_the_bundled_table_adds_words_the_tags_need() -> None:
    transfers = load_word_transfers()
    assert {"zebra", "sink", "broccoli", "banana", "microwave"} <= set(transfers)
    assert transfers["television"] == "tv"
    try:
        model = Captioner.from_checkpoint(None)
    except Exception as error:  # noqa: BLE001 - any reason the bundled model is absent
        pytest.skip(f"no bundled default model: {error}")
    assert model.vocabulary_extension is not None  # the default model ships extended
    assert dict(model.vocabulary_extension.sources) == transfers


@pytest.mark.slow
def test_the_onnx_export_carries_the_extension_and_guides_as_torch_does(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from captioner.onnx_export import export_onnx

    model = tiny_captioner()
    extend_vocabulary(model, {"zebra": "dog"})
    model.encoder.set_classifier(class_head_seeing(model.encoder.feature_dim, "zebra"))
    model.save(tmp_path / "m.pt")
    export_onnx(
        Captioner.from_checkpoint(tmp_path / "m.pt"), tmp_path / "export", source="m.pt", source_sha256="0" * 64
    )
    onnx_model = Captioner.from_checkpoint(tmp_path / "export", backend="onnxruntime")
    assert onnx_model.vocab == model.vocab and onnx_model.vocabulary_extension == model.vocabulary_extension
    photos = [Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8)) for value in (20, 120, 220)]
    for options in (DecodingOptions(max_length=8), DecodingOptions(guided_by_tags=True, max_length=8)):
        torch_results, onnx_results = model.caption(photos, options), onnx_model.caption(photos, options)
        for x, y in zip(torch_results, onnx_results, strict=True):
            assert [c.text for c in x.captions] == [c.text for c in y.captions]
            assert [c.log_prob for c in x.captions] == pytest.approx([c.log_prob for c in y.captions], abs=1e-3)
            assert ("zebra" in x.captions[0].tokens) == options.guided_by_tags


def test_the_service_names_the_added_words_and_guides_to_them(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    model = tiny_captioner(size=None)
    extend_vocabulary(model, {"zebra": "dog"})
    model.encoder.set_classifier(class_head_seeing(model.encoder.feature_dim, "zebra"))
    model.save(tmp_path / "m.pt")
    photo = tmp_path / "p.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(photo)
    with TestClient(create_app(Settings(checkpoint=tmp_path / "m.pt", backend="torch"))) as client:
        assert client.get("/model").json()["added_words"] == {"zebra": "dog"}
        answers = {}
        for guided in (False, True):
            response = client.post(
                "/caption",
                params={"guided_by_tags": str(guided).lower(), "max_length": 8},
                files={"image": ("p.png", photo.read_bytes(), "image/png")},
            )
            assert response.status_code == 200, response.text
            answers[guided] = response.json()["captions"][0]["text"].split()
    assert "zebra" in answers[True] and "zebra" not in answers[False]
