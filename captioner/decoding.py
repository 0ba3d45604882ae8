"""Greedy, sampling and beam-search decoding, batched over images, on CPU or CUDA, for either backend.

Every method calls the decoder's ``init_state`` once and ``step`` once per word (:class:`StepDecoder`),
feeding each chosen word back in. Each image's result is a list of :class:`Hypothesis`. The algorithms are
written once against the array API standard (:mod:`captioner.arrays`): on torch tensors for the torch decoder
(training, self-critical sampling, CUDA), on numpy arrays for ONNX Runtime's, which needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from captioner.arrays import (
    Array,
    array_namespace,
    convert_like,
    device,
    draw,
    log_softmax,
    make_generator,
    softmax,
    to_numpy,
    topk,
    without_autograd,
)
from captioner.caption_rules import RuleMasks
from captioner.config import DecoderConfig
from captioner.decoder_state import DecoderState

# The options and their ranges live in captioner.options (no torch: the HTTP client checks options with them);
# they are named here too, for the code that imports them from here.
from captioner.options import APPLIES_TO as APPLIES_TO
from captioner.options import BEAM_SIZE_RANGE as BEAM_SIZE_RANGE
from captioner.options import LENGTH_PENALTY_RANGE as LENGTH_PENALTY_RANGE
from captioner.options import MAX_LENGTH_RANGE as MAX_LENGTH_RANGE
from captioner.options import METHODS as METHODS
from captioner.options import MIN_CONFIDENCE_RANGE as MIN_CONFIDENCE_RANGE
from captioner.options import NUM_CAPTIONS_RANGE as NUM_CAPTIONS_RANGE
from captioner.options import TEMPERATURE_MAX as TEMPERATURE_MAX
from captioner.options import VALID_VALUES as VALID_VALUES
from captioner.options import DecodingOptions as DecodingOptions
from captioner.options import check_options_apply as check_options_apply
from captioner.vocab import Vocabulary


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    log_prob: float  # sum of the model's log-probabilities of the words and the end token
    score: float  # what the ranking used (log_prob, length-normalised for beam search)
    attention: np.ndarray | None = None  # (len(tokens), N) float32 attention weights per word


class StepDecoder(Protocol):
    """What decoding needs of a decoder: both backends' decoders are one (``CaptionDecoder``, a torch module, and
    ``OnnxDecoder``, ONNX Runtime over numpy arrays). Arrays in and out are of the decoder's own kind."""

    @property
    def config(self) -> DecoderConfig: ...

    def init_state(self, grid: Array) -> DecoderState:
        """The state before the first word, for feature grids ``(B, C, h, w)``."""
        ...

    def step(self, tokens: Array, state: DecoderState) -> tuple[Array, DecoderState, Array | None]:
        """Feed words ``(B,)``: next-word logits ``(B, V)``, the new state, attention weights ``(B, N)`` or None."""
        ...


