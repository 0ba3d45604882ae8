"""The recurrent state decoding carries from step to step, for either backend's arrays."""

from __future__ import annotations

from dataclasses import dataclass, replace

from captioner.arrays import Array, array_namespace


@dataclass(frozen=True)
class DecoderState:
    """Recurrent state for a batch of rows, batch-first everywhere: torch tensors (``CaptionDecoder``) or numpy
    arrays (``OnnxDecoder``).

    ``hidden`` changes every step; ``memory``/``keys`` (the attention grid and its projection) are fixed
    per image. ``reorder`` therefore only gathers ``hidden``: beam search only ever permutes rows
    among the beams of the same image, whose memories are identical.
    """

    hidden: tuple[Array, ...]  # (B, L, H) each: (h,) or (h, c) for the LSTM
    memory: Array | None = None  # (B, N, C) attention values
    keys: Array | None = None  # (B, N, A) projected attention keys

    def reorder(self, index: Array) -> DecoderState:
        xp = array_namespace(*self.hidden)
        return replace(self, hidden=tuple(xp.take(h, index, axis=0) for h in self.hidden))

    def repeat_interleave(self, n: int) -> DecoderState:
        """Each row ``n`` times in a row (image-major), as ``torch.repeat_interleave`` along the batch."""
        xp = array_namespace(*self.hidden)

        def rep(t: Array | None) -> Array | None:
            return None if t is None else xp.repeat(t, n, axis=0)

        return DecoderState(tuple(xp.repeat(h, n, axis=0) for h in self.hidden), rep(self.memory), rep(self.keys))
