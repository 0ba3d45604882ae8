"""Tag-guided decoding: the constrained beam search, the tag -> caption-word table, the policy, and both backends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, DecodingOptions
from captioner.caption_rules import CaptionRules
from captioner.decoding import beam_search, constrained_beam_search
from captioner.guidance import GuidancePolicy, required_words
from captioner.model import TagsUnavailableError
from captioner.tag_words import load_tag_words, words_for_tags
from captioner.tags import Tag, load_tag_table
from tests.helpers import class_head_seeing, class_logits_for, tiny_captioner

BEAM = DecodingOptions(method="beam", beam_size=3, max_length=6)


def _fixed(model: Captioner, preferences: dict[int, float]) -> torch.Tensor:
    """Make the decoder's next-word logits the same at every step, whatever came before: ``preferences`` (word id ->
    logit, others 0). Returns the per-step log-probabilities decoding sees (<pad>, <start>, <unk> never produced)."""
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        for token, logit in preferences.items():
            model.decoder.head.bias[token] = logit
        logits = model.decoder.head.bias.clone()
    logits[[0, 1, 3]] = float("-inf")
    return logits.log_softmax(-1)


def _required(model: Captioner, batch: int, *words: str) -> torch.Tensor:
    required = torch.zeros(batch, len(model.vocab), dtype=torch.bool)  # (B, V)
    required[:, [model.vocab.token_id(w) for w in words]] = True
    return required


def _grid(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(batch, 512, 2, 2)


def test_the_required_word_is_forced_in_where_the_plain_beam_never_says_it() -> None:
    model = tiny_captioner()
    dog, bike, eos = model.vocab.token_id("dog"), model.vocab.token_id("bike"), 2
    logp = _fixed(model, {dog: 1.0, eos: 3.0})  # "bike" is one of the least likely words
    plain = beam_search(model.decoder, _grid(), BEAM)
    guided = constrained_beam_search(model.decoder, _grid(), BEAM, _required(model, 2, "bike"))
    for plain_hyps, guided_hyps in zip(plain, guided, strict=True):
        assert plain_hyps[0].tokens == []  # ending at once is the likeliest caption
        assert guided_hyps is not None
        assert guided_hyps[0].tokens == [bike]  # the cheapest caption naming it
        assert guided_hyps[0].log_prob == pytest.approx(float(logp[bike] + logp[eos]), abs=1e-4)


def test_any_word_of_the_set_satisfies_it_and_the_likeliest_is_taken() -> None:
    model = tiny_captioner()
    man, girl = model.vocab.token_id("man"), model.vocab.token_id("girl")
    _fixed(model, {model.vocab.token_id("dog"): 1.0, 2: 3.0, girl: 0.5})
    guided = constrained_beam_search(model.decoder, _grid(1), BEAM, _required(model, 1, "man", "girl"))[0]
    assert guided is not None and guided[0].tokens == [girl]
    assert man not in guided[0].tokens


def test_caption_rules_are_followed_after_the_forced_word() -> None:
    model = tiny_captioner()
    dog, bike = model.vocab.token_id("dog"), model.vocab.token_id("bike")
    _fixed(model, {dog: 1.0, 2: 3.0})
    # no empty caption, and "bike" may not end one: the forced word needs a word after it
    rules = CaptionRules(frozenset({"bike"}), frozenset(), frozenset()).compile(model.vocab)
    guided = constrained_beam_search(model.decoder, _grid(1), BEAM, _required(model, 1, "bike"), rules)[0]
    assert guided is not None
    assert guided[0].tokens == [bike, dog]  # the likeliest word that may end it
    assert all(model.vocab.tokens[h.tokens[-1]] != "bike" for h in guided)


def test_beams_stay_ranked_and_each_names_a_required_word() -> None:
    model = tiny_captioner()
    options = DecodingOptions(method="beam", beam_size=4, num_captions=4, max_length=8)
    grid = _grid(3)
    required = _required(model, 3, "bench", "water")
    ids = {model.vocab.token_id("bench"), model.vocab.token_id("water")}
    for hyps in constrained_beam_search(model.decoder, grid, options, required):
        assert hyps is not None and len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(ids & set(h.tokens) for h in hyps)


def test_batched_equals_one_image_at_a_time_and_a_plain_best_that_names_the_word_is_kept() -> None:
    model = tiny_captioner(attention=True)
    grid = _grid(4)
    plain = beam_search(model.decoder, grid, BEAM)
    word = model.vocab.tokens[plain[0][0].tokens[0]]  # a word the first image's plain caption names
    required = _required(model, 4, word)
    batched = constrained_beam_search(model.decoder, grid, BEAM, required)
    for i in range(4):
        single = constrained_beam_search(model.decoder, grid[i : i + 1], BEAM, required[i : i + 1])[0]
        assert single is not None and batched[i] is not None
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
    assert batched[0] is not None
    assert batched[0][0].tokens == plain[0][0].tokens  # the plain best already satisfies it: the same caption


def test_no_satisfiable_word_gives_none_for_the_caller_to_fall_back() -> None:
    model = tiny_captioner()
    required = torch.zeros(2, len(model.vocab), dtype=torch.bool)
    required[:, 2] = True  # <end> is not a word: it never satisfies the constraint
    assert constrained_beam_search(model.decoder, _grid(), BEAM, required) == [None, None]
    with pytest.raises(ValueError, match="required must have shape"):
        constrained_beam_search(model.decoder, _grid(), BEAM, required[:1])


def test_runs_on_cuda_as_on_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    model = tiny_captioner()
    required = _required(model, 2, "bench")
    cpu = constrained_beam_search(model.decoder, _grid(), BEAM, required)
    gpu = constrained_beam_search(model.to("cuda").decoder, _grid().cuda(), BEAM, required.cuda())
    assert [h[0].tokens for h in cpu if h] == [h[0].tokens for h in gpu if h]


# -- the tag -> caption-word table --------------------------------------------------------------------------------


def test_the_tag_word_table_names_things_as_captions_do() -> None:
    table = load_tag_words()
    assert table["notebook computer"][0] == "laptop"
    assert table["pizza"] == ("pizza",)
    assert "plane" in table["airliner"]
    assert table["kite"] == ("bird",)  # ImageNet's kite is the bird
    assert "dog" not in table.get("hot dog", ())  # a head that names something else alone
    assert table["goldfinch"] == ("bird",)  # no word of its own: its parent's
    assert set(load_tag_table().display_names) >= set(table)


def test_words_for_tags_keeps_the_vocabularys_words_in_order_once() -> None:
    vocab = tiny_captioner().vocab
    assert words_for_tags(["mountain bike", "dog", "African wild dog", "no such tag"], vocab) == ["bike", "dog"]
    assert words_for_tags(["notebook computer"], vocab) == []  # the tiny vocabulary has neither word


def test_the_committed_table_is_what_the_script_builds_from_the_default_vocabulary() -> None:
    from scripts.make_tag_words import build_table

    try:
        vocab = Captioner.from_checkpoint(None).vocab
    except Exception as error:  # noqa: BLE001 - any reason the bundled model is absent
        pytest.skip(f"no bundled default model: {error}")
    words = build_table(vocab)["words"]
    assert words == {name: list(found) for name, found in load_tag_words().items()}
    assert all(word in vocab for found in words.values() for word in found)


# -- when to guide ------------------------------------------------------------------------------------------------


def test_no_word_is_required_when_no_tag_passes_the_threshold_or_the_caption_is_sure() -> None:
    vocab = tiny_captioner().vocab
    policy = GuidancePolicy(min_tag_confidence=0.3, max_caption_confidence=0.5)
    bike = [Tag("mountain bike", 0.6, ("vehicle",))]
    weak = [Tag("mountain bike", 0.2, ("vehicle",))]
    assert required_words(bike, ["a", "man"], 0.1, vocab, policy) == ["bike"]
    assert required_words(bike, ["a", "man"], None, vocab, policy) == ["bike"]  # no confidence model: tags alone
    assert required_words(weak, ["a", "man"], 0.1, vocab, policy) == []
    assert required_words(bike, ["a", "man"], 0.7, vocab, policy) == []
    assert required_words(bike, ["a", "man", "bike"], 0.1, vocab, policy) == []  # already named
    with pytest.raises(ValueError, match="min_tag_confidence must be in"):
        GuidancePolicy(min_tag_confidence=0.0)


def test_captioner_guides_only_images_with_a_confident_tag() -> None:
    model = tiny_captioner()
    bike = model.vocab.token_id("bike")
    _fixed(model, {model.vocab.token_id("dog"): 1.0, 2: 3.0})
    grid = _grid(2)
    # image 2: "mountain bike" at 0.05, below the 0.1 a tag needs; the rest spread over classes without a word of
    # the tiny vocabulary (not uniform over all 1000: the 118 dog breeds would merge into "dog" at 0.12)
    table = load_tag_table()
    dog_classes = table.slot_of_class == table.display_names.index("dog")
    weak = torch.full((1000,), -30.0)
    weak[torch.from_numpy(~dog_classes)] = 0.0
    weak[class_logits_for("mountain bike")[0] > 0] = math.log(0.05 * int((~dog_classes).sum()) / 0.95)
    logits = torch.cat([class_logits_for("mountain bike"), weak.unsqueeze(0)])
    guided = model.caption_features(grid, DecodingOptions(guided_by_tags=True), class_logits=logits)
    plain = model.caption_features(grid, DecodingOptions(), class_logits=logits)
    assert guided[0].captions[0].tokens == ["bike"] and plain[0].captions[0].tokens == []
    assert guided[1].tags[0].name == "mountain bike" and guided[1].tags[0].confidence == pytest.approx(0.05, abs=1e-3)
    assert guided[1].captions == plain[1].captions
    assert bike not in model.vocab.encode(guided[1].captions[0].text)
    # the thresholds are the caller's to change (bench/novel_objects.py measures guidance without its gates)
    lower = GuidancePolicy(min_tag_confidence=0.04)
    both = model.caption_features(grid, DecodingOptions(guided_by_tags=True), class_logits=logits, guidance=lower)
    assert [result.captions[0].tokens for result in both] == [["bike"], ["bike"]]
    with pytest.raises(TagsUnavailableError, match="guided_by_tags needs"):
        model.caption_features(grid, DecodingOptions(guided_by_tags=True))


def test_guided_by_tags_is_a_beam_option() -> None:
    with pytest.raises(ValueError, match="method sample does not use guided_by_tags"):
        DecodingOptions(method="sample", guided_by_tags=True)
    with pytest.raises(ValueError, match="guided_by_tags must be true or false"):
        DecodingOptions(guided_by_tags="yes")  # type: ignore[arg-type]
    assert DecodingOptions(guided_by_tags=True).to_dict()["guided_by_tags"] is True


@pytest.mark.slow
def test_the_onnx_backend_guides_as_torch_does(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from captioner.onnx_export import export_onnx

    model = tiny_captioner()  # no confidence model: guided on the tags alone
    model.encoder.set_classifier(class_head_seeing(model.encoder.feature_dim, "mountain bike"))
    model.save(tmp_path / "m.pt")
    export_onnx(
        Captioner.from_checkpoint(tmp_path / "m.pt"), tmp_path / "export", source="m.pt", source_sha256="0" * 64
    )
    onnx_model = Captioner.from_checkpoint(tmp_path / "export", backend="onnxruntime")
    photos = [Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8)) for value in (20, 120, 220)]
    options = DecodingOptions(guided_by_tags=True, max_length=8)
    torch_results, onnx_results = model.caption(photos, options), onnx_model.caption(photos, options)
    for x, y in zip(torch_results, onnx_results, strict=True):
        assert x.tags[0].name == "mountain bike"
        assert [c.text for c in x.captions] == [c.text for c in y.captions]
        assert [c.log_prob for c in x.captions] == pytest.approx([c.log_prob for c in y.captions], abs=1e-3)
    assert all("bike" in r.captions[0].tokens for r in torch_results)
