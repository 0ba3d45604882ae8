"""Decoding written once over the array API: the same algorithm on numpy arrays as on torch tensors.

The numpy side is what the ONNX Runtime backend runs with no torch installed. Here a numpy adapter around the
tiny torch decoder feeds the numpy path the very logits the torch path sees, so any difference is the
bookkeeping's: every method must give the same words, scores and attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner.arrays import SMALL_K, convert_like, draw, log_softmax, make_generator, softmax, topk
from captioner.caption_rules import CaptionRules, RuleMasks
from captioner.decoder_state import DecoderState
from captioner.decoding import DecodingOptions, constrained_beam_search, decode
from captioner.transforms import Preprocess, normalize_crops
from captioner.vocabulary_extension import VocabularyExtension
from tests.helpers import tiny_captioner


class NumpyDecoder:
    """The torch decoder behind numpy arrays in and out, as ``OnnxDecoder`` is."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.decoder = decoder
        self.config = decoder.config

    @staticmethod
    def _numpy(state: DecoderState) -> DecoderState:
        def arr(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.numpy()

        return DecoderState(tuple(h.numpy() for h in state.hidden), arr(state.memory), arr(state.keys))

    @staticmethod
    def _torch(state: DecoderState) -> DecoderState:
        def ten(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

        return DecoderState(tuple(ten(h) for h in state.hidden), ten(state.memory), ten(state.keys))

    @torch.inference_mode()
    def init_state(self, grid: np.ndarray) -> DecoderState:
        assert isinstance(grid, np.ndarray)
        return self._numpy(self.decoder.init_state(torch.from_numpy(grid)))

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, state: DecoderState):
        assert isinstance(tokens, np.ndarray) and isinstance(state.hidden[0], np.ndarray)
        logits, state, alpha = self.decoder.step(torch.from_numpy(tokens), self._torch(state))
        return logits.numpy(), self._numpy(state), None if alpha is None else alpha.numpy()


@pytest.fixture(params=[True, False], ids=["attention", "plain"])
def model(request):
    return tiny_captioner(attention=request.param)


def _grid(model, batch: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, model.encoder.feature_dim, 2, 2)


def _rules(model) -> RuleMasks:
    """Rules that bite on the tiny vocabulary, and one locked word (as a vocabulary extension's)."""
    rules = CaptionRules(frozenset({"a", "the", "on"}), frozenset({("black", "dog")}), frozenset({"on", "runs"}))
    locked = VocabularyExtension({"grass": "dog"}).locked_mask(model.vocab)
    return rules.compile(model.vocab, locked)


def _same(torch_hyps, numpy_hyps) -> None:
    assert len(torch_hyps) == len(numpy_hyps)
    for want, have in zip(torch_hyps, numpy_hyps, strict=True):
        assert [h.tokens for h in have] == [h.tokens for h in want]
        assert [h.log_prob for h in have] == pytest.approx([h.log_prob for h in want], abs=1e-4)
        assert [h.score for h in have] == pytest.approx([h.score for h in want], abs=1e-4)
        for w, h in zip(want, have, strict=True):
            assert (w.attention is None) == (h.attention is None)
            if w.attention is not None:
                assert isinstance(h.attention, np.ndarray) and isinstance(w.attention, np.ndarray)
                np.testing.assert_allclose(h.attention, w.attention, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        DecodingOptions(method="greedy", max_length=8),
        DecodingOptions(method="beam", beam_size=3, num_captions=3, max_length=8),
        DecodingOptions(method="beam", beam_size=4, length_penalty=1.0, max_length=3),  # many cut off at max_length
        DecodingOptions(method="sample", num_captions=3, seed=7, max_length=8),
        DecodingOptions(method="sample", top_k=3, top_p=0.8, temperature=0.7, seed=3, max_length=8),
    ],
    ids=["greedy", "beam", "beam-short", "sample", "sample-filtered"],
)
@pytest.mark.parametrize("with_rules", [False, True], ids=["free", "rules"])
def test_numpy_decoding_matches_torch(model, options, with_rules) -> None:
    grid = _grid(model)
    rules = _rules(model) if with_rules else None
    torch_hyps = decode(model.decoder, grid, options, rules.like(grid) if rules else None)
    numpy_hyps = decode(NumpyDecoder(model.decoder), grid.numpy(), options, rules)
    _same(torch_hyps, numpy_hyps)
    if with_rules:  # the locked word is never said unguided, on either side
        grass = model.vocab.token_id("grass")
        assert all(grass not in h.tokens for hyps in numpy_hyps for h in hyps)


