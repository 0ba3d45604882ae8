"""Caption rules: learned from training captions, stored in checkpoints and exports, and followed by
every decoding method and the self-critical sampler."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.caption_rules import CaptionRules
from captioner.decoding import DecodingOptions, beam_search, decode
from captioner.vocab import Vocabulary
from tests.helpers import make_flickr_folder, require_data, tiny_captioner
from training.data_commands import main as captioner_main
from training.scst import sample_captions

METHODS = ["greedy", "sample", "beam"]
ROOT = Path(__file__).resolve().parents[2]


def _corpus() -> list[list[str]]:
    """300 captions: "a"/"on"/"the" never end one; "grass" and "dog" often do; "runs" never starts one.
    "rare" is seen 5 times and never ends a caption: too little evidence to rule it out."""
    captions = [["a", "dog", "runs", "on", "the", "grass"]] * 150 + [["the", "dog", "runs"]] * 100
    captions += [["a", "dog", "on", "a", "blue", "mat"]] * 150 + [["dressed", "in", "blue"]] * 3
    captions += [["a", "rare", "dog"]] * 5
    return [list(c) for c in captions]


def test_rules_are_learned_from_the_training_captions() -> None:
    rules = CaptionRules.derive(_corpus())
    assert {"a", "on", "the"} <= rules.no_end
    assert not {"grass", "dog", "runs", "mat"} & rules.no_end
    assert "rare" not in rules.no_end  # 0 endings in 5 sightings: not enough evidence
    assert "blue" not in rules.no_end  # it ends "dressed in blue" ...
    assert ("a", "blue") in rules.no_end_pairs  # ... but never "a blue"
    assert "runs" in rules.no_start and "a" not in rules.no_start and "the" not in rules.no_start
    assert rules.dangling(["a", "dog", "on", "a", "blue"]) and rules.dangling(["a", "dog", "on"])
    assert rules.dangling([]) and not rules.dangling(["a", "dog", "runs"])
    assert rules.subjectless(["runs", "on", "the", "grass"]) and not rules.subjectless(["a", "dog"])
    assert CaptionRules.from_dict(json.loads(json.dumps(rules.to_dict()))) == rules
    raw = [" ".join(words).capitalize() + " ." for words in _corpus()]  # as a data set spells them
    assert CaptionRules.learn(raw) == rules


def test_invalid_rate_and_empty_corpus_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rate"):
        CaptionRules.derive(_corpus(), max_rate=1.5)
    with pytest.raises(ValueError, match="no captions"):
        CaptionRules.derive([])


# --- the constraint itself, on a decoder with known preferences ----------------------------------


def _preferring(order: list[str]) -> Captioner:
    """A tiny model that, at every step, prefers the words of ``order`` in that order, far above the rest."""
    model = tiny_captioner()
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        for rank, word in enumerate(order):
            model.decoder.head.bias[model.vocab.tokens.index(word)] = 50.0 - 10.0 * rank
    return model


def _rules(no_end=(), pairs=(), no_start=()) -> CaptionRules:
    return CaptionRules(frozenset(no_end), frozenset(pairs), frozenset(no_start))


def _words(model: Captioner, options: DecodingOptions, rules: CaptionRules | None) -> list[str]:
    masks = rules.compile(model.vocab) if rules is not None else None
    grid = torch.randn(1, model.encoder.feature_dim, 2, 2)
    return model.vocab.decode_tokens(decode(model.decoder, grid, options, masks)[0][0].tokens)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_follows_the_rules(method: str) -> None:
    """Preferences: <end>, dog, on, grass. Unconstrained, every caption is empty. With the rules: no empty
    caption, not starting with "dog", not ending on "on" nor on the pair "grass on"."""
    model = _preferring(["<end>", "dog", "on", "grass"])
    options = DecodingOptions(method=method, max_length=10, **({"seed": 0} if method == "sample" else {}))
    assert _words(model, options, None) == []
    rules = _rules(no_end={"on"}, no_start={"dog"})
    assert _words(model, options, rules) == ["on", "dog"]  # "on" may start; <end> may not follow it
    rules = _rules(no_end={"on"}, pairs={("on", "dog")}, no_start={"dog"})
    assert _words(model, options, rules) == ["on", "dog", "dog"]


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_out_of_room_a_caption_still_ends(method: str) -> None:
    model = _preferring(["<end>", "on"])
    options = DecodingOptions(method=method, max_length=3, **({"seed": 0} if method == "sample" else {}))
    assert _words(model, options, _rules(no_end={"on"})) == ["on", "on", "on"]  # cut at max_length


def test_out_of_room_beam_search_returns_a_complete_caption_when_it_has_one() -> None:
    model = _preferring(["<end>", "on"])
    rules = _rules(no_end={"on"})
    words = _words(model, DecodingOptions(method="beam", beam_size=3, max_length=3), rules)
    assert 1 <= len(words) <= 3 and not rules.dangling(words), words


def test_beam_search_ranks_complete_captions_before_cut_off_ones() -> None:
    """At max_length 1 every beam is cut off after one word; "dog" (likelier) may not end a caption and
    "grass" may, so "grass" is ranked first although its score is lower."""
    model = _preferring(["<end>", "dog", "grass"])
    options = DecodingOptions(method="beam", beam_size=3, num_captions=3, max_length=1)
    masks = _rules(no_end={"dog"}).compile(model.vocab)
    hyps = beam_search(model.decoder, torch.randn(1, model.encoder.feature_dim, 2, 2), options, masks)[0]
    words = [model.vocab.decode_tokens(h.tokens) for h in hyps]
    assert words[0] == ["grass"] and ["dog"] in words
    assert hyps[0].score < next(h.score for h in hyps if model.vocab.decode_tokens(h.tokens) == ["dog"])


def test_random_models_never_break_the_rules_before_max_length() -> None:
    """Property check on an untrained model: most words may not end a caption, some may not start one."""
    model = tiny_captioner(seed=3)
    with torch.no_grad():
        model.decoder.head.bias[Vocabulary.eos_id] += 3.0  # it would end early and often, if allowed
    words = [w for w in model.vocab.tokens[4:]]
    rules = _rules(
        no_end=set(words[::2]), pairs={(a, b) for a in words[:6] for b in words[1::2]}, no_start=set(words[::3])
    )
    masks = rules.compile(model.vocab)
    grid = torch.randn(12, model.encoder.feature_dim, 2, 2)
    max_length = 12
    outputs = []
    for options in (
        DecodingOptions(method="greedy", max_length=max_length),
        DecodingOptions(method="beam", beam_size=3, num_captions=3, max_length=max_length),
        DecodingOptions(method="sample", num_captions=5, seed=1, max_length=max_length),
    ):
        outputs += [h.tokens for hyps in decode(model.decoder, grid, options, masks) for h in hyps]
    tokens, _, _ = sample_captions(model.decoder, grid, samples=5, max_length=max_length, rules=masks)
    outputs += [row[: row.index(Vocabulary.eos_id)] for row in tokens.tolist()]  # every row ends with <end>
    checked = 0
    for ids in outputs:
        caption = model.vocab.decode_tokens(ids)
        assert caption and not rules.subjectless(caption), caption
        if len(caption) < max_length:
            assert not rules.dangling(caption), caption
            checked += 1
    assert checked >= 15  # the rules were exercised, not dodged by running out of room


def test_self_critical_sampler_keeps_gradients_under_the_rules() -> None:
    model = tiny_captioner()
    masks = _rules(no_end={"a", "the"}).compile(model.vocab)
    grid = torch.randn(2, model.encoder.feature_dim, 2, 2)
    _, log_probs, mask = sample_captions(model.decoder, grid, samples=3, max_length=6, rules=masks)
    assert torch.isfinite(log_probs).all()
    (log_probs * mask).sum().backward()
    assert model.decoder.head.weight.grad is not None and model.decoder.head.weight.grad.abs().sum() > 0


# --- where the rules travel ------------------------------------------------------------------------


def test_rules_travel_in_the_checkpoint_and_old_checkpoints_decode_as_before(tmp_path: Path) -> None:
    model = tiny_captioner()
    old = tmp_path / "old.pt"
    model.save(old)
    assert Captioner.from_checkpoint(old).caption_rules is None
    model.caption_rules = _rules(no_end={"a"}, pairs={("on", "the")}, no_start={"on"})
    new = tmp_path / "new.pt"
    model.save(new)
    assert Captioner.from_checkpoint(new).caption_rules == model.caption_rules


def test_compile_drops_words_outside_the_vocabulary() -> None:
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])
    masks = _rules(no_end={"a", "zebra"}, pairs={("a", "dog"), ("a", "zebra")}, no_start={"dog", "zebra"}).compile(
        vocab
    )
    assert masks.no_end.tolist() == [False, False, False, False, True, False]
    assert masks.no_start.tolist() == [False, False, False, False, False, True]
    assert masks.no_end_pairs.tolist() == [4 * 6 + 5]


def test_captioner_rules_command_adds_rules_learned_from_the_data(tmp_path: Path, capsys) -> None:
    data = make_flickr_folder(tmp_path / "flickr")
    model = tiny_captioner()
    source, target = tmp_path / "model.pt", tmp_path / "with-rules.pt"
    model.save(source)
    # a tiny data set: a higher rate than the default, which needs ~100 sightings to rule a word out
    assert captioner_main(["rules", str(source), str(target), "--data", str(data), "--max-rate", "0.2"]) == 0
    assert "captions may not end on" in capsys.readouterr().out
    loaded = Captioner.from_checkpoint(target)
    assert loaded.caption_rules is not None and "a" in loaded.caption_rules.no_end
    assert loaded.metadata["caption_rules_from"]["captions"] > 0
    assert torch.equal(loaded.decoder.head.weight, Captioner.from_checkpoint(source).decoder.head.weight)
    assert captioner_main(["rules", str(source), str(target), "--data", str(tmp_path / "nowhere")]) == 2
    assert "error" in capsys.readouterr().err


# --- the shipped default model ---------------------------------------------------------------------


def _bench_caption_endings():
    spec = importlib.util.spec_from_file_location("bench_caption_endings", ROOT / "bench" / "caption_endings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_independent_scorer_counts_bad_endings_and_starts(tmp_path: Path, capsys) -> None:
    bench = _bench_caption_endings()
    result = bench.judge(["a dog runs on a red", "is standing in a bath", "a dog jumps up", "a man on the dirt", ""])
    assert result["dangling"] == 2 and result["subjectless"] == 1  # "red" and the empty caption; "is"
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 1, "caption": "a dog on a blue"}]))
    assert bench.main([str(predictions)]) == 0
    assert "1 (100.00 %)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_model_ends_its_captions_properly_on_flickr8k_test_photos() -> None:
    """The shipped file carries rules, and on real test photos an independent word list finds no caption
    ending on an article, preposition, conjunction, colour or bare adjective (it found 4-6 % before)."""
    photos = require_data("flickr8k", "images")
    split = require_data("flickr8k", "splits", "Flickr_8k.testImages.txt")
    names = split.read_text().split()[:100]
    model = Captioner.from_checkpoint(None, backend="auto")
    assert model.caption_rules is not None and {"a", "the", "wooden"} <= model.caption_rules.no_end
    results = model.caption([str(photos / name) for name in names], DecodingOptions(method="beam", beam_size=3))
    captions = [r.captions[0].text for r in results]
    judged = _bench_caption_endings().judge(captions)
    assert judged["dangling"] == 0 and judged["subjectless"] == 0, judged
