import itertools

import pytest
import torch

from captioner.config import DecoderConfig
from captioner.decoder import CaptionDecoder

COMBOS = list(itertools.product(["lstm", "gru", "rnn"], [False, True], ["init", "first_word"], [1, 2]))


def _decoder(cell, attention, image_input, layers) -> CaptionDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=20,
        feature_dim=12,
        embed_dim=16,
        hidden_dim=16,
        num_layers=layers,
        cell=cell,
        attention=attention,
        attention_dim=8,
        image_input=image_input,
        dropout=0.2,
    )
    return CaptionDecoder(config).eval()


@pytest.mark.parametrize(("cell", "attention", "image_input", "layers"), COMBOS)
def test_teacher_forcing_matches_step_by_step(cell, attention, image_input, layers):
    decoder = _decoder(cell, attention, image_input, layers)
    grid = torch.randn(3, 12, 2, 3)
    captions = torch.randint(4, 20, (3, 7))
    captions[:, 0] = 1
    logits, alphas = decoder(grid, captions)
    assert logits.shape == (3, 6, 20)
    assert (alphas is not None) == attention
    if attention:
        assert alphas.shape == (3, 6, 6)
        assert torch.allclose(alphas.sum(-1), torch.ones(3, 6), atol=1e-5)
    state = decoder.init_state(grid)
    for t in range(6):
        step_logits, state, alpha = decoder.step(captions[:, t], state)
        assert torch.allclose(step_logits, logits[:, t], atol=1e-5), f"step {t} differs"


def test_gradients_reach_every_trainable_parameter():
    decoder = _decoder("lstm", True, "init", 2).train()
    logits, _ = decoder(torch.randn(2, 12, 2, 2), torch.randint(1, 20, (2, 5)))
    logits.sum().backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_config_validation_names_valid_values():
    with pytest.raises(ValueError, match="expected one of lstm, gru, rnn"):
        DecoderConfig(vocab_size=5, feature_dim=4, cell="transformer")
    with pytest.raises(ValueError, match="dropout must be in"):
        DecoderConfig(vocab_size=5, feature_dim=4, dropout=1.5)