@without_autograd
def decode(
    decoder: StepDecoder, grid: Array, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """Decode a batch of feature grids ``(B, C, h, w)``; returns one list of hypotheses per image.

    ``rules`` (:mod:`captioner.caption_rules`): words that may not start a caption, and words and pairs
    after which ``<end>`` may not come; a caption only breaks them when it runs out of ``max_length``.
    Torch callers decode under ``torch.inference_mode()`` (no autograd graph)."""
    if options.method == "beam":
        return beam_search(decoder, grid, options, rules)
    if options.method == "sample":
        return sample(decoder, grid, options, rules)
    return greedy(decoder, grid, options, rules)


@without_autograd
def greedy(
    decoder: StepDecoder, grid: Array, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    xp = array_namespace(grid)
    rolled = rollout(decoder, grid, options.max_length, lambda logits: xp.argmax(logits, axis=-1), rules)
    return [[h] for h in _hypotheses(rolled)]


@without_autograd
def sample(
    decoder: StepDecoder, grid: Array, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """``num_captions`` independent draws per image. With a seed, each image has a generator of its own, all
    seeded alike: an image's samples are those it gets decoded alone (as the service decodes a seeded request),
    whatever else shares its batch in ``captioner caption`` or ``captioner-eval``, and on either backend (a seed's
    generator is numpy's on both: :func:`captioner.arrays.make_generator`)."""
    xp = array_namespace(grid)
    n, batch = options.num_captions, grid.shape[0]
    generators = None
    if options.seed is not None:
        generators = [make_generator(options.seed) for _ in range(batch)]

    def choose(logits: Array) -> Array:
        probs = softmax(filter_logits(logits / options.temperature, options.top_k, options.top_p))  # (B*n, V)
        if generators is None:
            return draw(probs)  # (B*n,)
        # each image's n rows, from its own generator
        return xp.concat([draw(probs[i * n : (i + 1) * n], g) for i, g in enumerate(generators)])  # (B*n,)

    hyps = _hypotheses(rollout(decoder, xp.repeat(grid, n, axis=0), options.max_length, choose, rules))
    return [hyps[i * n : (i + 1) * n] for i in range(batch)]


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """Mask (to -inf) all but the top-k words and the smallest nucleus holding ``top_p`` probability."""
    xp = array_namespace(logits)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = topk(logits, top_k)[0][..., -1:]  # (B, 1)
        logits = xp.where(logits < kth, -math.inf, logits)
    if top_p < 1.0:
        order = xp.argsort(logits, axis=-1, descending=True, stable=True)
        probs = softmax(xp.take_along_axis(logits, order, axis=-1))  # in falling order
        drop_sorted = xp.cumulative_sum(probs, axis=-1) - probs >= top_p  # keep up to and including the crossing word
        drop = xp.take_along_axis(drop_sorted, xp.argsort(order, axis=-1), axis=-1)  # back to word order
        logits = xp.where(drop, -math.inf, logits)
    return logits


NEVER_PRODUCED = (Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.unk_id)


def next_word_logits(
    decoder: StepDecoder,
    tokens: Array,
    state: DecoderState,
    rules: RuleMasks | None = None,
    before: Array | None = None,
) -> tuple[Array, DecoderState, Array | None]:
    """One decoder step in fp32; ``<pad>``, ``<start>`` and ``<unk>`` can never be produced, nor what
    ``rules`` forbid after ``tokens`` (the words just fed in) preceded by ``before``.

    ``<unk>`` stands for the rare words cut from the vocabulary: a caption saying "a man with a
    <unk>" is worse for a reader than the model's best real word. Out of place, so gradients flow
    through it (self-critical training samples with it).
    """
    logits, state, alpha = decoder.step(tokens, state)
    xp = array_namespace(logits)
    words = xp.arange(logits.shape[-1], device=device(logits))
    banned = (words == NEVER_PRODUCED[0]) | (words == NEVER_PRODUCED[1]) | (words == NEVER_PRODUCED[2])
    logits = xp.where(banned, -math.inf, xp.astype(logits, xp.float32))  # (B, V)
    if rules is not None:
        logits = rules.constrain(logits, tokens, before)
    return logits, state, alpha


def _step_rules(rules: RuleMasks | None, last: bool) -> RuleMasks | None:
    """The rules of one decoding step: all of them, or at ``max_length`` (``last``), where every caption ends
    whatever its last word, only the locked words (they stay unsaid)."""
    if not last or rules is None:
        return rules
    return rules.locked_only()


@dataclass(frozen=True)
class Rollout:
    """Captions made word by word, one row each (see :func:`rollout`); T is the longest caption + 1."""

    tokens: Array  # (R, T) the chosen words, then <end>, then <pad>
    log_probs: Array  # (R, T) each token's log-probability under the decoder; 0 after <end>
    mask: Array  # (R, T) bool: a real token (a word or the <end>)
    attention: Array | None  # (R, T, N) fp32 attention weights of each step; None without attention
    # (R, T) bool: the <end> put in at max_length, which ``choose`` never picked (self-critical training
    # leaves it out of its loss: it was not sampled)
    forced: Array


def rollout(
    decoder: StepDecoder,
    grid: Array,
    max_length: int,
    choose: Callable[[Array], Array],
    rules: RuleMasks | None = None,
    *,
    samples: int = 1,
) -> Rollout:
    """Feed each chosen word back in until every row has produced ``<end>`` or hit ``max_length``.

    ``choose`` maps next-word logits ``(R, V)`` to word ids ``(R,)``: argmax for greedy, a draw for
    sampling. ``samples`` rows per image of ``grid (B, C, h, w)``, image-major, share the image's
    initial state. With gradients when the caller has them on: the self-critical sampler
    (``training.scst.sample_captions``) trains through ``log_probs``.
    """
    xp, on = array_namespace(grid), device(grid)
    rules = rules.like(grid) if rules is not None else None
    state = decoder.init_state(grid)
    if samples > 1:
        state = state.repeat_interleave(samples)
    rows = grid.shape[0] * samples
    tokens = xp.full((rows,), Vocabulary.bos_id, dtype=xp.int64, device=on)
    before: Array | None = None
    finished = xp.zeros((rows,), dtype=xp.bool, device=on)
    chosen, log_probs, masks, alphas, forced = [], [], [], [], []
    for t in range(max_length + 1):
        # At max_length the caption must end, whatever its last word.
        logits, state, alpha = next_word_logits(decoder, tokens, state, _step_rules(rules, t == max_length), before)
        before = tokens
        # Out of room at max_length: the caption ends there.
        tokens = xp.full_like(tokens, Vocabulary.eos_id) if t == max_length else choose(logits)
        tokens = xp.where(finished, Vocabulary.pad_id, tokens)  # (R,)
        step_logp = xp.take_along_axis(log_softmax(logits), tokens[:, None], axis=1)[:, 0]  # (R,)
        # A finished row's <pad> has log-probability -inf: zero it, do not multiply it by 0 (NaN).
        log_probs.append(xp.where(finished, 0.0, step_logp))
        chosen.append(tokens)
        masks.append(xp.logical_not(finished))
        forced.append(xp.logical_not(finished) if t == max_length else xp.zeros_like(finished))
        if alpha is not None:
            alphas.append(xp.astype(alpha, xp.float32))
        # Not in place: autograd keeps this step's mask for the backward pass of where.
        finished = finished | (tokens == Vocabulary.eos_id)
        if bool(xp.all(finished)):
            break
    attention = xp.stack(alphas, axis=1) if alphas else None  # (R, T, N)
    return Rollout(
        xp.stack(chosen, axis=1),
        xp.stack(log_probs, axis=1),
        xp.stack(masks, axis=1),
        attention,
        forced=xp.stack(forced, axis=1),
    )


def _hypotheses(rolled: Rollout) -> list[Hypothesis]:
    xp = array_namespace(rolled.log_probs)
    log_prob = xp.zeros_like(rolled.log_probs[:, 0])
    for t in range(rolled.log_probs.shape[1]):  # added up step by step, as beam search adds its scores
        log_prob = log_prob + rolled.log_probs[:, t]
    tokens, log_prob = to_numpy(rolled.tokens), to_numpy(log_prob)  # (R, T), (R,)
    attention = to_numpy(rolled.attention) if rolled.attention is not None else None  # (R, T, N)
    out = []
    for i in range(tokens.shape[0]):
        seq = _until_eos(tokens[i].tolist())
        lp = float(log_prob[i])
        att = attention[i, : len(seq)] if attention is not None else None
        out.append(Hypothesis(seq, lp, lp, att))
    return out


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(Vocabulary.eos_id)] if Vocabulary.eos_id in ids else ids


def _beam_step(
    decoder: StepDecoder,
    tokens: Array,
    state: DecoderState,
    rules: RuleMasks | None,
    history: Array,
    finished: Array,
    last: bool,
) -> tuple[Array, DecoderState, Array | None]:
    """One step of every beam: word log-probabilities ``(rows, V)`` under the caption rules, where a finished beam
    can only repeat ``<end>`` (at no cost) and, at the ``last`` step (``max_length`` reached), every live beam must
    end now (the rules no longer apply: a caption out of room ends where it is); with the new state and attention."""
    eos = Vocabulary.eos_id
    before = history[:, -2] if history.shape[1] >= 2 else None
    logits, state, alpha = next_word_logits(decoder, tokens, state, _step_rules(rules, last), before)
    xp = array_namespace(logits)
    logp = log_softmax(logits)  # (rows, V)
    is_eos = xp.arange(logp.shape[-1], device=device(logp)) == eos  # (V,)
    if last:
        logp = xp.where(is_eos, logp, -math.inf)
    done_row = xp.full_like(logp[0], -math.inf)  # a finished beam: <end> again, at no cost
    done_row[eos] = 0.0
    return xp.where(finished[:, None], done_row, logp), state, alpha


class _Beams:
    """The beams of a search, ``rows`` of them, and what they have said so far."""

    def __init__(self, xp: Any, on: Any, rows: int) -> None:
        self.xp = xp
        self.finished = xp.zeros((rows,), dtype=xp.bool, device=on)
        self.lengths = xp.zeros((rows,), dtype=xp.int64, device=on)
        self.history = xp.zeros((rows, 0), dtype=xp.int64, device=on)
        self.attention: Array | None = None

    def extend(self, source: Array, tokens: Array, alpha: Array | None) -> None:
        """Each new beam continues row ``source`` of the old ones with word ``tokens``, seeing ``alpha``."""
        xp = self.xp
        was_finished = xp.take(self.finished, source, axis=0)
        self.lengths = xp.take(self.lengths, source, axis=0) + xp.astype(xp.logical_not(was_finished), xp.int64)
        self.history = xp.concat([xp.take(self.history, source, axis=0), tokens[:, None]], axis=1)  # (rows, t+1)
        if alpha is not None:
            step_att = xp.take(xp.astype(alpha, xp.float32), source, axis=0)[:, None, :]  # (rows, 1, N)
            old = self.attention
            self.attention = step_att if old is None else xp.concat([xp.take(old, source, axis=0), step_att], axis=1)
        self.finished = was_finished | (tokens == Vocabulary.eos_id)

    def select(self, rows: Array) -> None:
        """Keep only ``rows``."""
        xp = self.xp
        self.lengths, self.history = xp.take(self.lengths, rows, axis=0), xp.take(self.history, rows, axis=0)
        self.attention = xp.take(self.attention, rows, axis=0) if self.attention is not None else None


@without_autograd
def beam_search(
    decoder: StepDecoder, grid: Array, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """Beam search over all images x beams at once, in one ``(B * K, ...)`` batch.

    A beam that has produced ``<end>`` stays in the beam with a frozen score (its only continuation is
    ``<end>`` at zero cost), so finished and live hypotheses compete on equal terms; the final ranking
    divides by ``(words + 1) ** length_penalty``, and puts a caption that ``rules`` call incomplete (it
    was cut off at ``max_length``) after every complete one. With ``beam_size=1`` this is exactly greedy.
    """
    xp, on = array_namespace(grid), device(grid)
    rules = rules.like(grid) if rules is not None else None
    batch, k = grid.shape[0], options.beam_size
    state = decoder.init_state(grid).repeat_interleave(k)
    tokens = xp.full((batch * k,), Vocabulary.bos_id, dtype=xp.int64, device=on)
    scores = xp.full((batch, k), -math.inf, dtype=xp.float32, device=on)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    beams = _Beams(xp, on, batch * k)
    offsets = (xp.arange(batch, device=on) * k)[:, None]  # (B, 1)
    for t in range(options.max_length + 1):
        logp, state, alpha = _beam_step(
            decoder, tokens, state, rules, beams.history, beams.finished, t == options.max_length
        )
        vocab = logp.shape[-1]  # logp: (B*K, V)
        candidates = xp.reshape(xp.reshape(scores, (-1, 1)) + logp, (batch, k * vocab))  # (B, K*V)
        scores, flat = topk(candidates, k)  # (B, K)
        source = xp.reshape(offsets + flat // vocab, (-1,))  # (B*K,) row each new beam extends
        tokens = xp.reshape(flat % vocab, (-1,))  # (B*K,)
        state = state.reorder(source)
        beams.extend(source, tokens, alpha)
        if bool(xp.all(beams.finished)):
            break
    return _rank_beams(batch, k, scores, beams, options, rules)


def _complete(history: Array, lengths: Array, rules: RuleMasks | None) -> Array:
    """(R,) bool: ``<end>`` may follow each row's last word(s) under ``rules`` (always, without rules)."""
    xp = array_namespace(history)
    if rules is None:
        return xp.ones_like(lengths, dtype=xp.bool)
    words = lengths - 1  # every beam has ended: its length counts the <end> token
    last = xp.take_along_axis(history, xp.clip(words - 1, min=0)[:, None], axis=1)[:, 0]
    before = xp.take_along_axis(history, xp.clip(words - 2, min=0)[:, None], axis=1)[:, 0]
    before = xp.where(words >= 2, before, Vocabulary.bos_id)
    return rules.allows_end(last, before, rules.no_end.shape[0]) & (words > 0)


def _rank_beams(
    batch: int, k: int, scores: Array, beams: _Beams, options: DecodingOptions, rules: RuleMasks | None
) -> list[list[Hypothesis]]:
    complete = to_numpy(_complete(beams.history, beams.lengths, rules))
    scores, lengths, history = to_numpy(scores).reshape(-1), to_numpy(beams.lengths), to_numpy(beams.history)
    att_history = to_numpy(beams.attention) if beams.attention is not None else None
    out = []
    for i in range(batch):
        hyps = []
        for row in range(i * k, (i + 1) * k):
            log_prob = float(scores[row])
            if log_prob == float("-inf"):  # a beam that never got a valid word (vocabulary < beam size)
                continue
            seq = _until_eos(history[row].tolist())
            norm = log_prob / float(lengths[row]) ** options.length_penalty
            att = att_history[row, : len(seq)] if att_history is not None else None
            hyps.append((bool(complete[row]), Hypothesis(seq, log_prob, norm, att)))
        hyps.sort(key=lambda ch: (ch[0], ch[1].score), reverse=True)  # complete captions first
        out.append([h for _, h in hyps[: options.num_captions]])
    return out


@without_autograd
def constrained_beam_search(
    decoder: StepDecoder,
    grid: Array,
    options: DecodingOptions,
    required: Array,
    rules: RuleMasks | None = None,
) -> list[list[Hypothesis] | None]:
    """Beam search whose captions must contain at least one word of each image's set ``required (B, V)`` bool.

    Constrained beam search (Anderson et al., EMNLP 2017) with one disjunctive constraint: its finite-state machine
    has two states, *not yet* and *satisfied*, and each keeps its own ``beam_size`` beams, all images x states x
    beams in one ``(B * 2 * K, ...)`` batch. A *not yet* beam that takes a required word moves to *satisfied*,
    where it competes only with captions that named one too: the word is forced in wherever the decoder can best
    continue around it, not appended. Finished beams, the end at ``max_length`` and ``rules`` work as in
    :func:`beam_search`. Per image: the *satisfied* beams ranked as :func:`beam_search` ranks its beams, or None
    when none of them is a complete caption (no required word, or it could only be named in a caption cut off at
    ``max_length``): the caller falls back to the plain beam search then.
    """
    xp, on = array_namespace(grid), device(grid)
    batch = grid.shape[0]
    if tuple(required.shape) != (batch, decoder.config.vocab_size):
        expected = (batch, decoder.config.vocab_size)
        raise ValueError(f"required must have shape {expected}, got {tuple(required.shape)}")
    k, eos = options.beam_size, Vocabulary.eos_id
    words = xp.arange(decoder.config.vocab_size, device=on)
    only_words = xp.ones_like(words, dtype=xp.bool)
    for special in (*NEVER_PRODUCED, eos):  # only words can satisfy the constraint
        only_words = only_words & (words != special)
    required = xp.astype(convert_like(required, grid), xp.bool) & only_words  # (B, V)
    rows_per_image = 2 * k  # state 0 (not yet) beams, then state 1 (satisfied) beams
    rules = rules.like(grid) if rules is not None else None
    if rules is not None:  # a locked word (a vocabulary extension's) may come where it is required
        rules = rules.unlocking(xp.repeat(required, rows_per_image, axis=0))  # rows stay with their image
    state = decoder.init_state(grid).repeat_interleave(rows_per_image)
    tokens = xp.full((batch * rows_per_image,), Vocabulary.bos_id, dtype=xp.int64, device=on)
    scores = xp.full((batch, 2, k), -math.inf, dtype=xp.float32, device=on)
    scores[:, 0, 0] = 0.0  # one live beam: not yet, empty
    beams = _Beams(xp, on, batch * rows_per_image)
    image_rows = xp.reshape(xp.arange(batch, device=on) * rows_per_image, (batch, 1))  # (B, 1)
    not_yet_mask = required[:, None, :]  # (B, 1, V): these words leave state 0
    for t in range(options.max_length + 1):
        logp, state, alpha = _beam_step(
            decoder, tokens, state, rules, beams.history, beams.finished, t == options.max_length
        )
        vocab = logp.shape[-1]  # logp: (B*2K, V)
        candidates = scores[..., None] + xp.reshape(logp, (batch, 2, k, vocab))  # (B, 2, K, V)
        stay = xp.where(not_yet_mask, -math.inf, candidates[:, 0])  # (B, K, V): still not yet
        enter = xp.where(not_yet_mask, candidates[:, 0], -math.inf)  # (B, K, V): names a required word now
        satisfied = xp.concat([candidates[:, 1], enter], axis=1)  # (B, 2K, V): beam i < K from state 1, else state 0
        scores0, flat0 = topk(xp.reshape(stay, (batch, k * vocab)), k)  # (B, K)
        scores1, flat1 = topk(xp.reshape(satisfied, (batch, 2 * k * vocab)), k)  # (B, K)
        beam1 = flat1 // vocab  # (B, K) in [0, 2K)
        source1 = xp.where(beam1 < k, beam1 + k, beam1 - k)  # the row within the image's 2K rows
        source = xp.reshape(image_rows + xp.concat([flat0 // vocab, source1], axis=1), (-1,))  # (B*2K,)
        tokens = xp.reshape(xp.concat([flat0 % vocab, flat1 % vocab], axis=1), (-1,))  # (B*2K,)
        scores = xp.stack([scores0, scores1], axis=1)  # (B, 2, K)
        state = state.reorder(source)
        beams.extend(source, tokens, alpha)
        # Beams at -inf (no candidate yet, e.g. state 1 before any required word) never finish: stop when every
        # beam that can still become a caption has.
        alive = xp.reshape(scores, (-1,)) > -math.inf
        if bool(xp.all(beams.finished | xp.logical_not(alive))):
            break
    rows = xp.reshape(image_rows + xp.arange(k, 2 * k, device=on), (-1,))  # (B*K,) the satisfied beams
    beams.select(rows)
    satisfied_scores = scores[:, 1]  # (B, K)
    met = xp.reshape(
        _complete(beams.history, beams.lengths, rules) & (xp.reshape(satisfied_scores, (-1,)) > -math.inf), (batch, k)
    )
    ranked = _rank_beams(batch, k, satisfied_scores, beams, options, rules)
    return [hyps if bool(ok.any()) else None for hyps, ok in zip(ranked, to_numpy(met), strict=True)]
