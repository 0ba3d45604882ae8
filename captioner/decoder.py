"""Show-and-Tell recurrent decoder (LSTM / GRU / vanilla RNN), optionally with soft attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from captioner.config import DecoderConfig
from captioner.decoder_state import DecoderState

__all__ = ["CaptionDecoder", "DecoderState"]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CaptionDecoder(nn.Module):
    """Recurrent language model conditioned on an image feature grid ``(B, C, h, w)``.

    ``forward(grid, captions)`` is teacher-forced training; decoding calls ``init_state`` once and
    then ``step`` one word at a time (see ``captioner.decoding``).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.feature_norm = nn.LayerNorm(c.feature_dim)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(c.dropout)
        if c.image_input == "init":
            n_states = 2 if c.cell == "lstm" else 1
            self.init_state_proj = nn.Linear(c.feature_dim, n_states * c.num_layers * c.hidden_dim)
        else:
            self.image_embed = nn.Linear(c.feature_dim, c.embed_dim)
        # Attention reads a projected grid (feature_dim -> embed_dim): a 1280-d context fed to the
        # recurrent cell at every word would dominate the cost of training and decoding.
        input_size = c.embed_dim + (c.embed_dim if c.attention else 0)
        rnn_kwargs = {"nonlinearity": "tanh"} if c.cell == "rnn" else {}
        self.rnn = _CELLS[c.cell](
            input_size,
            c.hidden_dim,
            num_layers=c.num_layers,
            batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
            **rnn_kwargs,
        )
        if c.attention:
            self.memory_proj = nn.Linear(c.feature_dim, c.embed_dim)
            self.att_keys = nn.Linear(c.embed_dim, c.attention_dim)
            self.att_query = nn.Linear(c.hidden_dim, c.attention_dim)
            self.att_score = nn.Linear(c.attention_dim, 1)
            self.att_gate = nn.Linear(c.hidden_dim, c.embed_dim)  # SAT's β gate
            self.context_out = nn.Linear(c.embed_dim, c.hidden_dim)
        self.head = nn.Linear(c.hidden_dim, c.vocab_size)

    # -- state ------------------------------------------------------------------------------------

    def _prepare(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.feature_norm(grid.flatten(2).transpose(1, 2).float())  # (B, N, C)
        return features, features.mean(dim=1)  # (B, N, C), (B, C)

    def init_state(self, grid: torch.Tensor) -> DecoderState:
        """State before the ``<start>`` token: the image initialises it or is fed as the first input."""
        c = self.config
        features, pooled = self._prepare(grid)
        batch = grid.shape[0]
        memory = self.memory_proj(features) if c.attention else None  # (B, N, E)
        keys = self.att_keys(memory) if c.attention else None  # (B, N, A)
        if c.image_input == "init":
            flat = torch.tanh(self.init_state_proj(pooled))  # (B, S*L*H)
            hidden = tuple(flat.view(batch, -1, c.num_layers, c.hidden_dim).unbind(1))  # S x (B, L, H)
            return DecoderState(hidden, memory, keys)
        n_states = 2 if c.cell == "lstm" else 1
        zeros = pooled.new_zeros(batch, c.num_layers, c.hidden_dim)
        state = DecoderState((zeros,) * n_states, memory, keys)
        image_emb = self.dropout(self.image_embed(pooled))  # (B, E)
        _, state, _ = self._advance(image_emb, state)
        return state

    # -- one step ---------------------------------------------------------------------------------

    def _attend(self, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor]:
        assert state.keys is not None and state.memory is not None  # init_state fills both with attention on
        h_top = state.hidden[0][:, -1]  # (B, H)
        query = self.att_query(h_top).unsqueeze(1)  # (B, 1, A)
        scores = self.att_score(torch.tanh(state.keys + query)).squeeze(-1)  # (B, N)
        alpha = scores.softmax(dim=-1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), state.memory).squeeze(1)  # (B, E)
        context = torch.sigmoid(self.att_gate(h_top)) * context  # (B, E)
        return context, alpha

    def _advance(self, x: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """Feed one input vector ``x (B, E)``; returns the output features ``(B, H)`` and new state."""
        alpha = context = None
        if self.config.attention:
            context, alpha = self._attend(state)
            x = torch.cat([x, context], dim=-1)  # (B, 2E)
        out, hidden = self._cell_step(x, state.hidden)  # (B, H)
        if context is not None:
            out = out + self.context_out(context)
        return out, replace(state, hidden=hidden), alpha

    def _cell_step(self, x: torch.Tensor, hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        """One time step through the stacked cells, using ``self.rnn``'s own weights.

        A sequence-of-one call to ``nn.LSTM`` is slow on CPU (oneDNN's RNN path has a large fixed cost
        per call); the fused single-step cell functions are what ``nn.LSTMCell`` runs, on the same
        parameters, so the fused whole-sequence kernel stays available for teacher forcing.
        """
        cells: dict[str, Callable[..., Any]] = {
            "lstm": torch.lstm_cell,
            "gru": torch.gru_cell,
            "rnn": torch.rnn_tanh_cell,
        }
        cell = cells[self.config.cell]
        layers: list[tuple[torch.Tensor, ...]] = []
        for layer in range(self.config.num_layers):
            if layer > 0 and self.training and self.rnn.dropout > 0:
                x = nn.functional.dropout(x, self.rnn.dropout, training=True)
            weights = [
                getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            if self.config.cell == "lstm":
                h, c = cell(x, (hidden[0][:, layer], hidden[1][:, layer]), *weights)
                layers.append((h, c))
            else:
                h = cell(x, hidden[0][:, layer], *weights)
                layers.append((h,))
            x = h
        new_hidden = tuple(torch.stack(parts, dim=1) for parts in zip(*layers, strict=True))  # (B, L, H) each
        return x, new_hidden

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """Feed ``tokens (B,)``; returns next-word logits ``(B, V)``, the new state, attention ``(B, N)``."""
        x = self.dropout(self.embed(tokens))  # (B, E)
        out, state, alpha = self._advance(x, state)
        return self.head(self.dropout(out)), state, alpha  # (B, V)

    # -- teacher forcing --------------------------------------------------------------------------

    def forward(self, grid: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits for ``captions (B, T)`` (``<start> w1 .. <end> <pad>..``).

        Returns logits ``(B, T-1, V)`` predicting ``captions[:, 1:]`` and, with attention, the
        attention weights ``(B, T-1, N)``.
        """
        state = self.init_state(grid)
        inputs = self.dropout(self.embed(captions[:, :-1]))  # (B, T-1, E)
        if not self.config.attention:
            # No attention: the whole sequence goes through the fused (cuDNN) kernel in one call.
            hx = tuple(h.transpose(0, 1).contiguous() for h in state.hidden)
            out, _ = self.rnn(inputs, hx if len(hx) == 2 else hx[0])  # (B, T-1, H)
            return self.head(self.dropout(out)), None  # (B, T-1, V)
        outs: list[torch.Tensor] = []
        alphas: list[torch.Tensor] = []
        for t in range(inputs.shape[1]):
            out, state, alpha = self._advance(inputs[:, t], state)
            assert alpha is not None  # attention is on
            outs.append(out)
            alphas.append(alpha)
        out = torch.stack(outs, dim=1)  # (B, T-1, H)
        return self.head(self.dropout(out)), torch.stack(alphas, dim=1)  # (B, T-1, V), (B, T-1, N)
