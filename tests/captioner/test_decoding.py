import numpy as np
import pytest
import torch

from captioner.decoding import (
    APPLIES_TO,
    METHODS,
    DecodingOptions,
    beam_search,
    check_options_apply,
    decode,
    filter_logits,
    greedy,
    sample,
)
from tests.helpers import tiny_captioner

ATTENTION = [False, True]


def _grid(batch=4, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 512, 2, 2)


@pytest.mark.parametrize("attention", ATTENTION)
def test_beam_size_one_equals_greedy(attention):
    model = tiny_captioner(attention=attention)
    grid = _grid()
    g = greedy(model.decoder, grid, DecodingOptions(method="greedy", max_length=12))
    b = beam_search(model.decoder, grid, DecodingOptions(method="beam", beam_size=1, max_length=12))
    for gh, bh in zip(g, b, strict=True):
        assert gh[0].tokens == bh[0].tokens
        assert gh[0].log_prob == pytest.approx(bh[0].log_prob, abs=1e-4)


@pytest.mark.parametrize("attention", ATTENTION)
def test_batched_beam_search_equals_one_image_at_a_time(attention):
    model = tiny_captioner(attention=attention)
    grid = _grid(5)
    options = DecodingOptions(method="beam", beam_size=4, num_captions=3, max_length=10, length_penalty=0.7)
    batched = beam_search(model.decoder, grid, options)
    for i in range(5):
        single = beam_search(model.decoder, grid[i : i + 1], options)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
        if attention:
            np.testing.assert_allclose(single[0].attention, batched[i][0].attention, atol=1e-5)


def test_beam_search_beats_or_matches_greedy_log_prob():
    model = tiny_captioner()
    grid = _grid(6)
    g = greedy(model.decoder, grid, DecodingOptions(method="greedy", max_length=8))
    b = beam_search(model.decoder, grid, DecodingOptions(method="beam", beam_size=5, max_length=8))
    assert all(bh[0].log_prob >= gh[0].log_prob - 1e-4 for gh, bh in zip(g, b, strict=True))
    assert any(bh[0].log_prob > gh[0].log_prob + 1e-3 for gh, bh in zip(g, b, strict=True))


def test_log_prob_is_the_models_probability_of_the_caption():
    model = tiny_captioner()
    grid = _grid(2)
    hyp = greedy(model.decoder, grid, DecodingOptions(method="greedy", max_length=6))[0][0]
    tokens = torch.tensor([[1, *hyp.tokens, 2]])
    with torch.no_grad():
        logits, _ = model.decoder(grid[:1], tokens)
    logits[..., [0, 1, 3]] = float("-inf")  # decoding never produces <pad>/<start>/<unk>
    expected = logits.log_softmax(-1).gather(2, tokens[:, 1:, None]).sum()
    assert hyp.log_prob == pytest.approx(float(expected), abs=1e-4)


def test_seeded_sampling_repeats_and_seeds_differ():
    model = tiny_captioner()
    grid = _grid(3)
    options = DecodingOptions(method="sample", num_captions=4, seed=7, max_length=10)
    first = [[h.tokens for h in hyps] for hyps in sample(model.decoder, grid, options)]
    again = [[h.tokens for h in hyps] for hyps in sample(model.decoder, grid, options)]
    other = [
        [h.tokens for h in hyps]
        for hyps in sample(model.decoder, grid, DecodingOptions(method="sample", num_captions=4, seed=8, max_length=10))
    ]
    assert first == again
    assert first != other
    assert all(len(per_image) == 4 for per_image in first)


def test_a_seeded_sample_of_an_image_does_not_depend_on_its_batch():
    """``captioner caption`` and ``captioner-eval`` decode in batches, the service a seeded request alone: image
    i's samples with seed s must be the same in each, whatever else shares the batch and in whatever order."""
    model = tiny_captioner(attention=True)  # attention: the images' samples differ (asserted last)
    grid = _grid(4)
    options = DecodingOptions(method="sample", num_captions=3, seed=5, max_length=10)
    batched = [[h.tokens for h in hyps] for hyps in sample(model.decoder, grid, options)]
    alone = [[h.tokens for h in sample(model.decoder, grid[i : i + 1], options)[0]] for i in range(4)]
    reversed_batch = [[h.tokens for h in hyps] for hyps in sample(model.decoder, grid.flip(0), options)]
    assert batched == alone
    assert reversed_batch[::-1] == alone
    assert len({tuple(map(tuple, captions)) for captions in alone}) > 1  # the images' samples differ


def test_top_k_one_sampling_is_greedy():
    model = tiny_captioner()
    grid = _grid(3)
    g = greedy(model.decoder, grid, DecodingOptions(method="greedy", max_length=10))
    s = sample(model.decoder, grid, DecodingOptions(method="sample", top_k=1, seed=0, max_length=10))
    assert [h[0].tokens for h in g] == [h[0].tokens for h in s]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


