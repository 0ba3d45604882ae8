"""The training loop: teacher-forced cross-entropy on cached features, then optionally self-critical
sequence training (CIDEr-D as the reward, ``training/scst.py``); validation each epoch, early stopping,
checkpoints and resume, under DDP when launched by torchrun.

The parts live by concern: ``config`` (TrainConfig), ``distributed``, ``batches``, ``module`` (the model
as DDP trains it), ``losses``, ``optim``, ``evaluation``, ``checkpoints`` and ``run_log``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from captioner import Captioner, EncoderConfig, Vocabulary
from captioner.caption_rules import CaptionRules
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.model import resolve_device
from captioner.progress import progress_bar
from training import batches, checkpoints
from training.batches import epoch_batches
from training.calibration import CalibrationError, calibrate
from training.config import TrainConfig
from training.distributed import setup_distributed, teardown_distributed
from training.evaluation import validate
from training.losses import build_cider_reward, caption_loss, self_critical_loss
from training.module import sample, teacher_forced, wrap_for_training
from training.optim import make_optimizer, make_schedule, warmup_shortfall
from training.run_log import RunLog
from training.scst import CiderD

__all__ = ["TrainConfig", "Trainer", "epoch_batches", "train"]

log = logging.getLogger(__name__)


class _Step(NamedTuple):
    loss: float
    reward: float | None  # self-critical steps: the samples' mean CIDEr-D
    captions: int  # captions trained on (teacher-forced, or sampled)


class Trainer:
    """Owns the model, optimiser, schedule and state; ``fit()`` runs the epochs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dist = setup_distributed(config.device)
        device = resolve_device(config.device)
        if device.type == "cuda" and self.dist.world > 1:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.out = Path(config.output_dir)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed + self.dist.rank)
        resume_state = checkpoints.read_resume_state(self.out, resume=config.resume)
        if resume_state is not None:  # before the data loads: a refused resume should cost nothing
            checkpoints.check_resume_config(resume_state["training"]["config"], config)
        self.corpus, self.val_corpus = batches.load_corpora(config, self.dist)
        if resume_state is not None:
            self.model = Captioner.from_state(resume_state, source=str(self.out / "last.pt"))
        elif config.init_from is not None:
            self.model, config = checkpoints.load_initial_model(
                config.init_from, config, self.corpus, main=self.dist.main
            )
            self.config = config
        else:
            vocab = Vocabulary.build(self.corpus.train_captions(), min_count=config.min_word_count)
            encoder = EncoderConfig(config.encoder, config.encoder_weights, trainable=False)
            self.model = Captioner.build(encoder, vocab, **dataclasses.asdict(config.decoder))
        if not config.caption_rules:
            self.model.caption_rules = None
        elif self.model.caption_rules is None or resume_state is None:  # this run's own training captions
            self.model.caption_rules = CaptionRules.learn(self.corpus.train_captions())
        self.model.to(self.device)
        self.vocab = self.model.vocab
        self.train_split, self.val_split = batches.make_splits(config, self.corpus, self.val_corpus)
        splits = (self.train_split, self.val_split)
        batches.cache_features(splits, self.model.encoder, self.vocab, config, self.device, self.dist)
        self.optimizer = make_optimizer(self.model, config)
        self.steps_per_epoch = max(1, len(batches.caption_batches(self.train_split, config, epoch=0, dist=self.dist)))
        self.cider: CiderD | None = None  # the self-critical reward, built when its first epoch starts
        self.last_reward: float | None = None  # mean CIDEr-D of the last self-critical epoch's samples
        self.scheduler = make_schedule(self.optimizer, config, steps_per_epoch=self.steps_per_epoch)
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_score, self.bad_epochs = -math.inf, 0
        self.best_metrics: dict[str, float] = {}
        if resume_state is not None:
            counters = checkpoints.restore_training_state(
                resume_state["training"], self.optimizer, self.scheduler, self.scaler
            )
            for name, value in counters.items():
                setattr(self, name, value)
        self.module = self._wrap()
        self.run_log = RunLog(self.out, main=self.dist.main)

    def _wrap(self) -> nn.Module:
        return wrap_for_training(self.model, compile=self.config.compile, dist=self.dist, device=self.device)

    def _finetuning(self, epoch: int) -> bool:
        return self.config.finetune_after is not None and epoch >= self.config.finetune_after

    def _self_critical(self, epoch: int) -> bool:
        return self.config.scst_after is not None and epoch >= self.config.scst_after

    # -- checkpoints and the log ----------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return checkpoints.run_metadata(
            self.config, self.corpus, epoch=self.epoch, global_step=self.global_step, best_metrics=self.best_metrics
        )

    def save_last(self) -> None:
        if self.dist.main:
            counters = {name: getattr(self, name) for name in checkpoints.COUNTERS}
            state = checkpoints.training_state(self.config, self.optimizer, self.scheduler, self.scaler, counters)
            checkpoints.save_last(self.out, self.model, self._metadata(), state)

    def _save_best(self) -> None:
        if self.dist.main:
            checkpoints.save_best(self.out, self.model, self._metadata(), half=self.config.half_checkpoint)

    def _calibrate_best(self) -> None:
        """Fit best.pt's caption confidence on the val split (main rank; the config can turn it off)."""
        best = self.out / "best.pt"
        if not (self.config.calibrate and self.dist.main and best.is_file()):
            return
        stored = load_checkpoint(best)
        model = Captioner.from_state(stored, source=str(best)).to(self.device).eval()
        try:
            confidence, _ = calibrate(
                model, self.corpus, held_out_corpus=self.val_corpus, progress=self.config.progress
            )
        except CalibrationError as error:
            log.warning("best.pt has no caption confidence: %s", error)
            self._log({"event": "calibration", "fitted": False, "reason": str(error)})
            return
        stored["confidence_model"] = confidence.to_dict()
        save_checkpoint(best, stored)
        log.info("best.pt: caption confidence fitted (%s)", confidence.target)
        self._log({"event": "calibration", "fitted": True, **confidence.fitted_on})

    def _log(self, record: dict[str, Any]) -> None:
        self.run_log.write(record, step=self.global_step)

    # -- the loop -------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        c = self.config
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
            (self.out / "vocab.txt").write_text("\n".join(self.vocab.tokens) + "\n")
        log.info(
            "%d training captions over %d images, vocabulary %d, %d steps/epoch",
            len(self.train_split.pairs),
            len(self.train_split.records),
            len(self.vocab),
            self.steps_per_epoch,
        )
        shortfall = warmup_shortfall(c, steps_per_epoch=self.steps_per_epoch)
        if shortfall is not None and self.dist.main:
            log.warning("%s", shortfall)
        started = time.perf_counter()
        self._log(
            {
                "event": "start",
                "epoch": self.epoch,
                "step": self.global_step,
                "device": str(self.device),
                "world_size": self.dist.world,
                "train_captions": len(self.train_split.pairs),
                "vocab_size": len(self.vocab),
                "steps_per_epoch": self.steps_per_epoch,
            }
        )
        stopped = "epochs"
        while self.epoch < c.epochs:
            if self._finetuning(self.epoch):
                self._start_finetuning()
            result = self._run_epoch()
            if result == "max_steps":
                stopped = "max_steps"
                break
            stop = self._end_epoch()
            if self._cross_entropy_phase_ends(stop):
                # Patience counts within a phase: running out of it while self-critical epochs are still to
                # come ends the cross-entropy phase, not the run, so a recipe's self-critical budget is kept.
                self._start_self_critical(early=stop)
            elif stop:
                stopped = "early_stopping"
                break
        self._check_ranks_agree()
        self._calibrate_best()
        self._log(
            {
                "event": "end",
                "stopped": stopped,
                "epoch": self.epoch,
                "step": self.global_step,
                "wall_seconds": round(time.perf_counter() - started, 1),
                "best_CIDEr": self.best_score,
            }
        )
        self.run_log.close()
        return {
            "stopped": stopped,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
        }

    def _cross_entropy_phase_ends(self, stop: bool) -> bool:
        """Whether the epoch just ended was the last cross-entropy one of a run with self-critical epochs to come."""
        c = self.config
        if c.scst_after is None or c.scst_after >= c.epochs or self._self_critical(self.epoch - 1):
            return False
        return stop or self._self_critical(self.epoch)

    def _start_self_critical(self, early: bool) -> None:
        """Go on to the self-critical epochs from the current weights, with patience counted afresh."""
        c = self.config
        assert c.scst_after is not None  # called only when _cross_entropy_phase_ends, which needs scst_after
        if early:
            log.info(
                "early stopping after epoch %d (no better val CIDEr for %d epochs) ends the cross-entropy phase; "
                "self-critical training from epoch %d",
                self.epoch,
                c.patience,
                c.scst_after + 1,
            )
            self._log({"event": "cross_entropy_stopped_early", "epoch": self.epoch, "step": self.global_step})
        self.epoch = max(self.epoch, c.scst_after)
        self.bad_epochs = 0
        self.save_last()  # so that --resume starts the self-critical phase too

    def _start_finetuning(self) -> None:
        encoder = self.model.encoder
        if not encoder.trainable:
            encoder.set_trainable(True)
            self.module = self._wrap()  # DDP must see the newly trainable parameters
            log.info("fine-tuning the encoder's last stage from epoch %d", self.epoch)

    def _run_epoch(self) -> str:
        """One epoch of cross-entropy steps or, from ``scst_after``, self-critical ones; resumes mid-epoch."""
        c = self.config
        self.module.train()
        if self._self_critical(self.epoch):
            images = batches.image_batches(self.train_split, c, epoch=self.epoch, dist=self.dist)
            total, title = len(images), f"epoch {self.epoch + 1}/{c.epochs} (self-critical)"
            steps = (
                _Step(*self.scst_step(rows), captions=len(rows) * c.scst_samples)
                for rows in images[self.step_in_epoch :]
            )
        else:
            total, title = self.steps_per_epoch, f"epoch {self.epoch + 1}/{c.epochs}"
            steps = (
                _Step(self.train_step(inputs, captions, from_pixels), None, captions=len(captions))
                for inputs, captions, from_pixels in self._train_batches(self.epoch)
            )
        bar = progress_bar(total, title, c.progress and self.dist.main, unit="step")
        bar.update(self.step_in_epoch)
        start, seen, losses, rewards = time.perf_counter(), 0, [], []
        for step in steps:
            losses.append(step.loss)
            if step.reward is not None:
                rewards.append(step.reward)
            seen += step.captions
            self.step_in_epoch += 1
            self.global_step += 1
            rate = seen * self.dist.world / (time.perf_counter() - start)
            bar.update(1)
            shown = {"loss": f"{step.loss:.3f}"} if step.reward is None else {"reward": f"{step.reward:.3f}"}
            bar.set_postfix(**shown, captions_per_s=f"{rate:.0f}")
            if self.global_step % 50 == 0:
                if step.reward is None:
                    logged = {"train_loss": step.loss}
                else:
                    logged = {"scst_loss": step.loss, "scst_reward": step.reward}
                lr = self.optimizer.param_groups[0]["lr"]
                self._log({"step": self.global_step, **logged, "lr": lr, "captions_per_s": rate})
            if c.max_steps is not None and self.global_step >= c.max_steps:
                bar.close()
                self.save_last()
                return "max_steps"
            if self.global_step % c.checkpoint_every == 0:
                self.save_last()
        bar.close()
        self.last_train_loss = float(np.mean(losses)) if losses else float("nan")
        self.last_epoch_seconds = time.perf_counter() - start
        self.last_rate = seen * self.dist.world / max(self.last_epoch_seconds, 1e-9)
        self.last_reward = float(np.mean(rewards)) if rewards else None
        return "done"

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """The rest of ``epoch``'s cross-entropy batches (all of them unless resuming mid-epoch)."""
        todo = batches.caption_batches(self.train_split, self.config, epoch=epoch, dist=self.dist)[self.step_in_epoch :]
        pixels_from = self.model.encoder if self._finetuning(epoch) else None
        return batches.load_caption_batches(
            self.train_split, todo, self.config, pixels_from=pixels_from, device=self.device
        )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def train_step(self, inputs: torch.Tensor, captions: torch.Tensor, from_pixels: bool) -> float:
        """One cross-entropy step on a batch of feature grids (or images, ``from_pixels``); returns the loss."""
        c = self.config
        inputs = inputs.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        with self._autocast():
            inputs = inputs if from_pixels else inputs.float()
            logits, alphas = teacher_forced(self.module, inputs, captions, from_pixels=from_pixels)
            loss = caption_loss(
                logits, alphas, captions, label_smoothing=c.label_smoothing, attention_reg=c.attention_reg
            )
        self._optimize(loss)
        self.scheduler.step()
        return float(loss.detach())

    def scst_step(self, rows: list[int]) -> tuple[float, float]:
        """One self-critical step on training images ``rows``; returns (loss, mean CIDEr-D of the samples)."""
        c = self.config
        if self.cider is None:
            self.cider = build_cider_reward(self.train_split.records, main=self.dist.main)
        assert self.train_split.features is not None  # cache_features filled it in __init__
        grid = self.train_split.features.get(rows).to(self.device, non_blocking=True).float()
        with self._autocast():
            tokens, log_probs, mask = sample(self.module, grid, samples=c.scst_samples, max_length=c.scst_max_length)
        captions = [self.vocab.decode_tokens(row) for row in tokens.tolist()]
        loss, rewards = self_critical_loss(self.cider, rows, captions, log_probs, mask, samples=c.scst_samples)
        self.optimizer.param_groups[0]["lr"] = c.scst_lr  # the decoder's; the frozen encoder's stays as it is
        self._optimize(loss)
        return float(loss.detach()), float(rewards.mean())

    def _optimize(self, loss: torch.Tensor) -> None:
        """Backward, clip the global gradient norm, step (through the grad scaler), clear the gradients."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self) -> bool:
        """Validate, log, checkpoint; returns True when early stopping says stop."""
        c = self.config
        metrics: dict[str, float] = {}
        validation_started = time.perf_counter()
        if self.dist.main:
            metrics = self.evaluate_val()
        validation_seconds = time.perf_counter() - validation_started
        stop = False
        self.epoch += 1
        self.step_in_epoch = 0
        if self.dist.main:
            score = metrics.get("CIDEr", -math.inf)
            improved = score > self.best_score
            if improved:
                self.best_score, self.bad_epochs, self.best_metrics = score, 0, metrics
            else:
                self.bad_epochs += 1
            stop = self.bad_epochs >= c.patience
            self._log(
                {
                    "epoch": self.epoch,
                    "step": self.global_step,
                    "objective": "cross-entropy" if self.last_reward is None else "self-critical",
                    "train_loss": self.last_train_loss,
                    "captions_per_s": self.last_rate,
                    **({"train_CIDEr_reward": self.last_reward} if self.last_reward is not None else {}),
                    **{f"val_{k}": v for k, v in metrics.items()},
                    "best_CIDEr": self.best_score,
                }
            )
            log.info("%s", self._epoch_summary(metrics, validation_seconds))
            if improved:
                self._save_best()
            self.save_last()
        return self.dist.broadcast_flag(stop, self.device)

    def _epoch_summary(self, metrics: dict[str, float], validation_seconds: float) -> str:
        """The console's line for the epoch just ended (log.jsonl has every number): what a user watches."""
        objective = "cross-entropy" if self.last_reward is None else "self-critical"
        trained = f"train loss {self.last_train_loss:.3f}"
        if self.last_reward is not None:
            trained += f", reward {self.last_reward:.3f}"
        scores = ", ".join(f"{name} {metrics[name]:.3f}" for name in ("loss", "BLEU-4", "CIDEr") if name in metrics)
        best = f"; best CIDEr {self.best_score:.3f}" if math.isfinite(self.best_score) else ""
        return (
            f"epoch {self.epoch}/{self.config.epochs} ({objective}): {trained}; val {scores or 'not scored'}{best}; "
            f"{self.last_epoch_seconds:.0f} s training ({self.last_rate:.0f} captions/s) + "
            f"{validation_seconds:.0f} s validation"
        )

    def evaluate_val(self) -> dict[str, float]:
        """Validation loss (teacher forced) and caption metrics on the validation split."""
        metrics = validate(self.model, self.val_split, self.config, self.device)
        self.module.train()
        return metrics

    def _check_ranks_agree(self) -> None:
        """Under DDP every rank must end with the same weights; say so (or fail) in the log."""
        if self.dist.world == 1:
            return
        gathered = self.dist.weights_checksums(self.model.decoder)
        if self.dist.main:
            if not all(torch.equal(g, gathered[0]) for g in gathered):
                raise RuntimeError(f"DDP ranks disagree on the final weights: {[g.tolist() for g in gathered]}")
            self._log({"ddp_ranks": self.dist.world, "ranks_agree": True, "checksum": gathered[0].tolist()})


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training to the end (or early stopping / max_steps); returns a summary."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        teardown_distributed(trainer.dist)
