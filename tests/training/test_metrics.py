"""training.metrics must report pycocoevalcap's (coco-caption's) numbers, to 1e-6.

Three levels of evidence:
- a committed fixture of hand-written captions with the scores pycocoevalcap 1.2 gave for them
  (Java tokenizer and all), checked without Java or pycocoevalcap;
- when pycocoevalcap is installed, its Bleu/Rouge/Cider scorers run live on the same tokens, for the
  fixture and for 150 Flickr8k images (real references, predictions taken from other images or
  corrupted references), per image where the scorer gives per-image scores;
- when Java is present too, pycocoevalcap's whole pipeline (PTBTokenizer, scorers, METEOR) runs on
  the raw captions.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from captioner.text import tokenize
from tests.helpers import require_data
from training import metrics as metrics_module
from training.metrics import (
    compute_bleu,
    compute_cider_d,
    compute_metrics,
    compute_rouge_l,
    format_metrics,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "metrics" / "coco_caption_scores.json"
JAVA_FREE = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
TOL = 1e-6


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def flickr_sample() -> tuple[dict[str, str], dict[str, list[str]]]:
    """150 Flickr8k images: real references; predictions that are wrong, partly right or right."""
    path = require_data("flickr8k", "captions.txt")
    captions: dict[str, list[str]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions[row["image"]].append(row["caption"])
    rng = random.Random(0)
    ids = rng.sample(sorted(captions), 150)
    predictions, references = {}, {}
    for n, image_id in enumerate(ids):
        own = captions[image_id]
        kind = n % 4
        if kind == 0:  # a caption of another image
            predictions[image_id] = captions[ids[(n + 1) % len(ids)]][rng.randrange(5)]
        elif kind == 1:  # a reference with words dropped and two swapped
            words = [w for w in own[0].split() if rng.random() > 0.25]
            if len(words) > 2:
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
            predictions[image_id] = " ".join(words)
        elif kind == 2:  # a held-out human caption
            predictions[image_id] = own[0]
        else:  # the start of a reference
            predictions[image_id] = " ".join(own[1].split()[:4])
        references[image_id] = own[1:] if kind == 2 else own
    return predictions, references


def _coco_scorers():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test dependency) is not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return Bleu, Rouge, Cider


def _coco_scores(gts: dict, res: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """pycocoevalcap's scores for already tokenised captions (space-joined, as its tokenizer returns)."""
    Bleu, Rouge, Cider = _coco_scorers()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)
    corpus = {f"BLEU-{k + 1}": b for k, b in enumerate(bleu)}
    corpus.update({"ROUGE-L": float(rouge), "CIDEr": float(cider)})
    return corpus, {"ROUGE-L": np.asarray(rouge_per_image), "CIDEr": np.asarray(cider_per_image)}


def _ours_tokenised(predictions: dict, references: dict) -> tuple[dict, dict]:
    gts = {k: [" ".join(tokenize(c)) for c in references[k]] for k in references}
    res = {k: [" ".join(tokenize(predictions[k]))] for k in references}
    return gts, res


def _assert_close(ours: dict[str, float], expected: dict[str, float], keys=JAVA_FREE) -> None:
    for key in keys:
        assert abs(ours[key] - expected[key]) <= TOL, (key, ours[key], expected[key])


def _requires_java() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test dependency) is not installed")
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH")


# --- parity with coco-caption ---------------------------------------------------------------------


def test_fixture_matches_recorded_coco_caption_scores(fixture):
    ours = compute_metrics(fixture["predictions"], fixture["references"], java=False)
    assert list(ours) == list(JAVA_FREE)
    _assert_close(ours, fixture["expected"])
    ids = list(fixture["references"])
    hyps = [tokenize(fixture["predictions"][i]) for i in ids]
    refs = [[tokenize(c) for c in fixture["references"][i]] for i in ids]
    for key, per_image in (("ROUGE-L", compute_rouge_l(hyps, refs)), ("CIDEr", compute_cider_d(hyps, refs))):
        expected = np.array([fixture["expected_per_image"][key][i] for i in ids])
        np.testing.assert_allclose(per_image, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("source", ["fixture", "flickr8k"])
def test_scores_equal_pycocoevalcap_scorers_on_the_same_tokens(source, request):
    if source == "fixture":
        data = request.getfixturevalue("fixture")
        predictions, references = data["predictions"], data["references"]
    else:
        predictions, references = request.getfixturevalue("flickr_sample")
    gts, res = _ours_tokenised(predictions, references)
    expected, expected_per_image = _coco_scores(gts, res)
    _assert_close(compute_metrics(predictions, references, java=False), expected)
    hyps = [res[k][0].split() for k in gts]
    refs = [[c.split() for c in gts[k]] for k in gts]
    np.testing.assert_allclose(compute_rouge_l(hyps, refs), expected_per_image["ROUGE-L"], rtol=0, atol=TOL)
    np.testing.assert_allclose(compute_cider_d(hyps, refs), expected_per_image["CIDEr"], rtol=0, atol=TOL)


def test_flickr8k_scores_equal_the_whole_coco_caption_pipeline(flickr_sample):
    """Raw captions through pycocoevalcap's Java PTBTokenizer and scorers vs compute_metrics."""
    _requires_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions, references = flickr_sample
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    expected, _ = _coco_scores(gts, res)
    _assert_close(compute_metrics(predictions, references, java=False), expected)


def test_meteor_equals_pycocoevalcap_meteor(fixture):
    _requires_java()
    from pycocoevalcap.meteor.meteor import Meteor

    predictions, references = fixture["predictions"], fixture["references"]
    coco = Meteor()  # starts its JVM now, so it loads while ours runs
    ours = compute_metrics(predictions, references, java=True)
    gts, res = _ours_tokenised(predictions, references)
    expected, _ = coco.compute_score(gts, res)
    assert abs(ours["METEOR"] - expected) <= TOL
    assert abs(ours["METEOR"] - fixture["expected"]["METEOR"]) <= TOL
    assert list(ours) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def test_lcs_matches_dynamic_programming():
    def lcs_dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(1)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(1, 40))]
        b = [rng.choice("abcd") for _ in range(rng.randint(1, 40))]
        assert metrics_module._lcs_length(metrics_module._match_masks(a), len(a), b) == lcs_dp(a, b)


