"""Mixed precision on CPU: the engine's autocast path (bf16, as on a CUDA GPU that supports it) trains.

The engine turns AMP on only for CUDA (``--amp``, the default): bf16 under ``torch.autocast`` where the GPU
supports it, else fp16 with a grad scaler. The same code runs under ``torch.autocast("cpu", bfloat16)``,
so a machine without a GPU can check that every op of a cross-entropy and a self-critical step accepts
the mixed dtypes before a GPU run finds out.
"""

from __future__ import annotations

import json
import math

import torch

from tests.helpers import make_flickr_folder
from training.cli import parse_train_config
from training.engine import Trainer


def test_a_cross_entropy_and_a_self_critical_epoch_train_under_bf16_autocast(tmp_path) -> None:
    data = make_flickr_folder(tmp_path / "shapes", per_split=(8, 4, 4))
    argv = ["--data", str(data), "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--encoder", "efficientnet_lite0", "--embed-dim", "16", "--hidden-dim", "16", "--attention-dim", "8"]
    argv += ["--epochs", "2", "--scst-after", "1", "--scst-batch-images", "4", "--batch-size", "8"]
    argv += ["--min-word-count", "1", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    trainer = Trainer(parse_train_config(argv))
    assert trainer.amp_dtype is None  # AMP is for CUDA: a CPU run trains in float32 unless asked
    trainer.amp_dtype = torch.bfloat16  # what __init__ picks on a bf16-capable GPU
    before = {k: v.clone() for k, v in trainer.model.decoder.state_dict().items()}

    head_dtypes: list[tuple[bool, torch.dtype]] = []  # (in training mode, dtype of the logits)
    hook = trainer.model.decoder.head.register_forward_hook(
        lambda module, args, out: head_dtypes.append((module.training, out.dtype))
    )
    try:
        summary = trainer.fit()
    finally:
        hook.remove()

    assert summary["epoch"] == 2
    assert {dtype for training, dtype in head_dtypes if training} == {torch.bfloat16}  # both steps autocast
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_loss" in r]
    assert [r["objective"] for r in epochs] == ["cross-entropy", "self-critical"]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in epochs), epochs
    after = trainer.model.decoder.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())  # autocast casts ops, never the weights
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped
