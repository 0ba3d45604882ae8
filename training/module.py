"""The model as trained: one module for DistributedDataParallel to wrap, asked for one of two passes.

DDP all-reduces the gradients of what ran through its ``forward``, and only its ``forward``: a second
method beside it would train each rank on its own gradients. So the two passes training needs, teacher
forcing (cross-entropy) and sampling (self-critical), go through ``forward`` as typed requests, each
with its own result type; :func:`teacher_forced` and :func:`sample` are how the trainer asks.
"""

from __future__ import annotations

from typing import NamedTuple, cast, overload

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner import Captioner
from training.distributed import Dist
from training.scst import sample_captions


class TeacherForcing(NamedTuple):
    """Next-word logits and attention weights given the human words before each one."""

    captions: torch.Tensor  # (B, T) token ids, <bos> first
    from_pixels: bool  # inputs are preprocessed images (the encoder fine-tunes), not cached feature grids


class Sampling(NamedTuple):
    """Captions sampled word by word from the model's own words, with each word's log-probability."""

    samples: int  # captions per image
    max_length: int  # a caption still going after this many words ends there


class TrainModule(nn.Module):
    """The captioner's encoder and decoder (shared, not copied), and the caption rules the sampler follows."""

    def __init__(self, model: Captioner) -> None:
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.rules = model.rule_masks()  # the self-critical sampler follows the caption rules

    @overload
    def forward(self, inputs: torch.Tensor, request: TeacherForcing) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    @overload
    def forward(self, inputs: torch.Tensor, request: Sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def forward(self, inputs, request):
        if isinstance(request, Sampling):  # from cached feature grids: the encoder is frozen then
            return sample_captions(self.decoder, inputs, request.samples, request.max_length, rules=self.rules)
        grid = self.encoder.forward_features(inputs) if request.from_pixels else inputs  # (B, C, h, w)
        return self.decoder(grid, request.captions)


def teacher_forced(
    module: nn.Module, inputs: torch.Tensor, captions: torch.Tensor, *, from_pixels: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits (B, T-1, V), alphas (B, T-1, N) or None)`` for ``captions`` through ``module`` (a
    :class:`TrainModule`, compiled or wrapped by DDP)."""
    return module(inputs, TeacherForcing(captions, from_pixels))


def sample(
    module: nn.Module, grid: torch.Tensor, *, samples: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, log_probs, mask)``, each ``(B*samples, T)``, image-major (``training.scst.sample_captions``),
    through ``module`` (a :class:`TrainModule`, compiled or wrapped by DDP)."""
    return module(grid, Sampling(samples, max_length))


def wrap_for_training(model: Captioner, *, compile: bool, dist: Dist, device: torch.device) -> nn.Module:
    """A :class:`TrainModule` over ``model``, compiled when asked, under DDP when there are several processes.
    Wrap again when parameters start or stop training: DDP registers the trainable ones when it wraps."""
    module: nn.Module = TrainModule(model)
    if compile:
        module = cast(nn.Module, torch.compile(module))  # an OptimizedModule; torch's stubs say only Callable
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)
    return module
