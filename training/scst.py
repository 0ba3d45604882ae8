"""Self-critical sequence training: optimise CIDEr-D itself, after cross-entropy training.

Cross-entropy teaches the decoder the next word of a human caption given the human words before it;
at test time it is fed its own words and judged by CIDEr. Self-critical sequence training (Rennie
et al., CVPR 2017) closes that gap with REINFORCE: the decoder samples captions word by word, feeding
each sampled word back in, each sample is scored with CIDEr-D against the image's references, and
the log-probability of a sample is pushed up in proportion to how much better it scored than a
baseline. The baseline here is the mean reward of the *other* samples of the same image (Luo 2020,
"A Better Variant of Self-Critical Sequence Training"), so no extra greedy decode is needed and the
baseline is unbiased.

The reward is CIDEr-D exactly as coco-caption computes it, from the same code as the reported metric
(``training.cider``; ``CiderD`` is imported from there), except for its document frequencies, which
come from the whole training corpus rather than from the scored batch, as in the reference SCST
implementations: a batch of 32 images is too small a corpus for idf. The sampler is the decoding
rollout of ``captioner.decoding``, run with gradients.
"""

from __future__ import annotations

import torch

from captioner.caption_rules import RuleMasks
from captioner.decoder import CaptionDecoder
from captioner.decoding import rollout
from training.cider import CiderD

__all__ = ["CiderD", "leave_one_out_advantage", "sample_captions", "scst_loss"]


def sample_captions(
    decoder: CaptionDecoder, grid: torch.Tensor, samples: int, max_length: int, rules: RuleMasks | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``samples`` captions per image, feeding each sampled word back in, with gradients.

    Returns ``tokens (B*samples, T)`` (``<end>`` included, then ``<pad>``), the log-probability of
    each sampled token ``(B*samples, T)`` and the mask of sampled tokens ``(B*samples, T)``. Rows are
    image-major: the samples of image 0, then image 1, ... ``<pad>``, ``<start>`` and ``<unk>`` are
    never sampled (as in ``captioner.decoding``), nor what ``rules`` forbid (a caption may not stop
    where human captions never do: the reward cannot favour what decoding will not produce), and a
    caption still going at ``max_length`` words ends there. That ``<end>`` was never sampled, so it is
    out of the mask and its log-probability 0: REINFORCE must not push up (or down) a choice the sampler
    did not make. Draws come from torch's global generator.
    """

    def draw(logits: torch.Tensor) -> torch.Tensor:
        # exp(log_softmax), not softmax: these probabilities (to the last bit) are what a seed has always drawn from.
        return torch.multinomial(logits.detach().log_softmax(-1).exp(), 1).squeeze(1)  # (R,)

    rolled = rollout(decoder, grid, max_length, draw, rules, samples=samples)
    return rolled.tokens, rolled.log_probs.masked_fill(rolled.forced, 0.0), rolled.mask & ~rolled.forced


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