def test_numpy_constrained_beam_search_matches_torch(model) -> None:
    grid = _grid(model)
    required = np.zeros((4, len(model.vocab)), dtype=bool)
    required[0, model.vocab.token_id("grass")] = True  # a locked word, unlocked for its image only
    required[1, [model.vocab.token_id("bike"), model.vocab.token_id("log")]] = True
    required[2, model.vocab.token_id("dog")] = True
    required[3, model.vocab.token_id("two")] = True
    options = DecodingOptions(method="beam", beam_size=3, num_captions=2, max_length=8)
    rules = _rules(model)
    torch_found = constrained_beam_search(model.decoder, grid, options, torch.from_numpy(required), rules.like(grid))
    numpy_found = constrained_beam_search(NumpyDecoder(model.decoder), grid.numpy(), options, required, rules)
    assert [f is None for f in numpy_found] == [f is None for f in torch_found]
    assert any(f is not None for f in numpy_found)
    for want, have, words in zip(torch_found, numpy_found, required, strict=True):
        if want is not None:
            _same([want], [have])
            assert all(set(h.tokens) & set(np.flatnonzero(words).tolist()) for h in have)


def test_a_seed_draws_the_same_samples_on_either_kind_of_array() -> None:
    rng = np.random.default_rng(0)
    probabilities = softmax(rng.normal(size=(5, 50)).astype(np.float32))
    probabilities[:, 10:20] = 0.0  # words of probability 0 are never drawn
    first = draw(probabilities, make_generator(11))
    again = draw(torch.from_numpy(probabilities), make_generator(11))
    assert isinstance(again, torch.Tensor) and first.tolist() == again.tolist()
    many = np.concatenate([draw(probabilities, make_generator(s)) for s in range(200)])
    assert not np.isin(many, np.arange(10, 20)).any()
    assert len(set(many.tolist())) > 10  # and it does draw, not always the likeliest


def test_topk_and_log_softmax_agree_across_kinds() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 40)).astype(np.float32)
    x[0, :5] = -np.inf
    values, indices = topk(x, 4)
    want_values, want_indices = torch.from_numpy(x).topk(4, dim=-1)
    np.testing.assert_array_equal(values, want_values.numpy())
    np.testing.assert_array_equal(indices, want_indices.numpy())
    np.testing.assert_allclose(log_softmax(x), torch.from_numpy(x).log_softmax(-1).numpy(), atol=1e-6)
    # both ways numpy's top-k takes (argmax passes for a few, a partition for many, or where -inf is among them)
    for k in (1, 3, SMALL_K, SMALL_K + 3):
        for rows in (x, x[1:]):
            values, indices = topk(rows, k)
            want_values, want_indices = torch.from_numpy(rows).topk(k, dim=-1)
            np.testing.assert_array_equal(values, want_values.numpy())
            np.testing.assert_array_equal(indices, want_indices.numpy())
    few = np.full((2, 6), -np.inf, dtype=np.float32)
    few[:, :2] = [[1.0, 2.0], [0.5, 0.25]]  # fewer finite values than k: still k distinct indices
    values, indices = topk(few, 4)
    assert [len(set(row)) for row in indices.tolist()] == [4, 4]
    np.testing.assert_array_equal(values[:, :2], [[2.0, 1.0], [0.5, 0.25]])


def test_rule_masks_move_to_the_kind_and_device_of_the_arrays(model) -> None:
    rules = _rules(model)
    assert isinstance(rules.no_end, np.ndarray)
    on_torch = rules.like(torch.zeros(1))
    assert isinstance(on_torch.no_end, torch.Tensor) and isinstance(on_torch.locked, torch.Tensor)
    assert on_torch.like(torch.zeros(1)) is on_torch  # already there: no copy
    assert rules.like(np.zeros(1)) is rules
    np.testing.assert_array_equal(convert_like(on_torch.no_end_pairs, np.zeros(1)), rules.no_end_pairs)


def test_numpy_preprocessing_gives_torch_s_pixels_to_the_bit() -> None:
    """The normalisation moved from torch to numpy: the same float32 operations, the same bits."""
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    preprocess = Preprocess(resize=16, crop=16)
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float()  # the former torch implementation
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0
    expected = pixels.sub_(mean).div_(std).numpy()
    got = normalize_crops(crops, preprocess)
    assert got.dtype == np.float32 and got.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(got, expected)
