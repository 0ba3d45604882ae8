"""Self-critical sequence training: the CIDEr-D reward, sampling with gradients, the baseline, the loss."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from captioner.caption_rules import CaptionRules
from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder
from captioner.text import tokenize
from captioner.vocab import Vocabulary
from tests.helpers import tiny_captioner
from training.metrics import compute_cider_d
from training.scst import CiderD, leave_one_out_advantage, sample_captions, scst_loss

REFERENCES = [
    ["A dog runs through the snow.", "A brown dog is running in snow", "a dog playing in the snow", "Dog in snow."],
    ["Two children play on the beach.", "kids on a sandy beach", "Two kids are playing at the beach ."],
    ["A man rides a bike down a hill.", "a cyclist on a mountain trail", "A man on a bicycle riding downhill"],
    ["A woman in a red coat walks.", "a lady walking in a red jacket", "Woman walking down the street"],
]
CANDIDATES = [
    "a dog runs in the snow",
    "two kids play on the beach",
    "a man is riding a bike",
    "a man in a red coat",
]


def _tokens(captions):
    return [tokenize(c) for c in captions]


def test_cider_d_equals_coco_caption_cider_when_the_corpus_is_the_scored_set() -> None:
    refs = [_tokens(r) for r in REFERENCES]
    hyps = _tokens(CANDIDATES)
    expected = compute_cider_d(hyps, refs)  # equal to pycocoevalcap's Cider (tests/training/test_metrics.py)
    ours = CiderD(refs).scores(range(len(hyps)), hyps)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    assert ours[0] > 1.0 and ours[3] < ours[0]  # a near-reference caption scores high, a wrong one low


def test_document_frequencies_are_counted_by_sorting_not_by_numpys_hashing_unique(monkeypatch) -> None:
    """NumPy 2.3+ answers a plain ``np.unique`` from a hash table: the reward's document frequencies over 21.9
    million (image, n-gram) keys at COCO scale took 36 s that way, 2.3 s sorted, and the hash table grows faster
    than the keys (bench/scale.py's CIDEr-D reward stage went as N^1.14). Neither the reward nor the metric may
    call it; np.unique with counts or an inverse sorts, and is fine."""
    hashing_calls = []
    unique = np.unique

    def watched(values, *args, **kwargs):
        if not args and not any(kwargs.get(f"return_{name}") for name in ("index", "inverse", "counts")):
            hashing_calls.append(np.shape(values))
        return unique(values, *args, **kwargs)

    monkeypatch.setattr(np, "unique", watched)
    refs = [_tokens(r) for r in REFERENCES]
    reward = CiderD(refs)
    reward.scores([0, 1], _tokens(CANDIDATES[:2]))
    compute_cider_d(_tokens(CANDIDATES), refs)
    assert hashing_calls == []


def test_cider_d_rewards_the_right_image_and_penalises_length() -> None:
    reward = CiderD([_tokens(r) for r in REFERENCES])
    caption = tokenize("a dog runs through the snow")
    assert reward.score(0, caption) > 5 * reward.score(1, caption)
    assert reward.score(0, caption) > reward.score(0, caption + ["and", "the", "dog", "runs"] * 3)
    assert reward.score(0, []) == 0.0


def test_document_frequencies_come_from_the_whole_corpus() -> None:
    """The same caption against the same references scores differently once the corpus is larger:
    idf is computed over every image given, not over the images scored together."""
    refs = [_tokens(r) for r in REFERENCES]
    small, large = CiderD(refs[:2]), CiderD(refs)
    caption = tokenize("a dog runs in the snow")
    assert small.score(0, caption) != pytest.approx(large.score(0, caption))
    with pytest.raises(ValueError, match="at least one"):
        CiderD([])


def _plain_cider_d(corpus: list[list[list[str]]], image: int, tokens: list[str], n: int = 4) -> float:
    """CIDEr-D written out with Counters, one caption at a time: idf over every image of ``corpus``."""

    def grams(words: list[str]) -> list[Counter]:
        return [Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1)) for k in range(1, n + 1)]

    df = Counter(g for refs in corpus for g in {g for ref in refs for order in grams(ref) for g in order})

    def vector(words: list[str]) -> list[dict]:
        return [
            {g: c * (math.log(len(corpus)) - math.log(max(1.0, df[g]))) for g, c in o.items()} for o in grams(words)
        ]

    def norm(weights: dict) -> float:
        return math.sqrt(sum(w * w for w in weights.values()))

    hyp, total = vector(tokens), 0.0
    for ref in corpus[image]:
        penalty = math.exp(-((max(len(tokens) - 1, 0) - max(len(ref) - 1, 0)) ** 2) / (2 * 6.0**2))
        for h, r in zip(hyp, vector(ref), strict=True):
            dot = sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)
            total += (dot / (norm(h) * norm(r)) if norm(h) * norm(r) else dot) * penalty
    return total / n / len(corpus[image]) * 10.0


def test_reward_equals_cider_d_written_out_for_samples_with_unseen_words() -> None:
    """Several samples per image, scored against a corpus larger than the batch; n-grams and words that
    no reference has (they weigh in the caption's norm only), repeats, an empty caption."""
    corpus = [_tokens(r) for r in REFERENCES]
    reward = CiderD(corpus)
    images = [0, 0, 0, 2, 2, 3, 1, 0]
    captions = [
        tokenize("a dog runs through the snow"),
        tokenize("a zebra runs through the snow"),  # "zebra" is in no reference
        tokenize("dog dog dog dog in snow snow"),
        tokenize("a man rides a bike down a hill"),
        [],
        tokenize("a woman walking in a red coat on a red street with a red jacket"),
        tokenize("kids play play on a sandy quasar beach"),
        tokenize("snow"),
    ]
    expected = [_plain_cider_d(corpus, i, c) for i, c in zip(images, captions, strict=True)]
    np.testing.assert_allclose(reward.scores(images, captions), expected, rtol=1e-12, atol=1e-12)
    assert reward.score(2, captions[3]) == pytest.approx(expected[3], rel=1e-12)
    assert reward.scores([], []).shape == (0,)
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        reward.scores([0, 1], captions[:3])
    with pytest.raises(ValueError, match="every image"):
        CiderD([corpus[0], []])


def _decoder(vocab_size: int = 12, attention: bool = True) -> CaptionDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size, 8, embed_dim=16, hidden_dim=16, attention=attention, attention_dim=8)
    return CaptionDecoder(config)


@pytest.mark.parametrize("attention", [True, False])
def test_sampling_feeds_words_back_and_keeps_gradients(attention: bool) -> None:
    decoder = _decoder(attention=attention)
    grid = torch.randn(3, 8, 2, 2)
    torch.manual_seed(1)
    tokens, log_probs, mask = sample_captions(decoder, grid, samples=4, max_length=6)
    assert tokens.shape == log_probs.shape == mask.shape
    assert tokens.shape[0] == 12 and tokens.shape[1] <= 7
    banned = {Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.unk_id}
    for row, row_mask in zip(tokens.tolist(), mask.tolist(), strict=True):
        length = sum(t != Vocabulary.pad_id for t in row)
        assert row[length - 1] == Vocabulary.eos_id  # every caption ends with <end>, at max_length at the latest
        assert all(t not in banned for t in row[:length])
        assert all(t == Vocabulary.pad_id for t in row[length:])
        sampled = length - 1 if length == 7 else length  # an <end> forced at max_length was not sampled
        assert row_mask == [True] * sampled + [False] * (len(row) - sampled)
    assert torch.isfinite(log_probs).all()
    assert (log_probs[~mask] == 0).all() and (log_probs[mask] < 0).all()
    log_probs.sum().backward()
    assert decoder.head.weight.grad is not None and decoder.head.weight.grad.abs().sum() > 0
    assert decoder.init_state_proj.weight.grad.abs().sum() > 0  # through the image, too


def test_an_end_forced_at_max_length_is_left_out_of_the_loss() -> None:
    """A caption cut at ``max_length`` gets an ``<end>`` nobody sampled: REINFORCE must not count its
    log-probability (here about -30: it would swamp the sampled words' gradient)."""
    decoder = _decoder().eval()
    with torch.no_grad():
        decoder.head.bias[Vocabulary.eos_id] = -30.0  # the sampler (all but) never picks <end> itself
    grid = torch.randn(2, 8, 2, 2)
    torch.manual_seed(2)
    tokens, log_probs, mask = sample_captions(decoder, grid, samples=3, max_length=4)
    assert (tokens[:, 4] == Vocabulary.eos_id).all()  # every caption was cut at max_length
    assert mask[:, :4].all() and not mask[:, 4].any()
    assert (log_probs[:, 4] == 0).all()
    advantage = torch.tensor([1.0, -1.0, 0.0, 0.5, 0.5, -1.0])
    words = _teacher_forced(decoder, grid, tokens[:, :4])  # (6, 4) the sampled words' log-probabilities
    expected = -(advantage.unsqueeze(1) * words).sum() / words.numel()
    torch.testing.assert_close(scst_loss(log_probs, mask, advantage), expected, rtol=1e-5, atol=1e-5)


def test_seeded_samples_are_those_of_the_sampler_before_it_shared_the_decoding_rollout() -> None:
    """Fixed values, drawn before ``sample_captions`` became a call of ``captioner.decoding.rollout``:
    the same seed must still give the same captions (they depend on torch's random stream too)."""
    decoder = _decoder()
    grid = torch.randn(2, 8, 2, 2)
    torch.manual_seed(7)
    tokens, _, mask = sample_captions(decoder, grid, samples=3, max_length=5)
    assert tokens.tolist() == [
        [8, 8, 10, 8, 5, 2],
        [2, 0, 0, 0, 0, 0],
        [4, 9, 7, 9, 9, 2],
        [9, 9, 10, 5, 4, 2],
        [9, 9, 10, 7, 7, 2],
        [5, 10, 9, 2, 0, 0],
    ]
    assert mask.sum(1).tolist() == [5, 1, 5, 5, 5, 4]  # the <end> forced at max_length is not a sampled token

    model = tiny_captioner()
    rules = CaptionRules.derive([["a", "dog", "runs", "on", "the", "grass"]] * 50 + [["the", "dog", "runs"]] * 50)
    torch.manual_seed(0)
    grid = torch.randn(2, model.encoder.feature_dim, 2, 2)
    torch.manual_seed(11)
    tokens, _, mask = sample_captions(model.decoder, grid, samples=3, max_length=6, rules=rules.compile(model.vocab))
    assert tokens.tolist() == [
        [15, 26, 12, 24, 23, 6, 2],
        [4, 7, 2, 0, 0, 0, 0],
        [5, 17, 17, 12, 11, 26, 2],
        [11, 12, 21, 24, 11, 9, 2],
        [23, 15, 18, 11, 25, 7, 2],
        [5, 16, 28, 11, 16, 13, 2],
    ]
    assert mask.sum(1).tolist() == [6, 3, 6, 6, 6, 6]


def _teacher_forced(decoder: CaptionDecoder, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` fed to the decoder as a caption, with the sampler's banned words."""
    samples = tokens.shape[0] // grid.shape[0]
    captions = torch.cat([torch.full((tokens.shape[0], 1), Vocabulary.bos_id), tokens], dim=1)
    logits, _ = decoder(grid.repeat_interleave(samples, dim=0), captions)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
    banned[[Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.unk_id]] = True
    return logits.masked_fill(banned, float("-inf")).log_softmax(-1).gather(2, tokens.unsqueeze(2)).squeeze(2)


def test_sampled_log_probs_are_the_decoders_own() -> None:
    """Teacher-forcing the sampled words through the decoder gives the same log-probabilities."""
    decoder = _decoder().eval()
    grid = torch.randn(2, 8, 2, 2)
    torch.manual_seed(3)
    tokens, log_probs, mask = sample_captions(decoder, grid, samples=2, max_length=5)
    expected = _teacher_forced(decoder, grid, tokens)
    torch.testing.assert_close(log_probs[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_leave_one_out_baseline() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    advantage = leave_one_out_advantage(rewards, samples=3)
    torch.testing.assert_close(advantage, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=">= 2 samples"):
        leave_one_out_advantage(rewards, samples=1)


def test_a_gradient_step_makes_the_better_sample_more_likely() -> None:
    decoder = _decoder().train()
    decoder.dropout.p = 0.0
    grid = torch.randn(1, 8, 2, 2)
    torch.manual_seed(5)
    tokens, log_probs, mask = sample_captions(decoder, grid, samples=2, max_length=4)
    assert not torch.equal(tokens[0], tokens[1])
    rewards = torch.tensor([1.0, 0.0])  # the first sample is the better one
    loss = scst_loss(log_probs, mask, leave_one_out_advantage(rewards, 2))
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = _teacher_forced(decoder, grid, tokens).masked_fill(~mask, 0.0).sum(1)
    before = log_probs.detach().sum(1)
    assert after[0] > before[0] and after[1] < before[1]
