"""The array operations decoding needs, for numpy and torch arrays alike.

:mod:`captioner.decoding` is written once, against the Python array API standard: each function takes the
namespace of its inputs (``array_api_compat.array_namespace``: numpy's or torch's, wrapped to the standard) and
calls only the standard's functions on it, so the same beam search runs on torch tensors (training, self-critical
sampling, CUDA) and on numpy arrays (the ONNX Runtime backend, which needs no torch at all). This module holds the
few operations the standard lacks (top-k, log-softmax, drawing from a distribution, random generators) and the
conversions; each dispatches on the array's kind, importing torch only for torch arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_array, is_torch_array

Array = Any  # a numpy array or a torch tensor (the array API standard has no static type for "an array")

__all__ = [
    "Array",
    "array_namespace",
    "convert_like",
    "device",
    "draw",
    "log_softmax",
    "make_generator",
    "softmax",
    "to_numpy",
    "take_rows",
    "topk",
    "without_autograd",
]

Decoding = TypeVar("Decoding", bound=Callable[..., Any])


def without_autograd(decoding: Decoding) -> Decoding:
    """Run ``decoding(decoder, grid, ...)`` under ``torch.inference_mode()`` when ``grid`` is a torch tensor (no
    autograd graph, as inference wants); numpy arrays have no autograd to turn off."""

    @functools.wraps(decoding)
    def run(decoder: Any, grid: Array, *args: Any, **kwargs: Any) -> Any:
        if is_torch_array(grid):
            import torch

            with torch.inference_mode():
                return decoding(decoder, grid, *args, **kwargs)
        return decoding(decoder, grid, *args, **kwargs)

    return cast(Decoding, run)


SMALL_K = 8  # up to this many, numpy's top-k takes one argmax pass per value


def topk(x: Array, k: int) -> tuple[Array, Array]:
    """The ``k`` largest values along the last axis of ``x (R, N)``, largest first, and their indices."""
    if is_torch_array(x):
        values, indices = x.topk(k, dim=-1)
        return values, indices
    if k <= SMALL_K and x.ndim == 2:
        # Beam search's k (a few) from a few beams x the vocabulary: k passes of argmax are 10-25x faster than a
        # partition (16 against 157 us for one image's 3 x 2,582 at beam 3). Where -inf is among the k (fewer
        # finite values than k), the partition below, which never repeats an index, decides instead.
        rest, rows = x.copy(), np.arange(x.shape[0])
        best = np.empty((x.shape[0], k), dtype=np.int64)
        best_values = np.empty((x.shape[0], k), dtype=x.dtype)
        for j in range(k):
            best[:, j] = np.argmax(rest, axis=-1)
            best_values[:, j] = rest[rows, best[:, j]]
            rest[rows, best[:, j]] = -np.inf
        if not np.isneginf(best_values).any():
            return best_values, best
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k]  # the k largest, in no order
    unordered = np.take_along_axis(x, part, axis=-1)
    order = np.argsort(-unordered, axis=-1, kind="stable")
    return np.take_along_axis(unordered, order, axis=-1), np.take_along_axis(part, order, axis=-1)


def log_softmax(x: Array) -> Array:
    """``log(softmax(x))`` along the last axis, computed stably (torch's own kernel for tensors, so the
    self-critical sampler's gradients and every torch caption stay as they were)."""
    if is_torch_array(x):
        return x.log_softmax(-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row all -inf gives NaN, as torch's does
        shifted = x - np.max(x, axis=-1, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(x: Array) -> Array:
    """Softmax along the last axis."""
    if is_torch_array(x):
        return x.softmax(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)


def make_generator(seed: int) -> np.random.Generator:
    """A random generator seeded with ``seed``: numpy's on every backend, so that a seed draws the same samples
    from torch's and ONNX Runtime's (equal) probabilities."""
    return np.random.default_rng(seed)


def draw(probabilities: Array, generator: np.random.Generator | None = None) -> Array:
    """One index per row of ``probabilities (R, V)`` (rows need not sum to 1), as an array of their kind; from
    ``generator`` (:func:`make_generator`), else from the library's global generator (torch's for tensors)."""
    if is_torch_array(probabilities) and generator is None:
        import torch

        return torch.multinomial(probabilities, 1).squeeze(1)
    rng = generator if generator is not None else np.random.default_rng()
    p = to_numpy(probabilities)
    cumulative = np.cumsum(p, axis=-1, dtype=np.float64)  # (R, V)
    threshold = rng.random(p.shape[0]) * cumulative[:, -1]  # (R,)
    # The first word whose cumulative probability passes the threshold: never a word of probability 0.
    chosen = np.minimum(np.sum(cumulative <= threshold[:, None], axis=-1), p.shape[-1] - 1).astype(np.int64)
    return convert_like(chosen, probabilities)


def to_numpy(x: Array) -> np.ndarray:
    """A numpy array of ``x``'s values (a torch tensor is detached and moved to the CPU)."""
    if is_numpy_array(x):
        return x
    return x.detach().cpu().numpy()


def convert_like(x: Array, reference: Array) -> Array:
    """``x`` as an array of ``reference``'s kind on its device (``x`` itself when it already is one)."""
    if is_torch_array(reference):
        if is_torch_array(x) and x.device == reference.device:
            return x
        import torch

        return torch.as_tensor(to_numpy(x), device=reference.device)
    return to_numpy(x)


def take_rows(x: Array, rows: list[int]) -> Array:
    """Rows ``rows`` of ``x`` (along its first axis), as an array of its kind on its device."""
    xp = array_namespace(x)
    return xp.take(x, convert_like(np.asarray(rows, dtype=np.int64), x), axis=0)
