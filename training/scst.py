"""Self-critical sequence training: optimise CIDEr-D itself, after cross-entropy training.

Cross-entropy teaches the decoder the next word of a human caption given the human words before it;
at test time it is fed its own words and judged by CIDEr. Self-critical sequence training (Rennie
et al., CVPR 2017) closes that gap with REINFORCE: the decoder samples captions word by word, feeding
each sampled word back in, each sample is scored with CIDEr-D against the image's references, and
the log-probability of a sample is pushed up in proportion to how much better it scored than a
baseline. The baseline here is the mean reward of the *other* samples of the same image (Luo 2020,
"A Better Variant of Self-Critical Sequence Training"), so no extra greedy decode is needed and the
baseline is unbiased.

The reward is CIDEr-D exactly as coco-caption computes it (``training.metrics``) except for its
document frequencies, which come from the whole training corpus rather than from the scored batch,
as in the reference SCST implementations: a batch of 32 images is too small a corpus for idf.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from captioner.caption_rules import RuleMasks
from captioner.decoder import CaptionDecoder
from captioner.decoding import next_word_logits
from captioner.vocab import Vocabulary

Tokens = Sequence[str]
_Grams = list[dict[tuple[str, ...], float]]  # per order: n-gram -> tf-idf weight


def _counts(tokens: Tokens, n: int) -> list[Counter]:
    return [Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)]


class CiderD:
    """Per-caption CIDEr-D against fixed references, with their corpus's document frequencies.

    ``references[i]`` holds the tokenised reference captions of image ``i``. Scoring a caption for
    image ``i`` costs a few dictionary look-ups per n-gram: the references' tf-idf vectors are built
    once. With ``references`` equal to the evaluated set, scores equal ``metrics.compute_cider_d``.
    """

    def __init__(self, references: Sequence[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0) -> None:
        if not references:
            raise ValueError("CiderD needs at least one image's references")
        self.n, self.sigma = n, sigma
        ref_counts = [[_counts(ref, n) for ref in refs] for refs in references]
        df: Counter = Counter()
        for refs in ref_counts:  # the number of images whose references contain the n-gram
            df.update({gram for counts in refs for order in counts for gram in order})
        self._log_images = math.log(float(len(references)))
        self._df = df
        self._refs = [
            [(*self._vector(counts), max(len(ref) - 1, 0)) for counts, ref in zip(cr, refs, strict=True)]
            for cr, refs in zip(ref_counts, references, strict=True)
        ]

    def _vector(self, counts: list[Counter]) -> tuple[_Grams, list[float]]:
        weights = [
            {g: c * (self._log_images - math.log(max(1.0, self._df.get(g, 0.0)))) for g, c in order.items()}
            for order in counts
        ]
        return weights, [math.sqrt(sum(w * w for w in order.values())) for order in weights]

    def __len__(self) -> int:
        return len(self._refs)

    def score(self, image: int, tokens: Tokens) -> float:
        """CIDEr-D (x10, as reported) of one tokenised caption for image ``image``."""
        vec, norms = self._vector(_counts(tokens, self.n))
        length = max(len(tokens) - 1, 0)  # coco-caption measures length in bigrams
        total = 0.0
        refs = self._refs[image]
        for ref_vec, ref_norms, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                ref_k = ref_vec[k]
                dot = sum(min(w, ref_k[g]) * ref_k[g] for g, w in vec[k].items() if g in ref_k)
                if norms[k] != 0 and ref_norms[k] != 0:
                    dot /= norms[k] * ref_norms[k]
                total += dot * penalty
        return total / self.n / len(refs) * 10.0

    def scores(self, images: Sequence[int], captions: Sequence[Tokens]) -> np.ndarray:
        return np.array([self.score(i, c) for i, c in zip(images, captions, strict=True)], dtype=np.float64)


def sample_captions(
    decoder: CaptionDecoder, grid: torch.Tensor, samples: int, max_length: int, rules: RuleMasks | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``samples`` captions per image, feeding each sampled word back in, with gradients.

    Returns ``tokens (B*samples, T)`` (``<end>`` included, then ``<pad>``), the log-probability of
    each chosen token ``(B*samples, T)`` and the mask of real tokens ``(B*samples, T)``. Rows are
    image-major: the samples of image 0, then image 1, ... ``<pad>``, ``<start>`` and ``<unk>`` are
    never sampled (as in ``captioner.decoding``), nor what ``rules`` forbid (a caption may not stop
    where human captions never do: the reward cannot favour what decoding will not produce), and a
    caption still going at ``max_length`` words ends there.
    """
    rows = grid.shape[0] * samples
    state = decoder.init_state(grid).repeat_interleave(samples)
    tokens = torch.full((rows,), Vocabulary.bos_id, dtype=torch.long, device=grid.device)
    before: torch.Tensor | None = None
    finished = torch.zeros(rows, dtype=torch.bool, device=grid.device)
    chosen, log_probs, masks = [], [], []
    for t in range(max_length + 1):
        logits, state, _ = next_word_logits(decoder, tokens, state, rules if t < max_length else None, before)
        before = tokens
        logp = logits.log_softmax(-1)  # (R, V)
        if t == max_length:
            tokens = torch.full_like(tokens, Vocabulary.eos_id)
        else:
            tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)  # (R,)
        tokens = tokens.masked_fill(finished, Vocabulary.pad_id)
        # A finished row's <pad> has log-probability -inf: zero it, do not multiply it by 0 (NaN).
        log_probs.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0))
        chosen.append(tokens)
        masks.append(~finished)
        finished = finished | (tokens == Vocabulary.eos_id)
        if bool(finished.all()):
            break
    mask = torch.stack(masks, dim=1)
    return torch.stack(chosen, dim=1), torch.stack(log_probs, dim=1), mask


def leave_one_out_advantage(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """Reward minus the mean reward of the image's other samples; ``rewards`` is image-major ``(B*samples,)``."""
    if samples < 2:
        raise ValueError(f"the leave-one-out baseline needs >= 2 samples per image, got {samples}")
    per_image = rewards.view(-1, samples)
    baseline = (per_image.sum(dim=1, keepdim=True) - per_image) / (samples - 1)
    return (per_image - baseline).reshape(-1)


def scst_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: ``-sum(advantage * log p(token))`` over every sampled token, per token."""
    return -(advantage.unsqueeze(1) * log_probs).sum() / mask.sum().clamp(min=1)