def _biased(model, token: int):
    """Make ``token`` overwhelmingly likely at every step."""
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        model.decoder.head.bias[token] = 50.0
    return model


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_decoding_never_says_unk(method):
    model = _biased(tiny_captioner(), 3)  # <unk> would win every step
    for hyps in decode(model.decoder, _grid(2), DecodingOptions(method=method, max_length=6)):
        assert 3 not in hyps[0].tokens


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_decoding_stops_at_end_token(method):
    model = _biased(tiny_captioner(), 2)  # <end> first
    for hyps in decode(model.decoder, _grid(2), DecodingOptions(method=method, max_length=10)):
        assert hyps[0].tokens == []


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("max_length", [1, 5])
def test_decoding_respects_max_length(method, max_length):
    model = _biased(tiny_captioner(), 5)  # never says <end>
    for hyps in decode(model.decoder, _grid(2), DecodingOptions(method=method, max_length=max_length)):
        assert hyps[0].tokens == [5] * max_length


def test_attention_weights_come_with_each_word():
    model = tiny_captioner(attention=True)
    results = model.caption_features(_grid(2), DecodingOptions(method="beam", max_length=6))
    for result in results:
        caption = result.captions[0]
        assert result.attention_shape == (2, 2)
        assert len(caption.attention) == len(caption.tokens)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in caption.attention)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nucleus"}, "expected one of greedy, sample, beam"),
        ({"temperature": 0}, r"temperature must be in \(0, 10.0\]"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"beam_size": 0}, r"beam_size must be an integer in \[1, 20\]"),
        ({"max_length": 0}, r"max_length must be an integer in \[1, 100\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"num_captions": 4, "beam_size": 3}, "num_captions must be <= beam_size"),
        ({"method": "greedy", "num_captions": 2}, "greedy decoding gives one caption"),
        ({"length_penalty": -1}, r"length_penalty must be in \[0.0, 5.0\]"),
    ],
)
def test_invalid_options_name_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**kwargs)


def test_runs_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    model = tiny_captioner().to("cuda")
    for method in ("greedy", "sample", "beam"):
        options = DecodingOptions(method=method, **({"seed": 0} if method == "sample" else {}))
        cpu = decode(tiny_captioner().decoder, _grid(2), options)
        gpu = decode(model.decoder, _grid(2).cuda(), options)
        if method != "sample":
            assert [h[0].tokens for h in cpu] == [h[0].tokens for h in gpu]


def test_an_option_the_method_does_not_use_is_refused_and_not_echoed() -> None:
    with pytest.raises(ValueError, match=r"method sample does not use beam_size \(beam_size is for beam\)"):
        DecodingOptions(method="sample", beam_size=5)
    with pytest.raises(ValueError, match="method beam does not use seed"):
        DecodingOptions(method="beam", seed=1)
    with pytest.raises(ValueError, match="method greedy does not use length_penalty"):
        DecodingOptions(method="greedy", length_penalty=1.0)
    assert DecodingOptions(method="greedy").to_dict() == {"method": "greedy", "max_length": 20, "min_confidence": 0.0}
    assert DecodingOptions(method="beam", beam_size=4).to_dict() == {
        "method": "beam", "max_length": 20, "beam_size": 4, "length_penalty": 0.0, "num_captions": 1,
        "min_confidence": 0.0, "guided_by_tags": False,
    }  # fmt: skip
    assert set(DecodingOptions(method="sample", seed=3).to_dict()) == {
        "method", "max_length", "temperature", "top_k", "top_p", "num_captions", "seed", "min_confidence",
    }  # fmt: skip


def test_an_option_given_for_a_method_that_does_not_use_it_is_refused_even_at_its_default() -> None:
    # DecodingOptions cannot tell a default from a value set to it; the front ends pass what the caller named
    assert DecodingOptions(method="sample", beam_size=3) == DecodingOptions(method="sample")
    with pytest.raises(ValueError) as caught:
        check_options_apply("sample", ["beam_size"])
    assert str(caught.value) == "method sample does not use beam_size (beam_size is for beam): leave it out"
    with pytest.raises(ValueError, match="method greedy does not use num_captions, seed"):
        check_options_apply("greedy", ["seed", "max_length", "num_captions"])  # named in APPLIES_TO's order
    with pytest.raises(ValueError, match="unknown method 'best'"):
        check_options_apply("best", [])
    for method in METHODS:  # what the method uses, the options every method uses, and other names pass
        used = [name for name, methods in APPLIES_TO.items() if method in methods]
        check_options_apply(method, [*used, "method", "max_length", "attention"])
        for name in APPLIES_TO.keys() - set(used):
            with pytest.raises(ValueError, match=f"method {method} does not use {name} "):
                check_options_apply(method, [name])
