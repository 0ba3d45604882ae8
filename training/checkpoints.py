"""A run's checkpoints: ``last.pt`` (the model plus everything ``--resume`` needs to continue bit for bit) and
``best.pt`` (the model alone); and the models a run starts from (``--resume``, ``--init-from``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from captioner import Captioner, Vocabulary
from captioner.checkpoint import checkpoint_arg, load_checkpoint, save_checkpoint
from training.config import DecoderArchitecture, TrainConfig
from training.data import CaptionCorpus

log = logging.getLogger(__name__)

# The trainer's counters, saved in last.pt and restored from it, in this order.
COUNTERS = ("epoch", "step_in_epoch", "global_step", "best_score", "bad_epochs", "best_metrics")


def read_resume_state(out: Path, *, resume: bool) -> dict[str, Any] | None:
    """``--resume``: the checkpoint in ``out/last.pt``, or None (no resume asked for, or nothing to resume)."""
    last = out / "last.pt"
    if not resume:
        return None
    if not last.is_file():
        log.warning("--resume: %s does not exist; starting a new run", last)
        return None
    state = load_checkpoint(last)
    if not state.get("training"):
        raise ValueError(f"{last} holds no training state to resume from")
    return state


# What a resumed run must share with the run it continues: which images it trains on and how its epochs are cut
# into steps. last.pt's counters (epoch, step within it) and schedule count those steps; with another subset or
# batch size they would point into other batches.
RESUME_MUST_MATCH = ("limit_images", "batch_size")


def check_resume_config(saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse (``ValueError``) a ``--resume`` whose ``config`` changes a :data:`RESUME_MUST_MATCH` setting of the
    run it continues (``saved``: its last.pt's config). Other changes (more epochs, self-critical ones) are how
    a run is extended, and pass."""
    now = config.to_dict()
    changed = {
        name: (saved[name], now[name]) for name in RESUME_MUST_MATCH if name in saved and saved[name] != now[name]
    }
    if changed:
        what = ", ".join(
            f"--{name.replace('_', '-')} {now} (the run has {was})" for name, (was, now) in changed.items()
        )
        raise ValueError(
            f"--resume with {what}: last.pt's steps count the run's own batches; resume with its settings "
            f"(its config.json) or start a new run in another --output-dir"
        )


def load_initial_model(
    source: str, config: TrainConfig, corpus: CaptionCorpus, *, main: bool
) -> tuple[Captioner, TrainConfig]:
    """``--init-from``: the trained model to start from, and the run's config with its architecture (the
    checkpoint's encoder and decoder, whatever the flags said)."""
    model = Captioner.from_checkpoint(checkpoint_arg(source), device="cpu")
    model.encoder.set_trainable(False)  # --finetune-after unfreezes the last stage when it says so
    enc, dec = model.config.encoder, model.config.decoder
    assert dec is not None  # a built model's config always has its decoder's (Captioner.config)
    config = dataclasses.replace(
        config, encoder=enc.name, encoder_weights=enc.weights, decoder=DecoderArchitecture.of(dec)
    )
    unknown = unknown_share(model.vocab, corpus.train_captions())
    if main:
        log.info(
            "starting from %s: %s encoder, %s decoder (%s), vocabulary of %d; %.1f%% of the training words "
            "are not in it and train as <unk>",
            source, enc.name, dec.cell, "attention" if dec.attention else "no attention", len(model.vocab),
            100 * unknown,
        )  # fmt: skip
    return model, config


def unknown_share(vocab: Vocabulary, captions: Iterable[str]) -> float:
    """The share of the captions' words that ``vocab`` lacks (they train as ``<unk>``), counted caption by
    caption: the words of a whole data set are never held at once (6.8 million ids at COCO scale)."""
    words = unknown = 0
    for caption in captions:
        ids = vocab.encode(caption, add_special=False)
        words += len(ids)
        unknown += ids.count(vocab.unk_id)
    return unknown / max(1, words)


def training_state(
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    counters: Mapping[str, Any],
) -> dict[str, Any]:
    """What ``--resume`` needs beyond the model: optimizer, schedule, grad scaler, counters, RNG states."""
    return {
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        **{name: counters[name] for name in COUNTERS},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_training_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Load :func:`training_state`'s ``state`` into the optimizer, schedule, scaler and RNGs; returns the counters."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    counters = {name: state[name] for name in COUNTERS if name != "best_metrics"}
    counters["best_metrics"] = state.get("best_metrics", {})
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    log.info(
        "resumed from epoch %d step %d (global step %d)",
        counters["epoch"],
        counters["step_in_epoch"],
        counters["global_step"],
    )
    return counters


def run_metadata(
    config: TrainConfig, corpus: CaptionCorpus, *, epoch: int, global_step: int, best_metrics: dict[str, float]
) -> dict[str, Any]:
    """The record checkpoints carry of how the model was trained (``captioner info``, ``GET /model``)."""
    return {
        "training": {
            "data": str(config.data),
            "format": corpus.source,
            "splits": corpus.split_sizes(),
            "epochs_completed": epoch,
            "steps": global_step,
            "config": config.to_dict(),
        },
        "metrics": {"val": best_metrics},
    }


def save_last(out: Path, model: Captioner, metadata: dict[str, Any], training: dict[str, Any]) -> None:
    payload = model.state_payload(metadata=metadata)
    payload["training"] = training
    save_checkpoint(out / "last.pt", payload)


def save_best(out: Path, model: Captioner, metadata: dict[str, Any], *, half: bool) -> None:
    model.save(out / "best.pt", half=half, metadata=metadata)
