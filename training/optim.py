"""The optimiser and learning-rate schedule: AdamW over the decoder (and the encoder's last stage, which
only has trainable parameters while it fine-tunes); linear warm-up, then cosine, step or constant."""

from __future__ import annotations

import functools
import math

import torch

from captioner import Captioner
from training.config import TrainConfig


def make_optimizer(model: Captioner, config: TrainConfig) -> torch.optim.Optimizer:
    """Group 0: the decoder at ``lr`` (the self-critical epochs set it to ``scst_lr``); group 1: the encoder's
    last stage at ``encoder_lr``."""
    decoder_params = [p for p in model.decoder.parameters()]
    last_stage = model.encoder.last_stage_parameters()
    return torch.optim.AdamW(
        [
            {"params": decoder_params, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": last_stage, "lr": config.encoder_lr, "weight_decay": config.weight_decay},
        ]
    )


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per cross-entropy step; the cosine spans the cross-entropy epochs."""
    total_steps = steps_per_epoch * config.cross_entropy_epochs
    factor = functools.partial(lr_factor, config=config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, config: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of the peak."""
    c = config
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return 1.0
    if c.schedule == "step":
        return c.step_gamma ** (step // (c.step_epochs * steps_per_epoch))
    progress = (step - c.warmup_steps) / max(1, total_steps - c.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_shortfall(config: TrainConfig, *, steps_per_epoch: int) -> str | None:
    """A warning when the run's cross-entropy steps end before the warm-up does (a short trial run, say):
    its learning rate never reaches ``lr``, which a user reading the loss should know; None otherwise."""
    steps = steps_per_epoch * config.cross_entropy_epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    if steps == 0 or steps >= config.warmup_steps:
        return None
    peak = lr_factor(steps - 1, config=config, steps_per_epoch=steps_per_epoch, total_steps=steps)
    return (
        f"the learning-rate warm-up ({config.warmup_steps} steps, --warmup-steps) is longer than this run's "
        f"{steps} cross-entropy steps: the learning rate stops at {peak:.0%} of --lr {config.lr:g}"
    )
