"""The two objectives. Cross-entropy: the next human word, plus Show, Attend and Tell's doubly stochastic
attention regulariser. Self-critical: CIDEr-D of sampled captions, with ``training.scst``'s reward and loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from captioner import Vocabulary
from captioner.text import tokenize
from training.data import ImageRecord
from training.scst import CiderD, leave_one_out_advantage, scst_loss

log = logging.getLogger(__name__)


def caption_loss(
    logits: torch.Tensor,
    alphas: torch.Tensor | None,
    captions: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    attention_reg: float = 0.0,
) -> torch.Tensor:
    """Teacher-forced loss of ``logits (B, T-1, V)`` for ``captions (B, T)``; with attention weights ``alphas``
    and ``attention_reg > 0``, plus that weight times :func:`attention_regulariser`."""
    targets = captions[:, 1:]  # (B, T-1)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=Vocabulary.pad_id,
        label_smoothing=label_smoothing,
    )
    if alphas is not None and attention_reg > 0:
        loss = loss + attention_reg * attention_regulariser(alphas, targets)
    return loss


def attention_regulariser(alphas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared shortfall of each grid location's attention, summed over a caption's words, from 1:
    every location should be looked at about once per caption (Xu et al. 2015)."""
    mask = (targets != Vocabulary.pad_id).unsqueeze(-1).to(alphas.dtype)  # (B, T-1, 1)
    coverage = (alphas * mask).sum(dim=1)  # (B, N): attention each location got over the caption
    return ((1.0 - coverage) ** 2).mean()


def build_cider_reward(records: Sequence[ImageRecord], *, main: bool) -> CiderD:
    """CIDEr-D against each training image's captions, document frequencies from all of them."""
    started = time.perf_counter()
    references = [[tokenize(caption) for caption in r.captions] for r in records]
    reward = CiderD(references)
    if main:
        seconds = time.perf_counter() - started
        log.info("CIDEr-D reward over %d training images built in %.1fs", len(reward), seconds)
    return reward


def self_critical_loss(
    reward: CiderD,
    rows: Sequence[int],
    captions: Sequence[Sequence[str]],
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    samples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE loss of ``captions`` (``samples`` per image of ``rows``, image-major, as words) given each
    token's ``log_probs`` and ``mask (B*samples, T)``, each sample's baseline the mean reward of the image's
    others; and the rewards ``(B*samples,)``."""
    images = [row for row in rows for _ in range(samples)]
    rewards = torch.as_tensor(reward.scores(images, captions), dtype=torch.float32, device=log_probs.device)
    return scst_loss(log_probs.float(), mask, leave_one_out_advantage(rewards, samples)), rewards
