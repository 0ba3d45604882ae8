"""Greedy, sampling and beam-search decoding, batched over images, on CPU or CUDA.

Every method calls ``CaptionDecoder.init_state`` once and ``CaptionDecoder.step`` once per word,
feeding each chosen word back in. Each image's result is a list of :class:`Hypothesis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.caption_rules import RuleMasks
from captioner.decoder import CaptionDecoder, DecoderState

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
    attention: torch.Tensor | None = None  # (len(tokens), N) attention weights per word


@torch.inference_mode()
def decode(
    decoder: CaptionDecoder, grid: torch.Tensor, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """Decode a batch of feature grids ``(B, C, h, w)``; returns one list of hypotheses per image.

    ``rules`` (:mod:`captioner.caption_rules`): words that may not start a caption, and words and pairs
    after which ``<end>`` may not come; a caption only breaks them when it runs out of ``max_length``."""
    if options.method == "beam":
        return beam_search(decoder, grid, options, rules)
    if options.method == "sample":
        return sample(decoder, grid, options, rules)
    return greedy(decoder, grid, options, rules)


@torch.inference_mode()
def greedy(
    decoder: CaptionDecoder, grid: torch.Tensor, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    rolled = rollout(decoder, grid, options.max_length, lambda logits: logits.argmax(-1), rules)
    return [[h] for h in _hypotheses(rolled)]


@torch.inference_mode()
def sample(
    decoder: CaptionDecoder, grid: torch.Tensor, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """``num_captions`` independent draws per image. With a seed, each image has a generator of its own, all
    seeded alike: an image's samples are those it gets decoded alone (as the service decodes a seeded request),
    whatever else shares its batch in ``captioner caption`` or ``captioner-eval``."""
    n = options.num_captions
    generators = None
    if options.seed is not None:
        generators = [torch.Generator(device=grid.device).manual_seed(options.seed) for _ in range(grid.shape[0])]

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = filter_logits(logits / options.temperature, options.top_k, options.top_p).softmax(-1)  # (B*n, V)
        if generators is None:
            return torch.multinomial(probs, 1).squeeze(1)  # (B*n,)
        per_image = zip(probs.split(n), generators, strict=True)  # each image's n rows, from its own generator
        return torch.cat([torch.multinomial(rows, 1, generator=g) for rows, g in per_image]).squeeze(1)  # (B*n,)

    hyps = _hypotheses(rollout(decoder, grid.repeat_interleave(n, dim=0), options.max_length, choose, rules))
    return [hyps[i * n : (i + 1) * n] for i in range(grid.shape[0])]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top-k words and the smallest nucleus holding ``top_p`` probability."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep up to and including the word crossing top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


NEVER_PRODUCED = (Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.unk_id)


def next_word_logits(
    decoder: CaptionDecoder,
    tokens: torch.Tensor,
    state,
    rules: RuleMasks | None = None,
    before: torch.Tensor | None = None,
):
    """One decoder step in fp32; ``<pad>``, ``<start>`` and ``<unk>`` can never be produced, nor what
    ``rules`` forbid after ``tokens`` (the words just fed in) preceded by ``before``.

    ``<unk>`` stands for the rare words cut from the vocabulary: a caption saying "a man with a
    <unk>" is worse for a reader than the model's best real word. Out of place, so gradients flow
    through it (self-critical training samples with it).
    """
    logits, state, alpha = decoder.step(tokens, state)
    banned = torch.tensor(NEVER_PRODUCED, device=logits.device)
    logits = logits.float().index_fill(-1, banned, float("-inf"))  # (B, V)
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

    tokens: torch.Tensor  # (R, T) the chosen words, then <end>, then <pad>
    log_probs: torch.Tensor  # (R, T) each token's log-probability under the decoder; 0 after <end>
    mask: torch.Tensor  # (R, T) bool: a real token (a word or the <end>)
    attention: torch.Tensor | None  # (R, T, N) fp32 attention weights of each step; None without attention
    # (R, T) bool: the <end> put in at max_length, which ``choose`` never picked (self-critical training
    # leaves it out of its loss: it was not sampled)
    forced: torch.Tensor


def rollout(
    decoder: CaptionDecoder,
    grid: torch.Tensor,
    max_length: int,
    choose,
    rules: RuleMasks | None = None,
    *,
    samples: int = 1,
) -> Rollout:
    """Feed each chosen word back in until every row has produced ``<end>`` or hit ``max_length``.

    ``choose`` maps next-word logits ``(R, V)`` to word ids ``(R,)``: argmax for greedy, a draw for
    sampling. ``samples`` rows per image of ``grid (B, C, h, w)``, image-major, share the image's
    initial state. Not under ``inference_mode``: :func:`greedy` and :func:`sample` call it there, the
    self-critical sampler (``training.scst.sample_captions``) with gradients, through ``log_probs``.
    """
    state = decoder.init_state(grid)
    if samples > 1:
        state = state.repeat_interleave(samples)
    rows, device = grid.shape[0] * samples, grid.device
    tokens = torch.full((rows,), Vocabulary.bos_id, dtype=torch.long, device=device)
    before: torch.Tensor | None = None
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    chosen, log_probs, masks, alphas, forced = [], [], [], [], []
    for t in range(max_length + 1):
        # At max_length the caption must end, whatever its last word.
        logits, state, alpha = next_word_logits(decoder, tokens, state, _step_rules(rules, t == max_length), before)
        before = tokens
        # Out of room at max_length: the caption ends there.
        tokens = torch.full_like(tokens, Vocabulary.eos_id) if t == max_length else choose(logits)
        tokens = tokens.masked_fill(finished, Vocabulary.pad_id)  # (R,)
        step_logp = logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)  # (R,)
        # A finished row's <pad> has log-probability -inf: zero it, do not multiply it by 0 (NaN).
        log_probs.append(step_logp.masked_fill(finished, 0.0))
        chosen.append(tokens)
        masks.append(~finished)
        forced.append(~finished if t == max_length else torch.zeros_like(finished))
        if alpha is not None:
            alphas.append(alpha.float())
        # Not in place: autograd keeps this step's mask for the backward pass of masked_fill.
        finished = finished | (tokens == Vocabulary.eos_id)
        if bool(finished.all()):
            break
    attention = torch.stack(alphas, dim=1) if alphas else None  # (R, T, N)
    return Rollout(
        torch.stack(chosen, dim=1),
        torch.stack(log_probs, dim=1),
        torch.stack(masks, dim=1),
        attention,
        forced=torch.stack(forced, dim=1),
    )


def _hypotheses(rolled: Rollout) -> list[Hypothesis]:
    log_prob = torch.zeros(rolled.log_probs.shape[0], device=rolled.log_probs.device)
    for step_logp in rolled.log_probs.unbind(1):  # added up step by step, as beam search adds its scores
        log_prob += step_logp
    tokens, log_prob = rolled.tokens.cpu(), log_prob.cpu()  # (R, T), (R,)
    attention = rolled.attention.cpu() if rolled.attention is not None else None  # (R, T, N)
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
    decoder: CaptionDecoder,
    tokens: torch.Tensor,
    state: DecoderState,
    rules: RuleMasks | None,
    history: torch.Tensor,
    finished: torch.Tensor,
    last: bool,
) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
    """One step of every beam: word log-probabilities ``(rows, V)`` under the caption rules, where a finished beam
    can only repeat ``<end>`` (at no cost) and, at the ``last`` step (``max_length`` reached), every live beam must
    end now (the rules no longer apply: a caption out of room ends where it is); with the new state and attention."""
    eos = Vocabulary.eos_id
    before = history[:, -2] if history.shape[1] >= 2 else None
    logits, state, alpha = next_word_logits(decoder, tokens, state, _step_rules(rules, last), before)
    logp = logits.log_softmax(-1)  # (rows, V)
    if last:
        eos_only = torch.full_like(logp, float("-inf"))
        eos_only[:, eos] = logp[:, eos]
        logp = eos_only
    done_row = torch.full((logp.shape[-1],), float("-inf"), device=logp.device)
    done_row[eos] = 0.0
    return torch.where(finished.unsqueeze(1), done_row, logp), state, alpha


@torch.inference_mode()
def beam_search(
    decoder: CaptionDecoder, grid: torch.Tensor, options: DecodingOptions, rules: RuleMasks | None = None
) -> list[list[Hypothesis]]:
    """Beam search over all images x beams at once, in one ``(B * K, ...)`` batch.

    A beam that has produced ``<end>`` stays in the beam with a frozen score (its only continuation is
    ``<end>`` at zero cost), so finished and live hypotheses compete on equal terms; the final ranking
    divides by ``(words + 1) ** length_penalty``, and puts a caption that ``rules`` call incomplete (it
    was cut off at ``max_length``) after every complete one. With ``beam_size=1`` this is exactly greedy.
    """
    batch, device = grid.shape[0], grid.device
    k, eos = options.beam_size, Vocabulary.eos_id
    state = decoder.init_state(grid).repeat_interleave(k)
    tokens = torch.full((batch * k,), Vocabulary.bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, dtype=torch.long, device=device)
    history = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    att_history = None
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)
    for t in range(options.max_length + 1):
        logp, state, alpha = _beam_step(decoder, tokens, state, rules, history, finished, t == options.max_length)
        vocab = logp.shape[-1]  # logp: (B*K, V)
        candidates = (scores.view(-1, 1) + logp).view(batch, k * vocab)  # (B, K*V)
        scores, flat = candidates.topk(k, dim=1)  # (B, K)
        source = (offsets + flat // vocab).view(-1)  # (B*K,) row each new beam extends
        tokens = (flat % vocab).view(-1)  # (B*K,)
        state = state.reorder(source)
        was_finished = finished.index_select(0, source)
        lengths = lengths.index_select(0, source) + (~was_finished).long()
        history = torch.cat([history.index_select(0, source), tokens.unsqueeze(1)], dim=1)  # (B*K, t+1)
        if alpha is not None:
            step_att = alpha.float().index_select(0, source).unsqueeze(1)  # (B*K, 1, N)
            att_history = (
                step_att if att_history is None else torch.cat([att_history.index_select(0, source), step_att], dim=1)
            )
        finished = was_finished | (tokens == eos)
        if bool(finished.all()):
            break
    return _rank_beams(batch, k, scores, lengths, history, att_history, options, rules)


def _complete(history: torch.Tensor, lengths: torch.Tensor, rules: RuleMasks | None) -> torch.Tensor:
    """(R,) bool: ``<end>`` may follow each row's last word(s) under ``rules`` (always, without rules)."""
    if rules is None:
        return torch.ones_like(lengths, dtype=torch.bool)
    words = lengths - 1  # every beam has ended: its length counts the <end> token
    last = history.gather(1, (words - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = history.gather(1, (words - 2).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(words >= 2, before, torch.full_like(before, Vocabulary.bos_id))
    return rules.allows_end(last, before, rules.no_end.numel()) & (words > 0)


def _rank_beams(batch, k, scores, lengths, history, att_history, options, rules) -> list[list[Hypothesis]]:
    complete = _complete(history, lengths, rules).cpu()
    scores, lengths, history = scores.view(-1).cpu(), lengths.cpu(), history.cpu()
    att_history = att_history.cpu() if att_history is not None else None
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


@torch.inference_mode()
def constrained_beam_search(
    decoder: CaptionDecoder,
    grid: torch.Tensor,
    options: DecodingOptions,
    required: torch.Tensor,
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
    batch, device = grid.shape[0], grid.device
    if required.shape != (batch, decoder.config.vocab_size):
        expected = (batch, decoder.config.vocab_size)
        raise ValueError(f"required must have shape {expected}, got {tuple(required.shape)}")
    k, eos = options.beam_size, Vocabulary.eos_id
    required = required.to(device=device, dtype=torch.bool).clone()
    required[:, [*NEVER_PRODUCED, eos]] = False  # only words can satisfy the constraint
    rows_per_image = 2 * k  # state 0 (not yet) beams, then state 1 (satisfied) beams
    if rules is not None:  # a locked word (a vocabulary extension's) may come where it is required
        rules = rules.unlocking(required.repeat_interleave(rows_per_image, dim=0))  # rows stay with their image
    state = decoder.init_state(grid).repeat_interleave(rows_per_image)
    tokens = torch.full((batch * rows_per_image,), Vocabulary.bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, 2, k), float("-inf"), device=device)
    scores[:, 0, 0] = 0.0  # one live beam: not yet, empty
    finished = torch.zeros(batch * rows_per_image, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * rows_per_image, dtype=torch.long, device=device)
    history = torch.empty(batch * rows_per_image, 0, dtype=torch.long, device=device)
    att_history = None
    image_rows = (torch.arange(batch, device=device) * rows_per_image).view(batch, 1)  # (B, 1)
    not_yet_mask = required.unsqueeze(1)  # (B, 1, V): these words leave state 0
    for t in range(options.max_length + 1):
        logp, state, alpha = _beam_step(decoder, tokens, state, rules, history, finished, t == options.max_length)
        vocab = logp.shape[-1]  # logp: (B*2K, V)
        candidates = scores.unsqueeze(-1) + logp.view(batch, 2, k, vocab)  # (B, 2, K, V)
        stay = candidates[:, 0].masked_fill(not_yet_mask, float("-inf"))  # (B, K, V): still not yet
        enter = candidates[:, 0].masked_fill(~not_yet_mask, float("-inf"))  # (B, K, V): names a required word now
        satisfied = torch.cat([candidates[:, 1], enter], dim=1)  # (B, 2K, V): beam i < K from state 1, else state 0
        scores0, flat0 = stay.reshape(batch, k * vocab).topk(k, dim=1)  # (B, K)
        scores1, flat1 = satisfied.reshape(batch, 2 * k * vocab).topk(k, dim=1)  # (B, K)
        beam1 = flat1 // vocab  # (B, K) in [0, 2K)
        source1 = torch.where(beam1 < k, beam1 + k, beam1 - k)  # the row within the image's 2K rows
        source = (image_rows + torch.cat([flat0 // vocab, source1], dim=1)).view(-1)  # (B*2K,)
        tokens = torch.cat([flat0 % vocab, flat1 % vocab], dim=1).view(-1)  # (B*2K,)
        scores = torch.stack([scores0, scores1], dim=1)  # (B, 2, K)
        state = state.reorder(source)
        was_finished = finished.index_select(0, source)
        lengths = lengths.index_select(0, source) + (~was_finished).long()
        history = torch.cat([history.index_select(0, source), tokens.unsqueeze(1)], dim=1)  # (B*2K, t+1)
        if alpha is not None:
            step_att = alpha.float().index_select(0, source).unsqueeze(1)  # (B*2K, 1, N)
            att_history = (
                step_att if att_history is None else torch.cat([att_history.index_select(0, source), step_att], dim=1)
            )
        finished = was_finished | (tokens == eos)
        # Beams at -inf (no candidate yet, e.g. state 1 before any required word) never finish: stop when every
        # beam that can still become a caption has.
        alive = scores.view(-1) > float("-inf")
        if bool((finished | ~alive).all()):
            break
    rows = (image_rows + torch.arange(k, 2 * k, device=device)).view(-1)  # (B*K,) the satisfied beams
    lengths, history = lengths.index_select(0, rows), history.index_select(0, rows)
    att_history = att_history.index_select(0, rows) if att_history is not None else None
    met = (_complete(history, lengths, rules) & (scores[:, 1].reshape(-1) > float("-inf"))).view(batch, k)
    ranked = _rank_beams(batch, k, scores[:, 1].contiguous(), lengths, history, att_history, options, rules)
    return [hyps if bool(ok.any()) else None for hyps, ok in zip(ranked, met.cpu(), strict=True)]