# --- behaviour and edge cases ---------------------------------------------------------------------


def test_identical_prediction_scores_bleu_one():
    refs = {"a": ["A dog runs on the grass .", "A brown dog in a field"], "b": ["Two kids play in water ."]}
    preds = {"a": "A dog runs on the grass.", "b": "two kids play in water"}
    scores = compute_metrics(preds, refs, java=False)
    for k in range(1, 5):
        assert scores[f"BLEU-{k}"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE-L"] == pytest.approx(1.0)


def test_empty_prediction_scores_zero_for_that_image():
    hyps = [[], ["a", "cat", "on", "a", "mat"]]
    refs = [[["a", "dog", "on", "grass"]], [["a", "cat", "on", "a", "mat"]]]
    rouge, cider = compute_rouge_l(hyps, refs), compute_cider_d(hyps, refs)
    assert rouge[0] == 0.0 and cider[0] == 0.0
    assert rouge[1] == pytest.approx(1.0) and cider[1] > 0
    assert compute_bleu([[]], [[["a", "dog"]]]) == pytest.approx([0.0] * 4, abs=1e-6)


def test_edge_cases_equal_pycocoevalcap():
    """Empty prediction, much longer prediction, single reference, identical, repeated words."""
    predictions = {
        "empty": "",
        "long": "a man in a blue shirt and black shorts is riding a red bike very fast down a steep hill today",
        "single": "a cat on a mat",
        "identical": "two dogs play in the snow",
        "repeats": "dog dog dog dog dog",
    }
    references = {
        "empty": ["a man rides a bike", "..."],
        "long": ["a man rides a bike", "a cyclist on a hill"],
        "single": ["a black cat sits on the mat ."],
        "identical": ["two dogs play in the snow", "dogs in snow"],
        "repeats": ["a dog and a dog", "two dogs"],
    }
    gts, res = _ours_tokenised(predictions, references)
    expected, per_image = _coco_scores(gts, res)
    _assert_close(compute_metrics(predictions, references, java=False), expected)
    # A reference that tokenises to nothing is one empty token for pycocoevalcap's ROUGE-L: an empty
    # prediction then matches it perfectly.
    assert per_image["ROUGE-L"][0] == 1.0


def test_brevity_penalty_only_for_short_predictions():
    refs = [[["a", "dog", "runs"]]]
    long_hyp = [["a", "dog", "runs", "on", "the", "green", "grass"]]
    assert compute_bleu(long_hyp, refs)[0] == pytest.approx(3 / 7)  # clipped precision, no penalty
    short = compute_bleu([["a", "dog"]], refs)[0]
    assert short == pytest.approx(np.exp(1 - 3 / 2), rel=1e-6)  # precision 1 times exp(1 - r/c)


def test_cider_document_frequency_comes_from_the_evaluated_set(fixture):
    predictions, references = fixture["predictions"], fixture["references"]
    subset = list(references)[:4]
    full = compute_metrics(predictions, references, java=False)
    part = compute_metrics({k: predictions[k] for k in subset}, {k: references[k] for k in subset}, java=False)
    assert part["CIDEr"] != pytest.approx(full["CIDEr"])
    assert part["BLEU-1"] != pytest.approx(full["BLEU-1"])


def test_single_image_cider_is_zero():
    # log(number of images) = 0, so every idf weight vanishes (as in pycocoevalcap).
    assert compute_metrics({"x": "a dog"}, {"x": ["a dog"]}, java=False)["CIDEr"] == 0.0


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({"a": "x", "b": "y"}, {"a": ["x"], "c": ["y"]}, "same ids"),
        ({"a": "x"}, {"a": []}, "no reference captions"),
        ({"a": "x"}, {"a": "x"}, "list of captions"),
        ({}, {}, "nothing to score"),
    ],
)
def test_invalid_inputs_raise_value_error(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(predictions, references, java=False)


def test_java_false_never_starts_a_process(monkeypatch, fixture):
    def no_process(*args, **kwargs):
        raise AssertionError("java=False must not start a subprocess")

    monkeypatch.setattr(metrics_module.subprocess, "Popen", no_process)
    scores = compute_metrics(fixture["predictions"], fixture["references"], java=False)
    assert "METEOR" not in scores


def test_meteor_is_skipped_with_a_message_without_java(monkeypatch, caplog, fixture):
    monkeypatch.setattr(metrics_module.shutil, "which", lambda name: None)
    with caplog.at_level(logging.INFO, logger="training.metrics"):
        scores = compute_metrics(fixture["predictions"], fixture["references"])
    assert "METEOR" not in scores and set(JAVA_FREE) <= set(scores)
    assert "METEOR skipped: java is not on PATH" in caplog.text
    assert "SPICE skipped" in caplog.text
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        compute_metrics(fixture["predictions"], fixture["references"], java=True)


def test_format_metrics_table():
    table = format_metrics({"loss": 2.5, "CIDEr": 0.91234, "BLEU-1": 0.5, "METEOR": 0.2})
    assert table.splitlines() == [
        "metric     score",
        "------  --------",
        "BLEU-1    0.5000",
        "METEOR    0.2000",
        "CIDEr     0.9123",
        "loss      2.5000",
    ]
