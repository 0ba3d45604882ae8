"""Training loop: teacher-forced cross-entropy on cached features, then optionally self-critical
sequence training (CIDEr-D as the reward, ``training/scst.py``); validation, checkpoints, resume, DDP."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from captioner import Captioner, DecodingOptions, EncoderConfig, Vocabulary
from captioner.caption_rules import CaptionRules
from captioner.checkpoint import checkpoint_arg, load_checkpoint, save_checkpoint
from captioner.decoding import decode
from captioner.model import resolve_device
from captioner.progress import progress_bar
from captioner.text import tokenize
from training.data import CaptionCorpus, ImageRecord, load_corpus
from training.features import FeatureStore, ImageFiles, build_feature_cache
from training.metrics import compute_metrics
from training.scst import CiderD, leave_one_out_advantage, sample_captions, scst_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: str  # data set: Flickr8k folder, COCO captions JSON (or folder), or Karpathy split JSON
    data_format: str = "auto"  # auto | coco | karpathy | flickr8k
    images_dir: str | None = None  # override where the images are
    val_data: str | None = None  # separate validation set (e.g. COCO captions_val2017.json); default: data's val split
    output_dir: str = "runs/captioner"  # run directory: config, log.jsonl, last.pt, best.pt
    cache_dir: str = ".cache/features"  # feature cache (fp16 grids keyed by encoder fingerprint)
    # model
    encoder: str = "resnet50"  # see captioner.encoders.ENCODERS; offline: efficientnet_lite2
    encoder_weights: str | None = "imagenet"  # "imagenet", a local state-dict file, or None (random)
    cell: str = "lstm"  # lstm | gru | rnn
    attention: bool = True  # soft attention over the feature grid
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    image_input: str = "init"  # init | first_word
    min_word_count: int = 5  # vocabulary: words seen at least this often in training captions
    max_caption_words: int = 30  # longer training captions are truncated
    # optimisation
    epochs: int = 20
    batch_size: int = 128  # captions per step (per process under DDP)
    lr: float = 4e-4  # AdamW peak learning rate for the decoder
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    schedule: str = "cosine"  # cosine | step | constant (after warm-up)
    step_epochs: int = 5  # step schedule: decay every this many epochs
    step_gamma: float = 0.5  # step schedule: decay factor
    grad_clip: float = 5.0  # clip the global gradient norm (0 disables)
    label_smoothing: float = 0.0
    attention_reg: float = 1.0  # Show-Attend-Tell doubly stochastic regulariser weight
    finetune_after: int | None = None  # epoch from which the encoder's last stage trains too (reads images)
    encoder_lr: float = 1e-5
    # self-critical sequence training (training/scst.py): after cross-entropy, optimise CIDEr-D itself
    scst_after: int | None = None  # epoch from which training is self-critical (None: cross-entropy only)
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean reward of the others
    scst_batch_images: int = 32  # images per step (per process under DDP)
    scst_lr: float = 1e-4  # constant decoder learning rate during self-critical epochs (the default model's)
    scst_max_length: int = 16  # sampled captions end after this many words
    # where captions may start and end, learned from the training captions (captioner.caption_rules): no
    # caption ends on "a", "on" or "wooden", none starts with "is"; validation decoding and self-critical
    # sampling follow them, and checkpoints carry them for every decoding method
    caption_rules: bool = True
    # run control
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with a grad scaler
    compile: bool = False  # torch.compile the decoder
    num_workers: int = 2
    val_method: str = "greedy"  # decoding for validation metrics: greedy | beam
    val_beam_size: int = 3
    val_max_images: int | None = None  # cap validation images per epoch (None: all)
    patience: int = 5  # early stopping: epochs without a better val CIDEr (within a phase: see Trainer.fit)
    checkpoint_every: int = 1000  # also save last.pt every this many steps
    max_steps: int | None = None  # stop (and save last.pt) after this many optimizer steps in total
    resume: bool = False  # continue from output_dir/last.pt
    init_from: str | None = None  # start from a trained checkpoint's model ("default": the bundled one)
    half_checkpoint: bool = False  # store best.pt's weights in fp16
    limit_images: int | None = None  # use at most this many images per split (quick runs, tests)
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of cosine, step, constant")
        if self.val_method not in ("greedy", "beam"):
            raise ValueError(f"unknown val_method {self.val_method!r}; expected greedy or beam")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        from captioner.encoders import ENCODERS

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; expected one of {', '.join(ENCODERS)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.scst_after is not None:
            if self.scst_after < 0:
                raise ValueError(f"scst_after must be >= 0, got {self.scst_after}")
            if self.finetune_after is not None:
                raise ValueError(
                    "scst_after and finetune_after cannot be combined: self-critical training reads the feature "
                    "cache, which a fine-tuned encoder would have made stale"
                )
            if self.scst_samples < 2:
                raise ValueError(f"scst_samples must be >= 2 (the baseline is the others), got {self.scst_samples}")
            for name in ("scst_batch_images", "scst_max_length"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.scst_lr <= 0:
                raise ValueError(f"scst_lr must be > 0, got {self.scst_lr}")

    @property
    def cross_entropy_epochs(self) -> int:
        """Epochs trained with cross-entropy (the learning-rate schedule spans these)."""
        return self.epochs if self.scst_after is None else min(self.epochs, self.scst_after)

    def decoder_kwargs(self) -> dict[str, Any]:
        names = (
            "embed_dim",
            "hidden_dim",
            "num_layers",
            "dropout",
            "cell",
            "attention",
            "attention_dim",
            "image_input",
        )
        return {n: getattr(self, n) for n in names}


# -- distributed ------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the trainer's own collectives' process group; None: the default one (see setup_distributed)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    else:
        # Gloo's worker threads let go of a collective's tensors only after the call has returned, and need the GIL
        # for it. DDP keeps the default group, and so its threads, alive to interpreter exit, past
        # destroy_process_group: a rank that exited right after the checksum all_gather could be aborted in such a
        # thread ("terminate called without an active exception"). So the trainer's own collectives (tensors made
        # in Python; DDP's buckets are not) get a group of their own, which train() frees, joining its threads.
        info.group = dist.new_group(backend="gloo")
    return info


# -- data -------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Captions of one split as (feature row, token ids) pairs, plus the images they belong to."""

    records: list[ImageRecord]
    pairs: list[tuple[int, list[int]]] = field(default_factory=list)
    features: FeatureStore | None = None

    @property
    def paths(self) -> list[str]:
        return [str(r.path) for r in self.records]


def _make_pairs(records: Sequence[ImageRecord], vocab: Vocabulary, max_words: int, skip: set[str]) -> list:
    pairs = []
    for row, record in enumerate(records):
        if str(record.path) in skip:
            continue
        for caption in record.captions:
            ids = vocab.encode(caption, add_special=False)[:max_words]
            if ids:
                pairs.append((row, [vocab.bos_id, *ids, vocab.eos_id]))
    return pairs


def _pad(captions: Sequence[Sequence[int]]) -> torch.Tensor:
    out = torch.zeros(len(captions), max(len(c) for c in captions), dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c)
    return out  # (B, T), <pad> = 0


class _ImagePairs(Dataset):
    """(pixels, caption) pairs read from image files, for encoder fine-tuning."""

    def __init__(self, split: Split, order: Sequence[int], preprocess) -> None:
        self.split, self.order = split, list(order)
        self.images = ImageFiles(split.paths, preprocess)  # unreadable files: zeros, already reported

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        row, ids = self.split.pairs[self.order[i]]
        return self.images[row][0], ids


def _collate_pixels(items):
    return torch.stack([p for p, _ in items]), _pad([ids for _, ids in items])


def epoch_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The batches of pair indices this process trains on in ``epoch``.

    A seeded permutation is cut into pools of 50 global batches; each pool is sorted by caption
    length before batching, so a batch pads to similar lengths (about a third less recurrent work
    than random batches), and the batch order is shuffled again. Each global batch of
    ``batch_size * world`` is split evenly across processes, so every rank runs the same number of
    steps (DDP's collectives stay in step). Deterministic in (seed, epoch): resuming mid-epoch
    recomputes the same batches and skips the ones already done.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    global_size = batch_size * world
    pool = global_size * 50
    global_batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        global_batches += [chunk[i : i + global_size] for i in range(0, len(chunk), global_size)]
    shuffled = torch.randperm(len(global_batches), generator=generator).tolist()
    batches = []
    for index in shuffled:
        group = global_batches[index]
        share = len(group) // world
        if share:
            batches.append(group[rank * share : (rank + 1) * share])
    return batches


class _Step(NamedTuple):
    loss: float
    reward: float | None  # self-critical steps: the samples' mean CIDEr-D
    captions: int  # captions trained on (teacher-forced, or sampled)


# -- model wrapper for DDP ----------------------------------------------------------------------------


class _TrainModule(nn.Module):
    def __init__(self, model: Captioner) -> None:
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.rules = model.rule_masks()  # the self-critical sampler follows the caption rules

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor | None, from_pixels: bool, sample=None):
        """Teacher-forced logits for ``captions``; with ``sample=(samples, max_length)``, sampled captions
        and their log-probabilities instead (self-critical training). Either way through DDP's hooks."""
        grid = self.encoder.forward_features(inputs) if from_pixels else inputs  # (B, C, h, w)
        if sample is not None:
            return sample_captions(self.decoder, grid, *sample, rules=self.rules)
        return self.decoder(grid, captions)


def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor | None, captions: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    targets = captions[:, 1:]  # (B, T-1)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=Vocabulary.pad_id,
        label_smoothing=config.label_smoothing,
    )
    if alphas is not None and config.attention_reg > 0:
        mask = (targets != Vocabulary.pad_id).unsqueeze(-1).to(alphas.dtype)  # (B, T-1, 1)
        coverage = (alphas * mask).sum(dim=1)  # (B, N): attention each location got over the caption
        loss = loss + config.attention_reg * ((1.0 - coverage) ** 2).mean()
    return loss


# -- the trainer --------------------------------------------------------------------------------------


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
        self._seed(config.seed)
        self.corpus, self.val_corpus = self._load_data()
        resume_state = self._resume_state()
        if resume_state is not None:
            self.model = Captioner.from_state(resume_state, source=str(self.out / "last.pt"))
        elif config.init_from is not None:
            self.model = self._initial_model(config.init_from)
            config = self.config
        else:
            vocab = Vocabulary.build(self.corpus.train_captions(), min_count=config.min_word_count)
            encoder = EncoderConfig(config.encoder, config.encoder_weights, trainable=False)
            self.model = Captioner.build(encoder, vocab, **config.decoder_kwargs())
        if not config.caption_rules:
            self.model.caption_rules = None
        elif self.model.caption_rules is None or resume_state is None:  # this run's own training captions
            captions = (tokenize(c) for c in self.corpus.train_captions())
            self.model.caption_rules = CaptionRules.derive(captions)
        self.model.to(self.device)
        self.vocab = self.model.vocab
        self.train_split = Split(self.corpus.split("train"))
        val_records = self.val_corpus.split("val")
        if config.val_max_images is not None:
            val_records = val_records[: config.val_max_images]
        self.val_split = Split(val_records)
        if not self.train_split.records:
            raise ValueError(f"{config.data}: no training images (split sizes {self.corpus.split_sizes()})")
        if not self.val_split.records:
            raise ValueError(f"{config.data}: no validation images; pass --val-data or use a data set with a val split")
        self._cache_features()
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = max(1, len(self._epoch_batches(0)))
        self.total_steps = self.steps_per_epoch * config.cross_entropy_epochs
        self.cider: CiderD | None = None  # the self-critical reward, built when its first epoch starts
        self.last_reward: float | None = None  # mean CIDEr-D of the last self-critical epoch's samples
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_score, self.bad_epochs, self.best_metrics = -math.inf, 0, {}
        if resume_state is not None:
            self._restore(resume_state["training"])
        self.module = self._wrap()
        self.writer = self._tensorboard()

    # -- setup helpers ----------------------------------------------------------------------------

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed + self.dist.rank)

    def _load_data(self) -> tuple[CaptionCorpus, CaptionCorpus]:
        c = self.config
        corpus = load_corpus(c.data, format=c.data_format, images_dir=c.images_dir)
        if c.limit_images is not None:
            corpus = corpus.subset(c.limit_images)
        val = corpus
        if c.val_data:
            val = load_corpus(c.val_data, split="val") if str(c.val_data).endswith(".json") else load_corpus(c.val_data)
            if c.limit_images is not None:
                val = val.subset(c.limit_images)
        if self.dist.main:
            log.info("data: %s %s", corpus.source, corpus.split_sizes())
        return corpus, val

    def _resume_state(self) -> dict[str, Any] | None:
        last = self.out / "last.pt"
        if not self.config.resume:
            return None
        if not last.is_file():
            log.warning("--resume: %s does not exist; starting a new run", last)
            return None
        state = load_checkpoint(last)
        if not state.get("training"):
            raise ValueError(f"{last} holds no training state to resume from")
        return state

    def _initial_model(self, source: str) -> Captioner:
        """``--init-from``: the trained model to start from; the run's config takes its architecture."""
        model = Captioner.from_checkpoint(checkpoint_arg(source), device="cpu")
        model.encoder.set_trainable(False)  # --finetune-after unfreezes the last stage when it says so
        enc, dec = model.config.encoder, model.config.decoder
        architecture = {name: getattr(dec, name) for name in self.config.decoder_kwargs()}
        self.config = dataclasses.replace(self.config, encoder=enc.name, encoder_weights=enc.weights, **architecture)
        words = [w for caption in self.corpus.train_captions() for w in model.vocab.encode(caption, add_special=False)]
        unknown = sum(w == model.vocab.unk_id for w in words) / max(1, len(words))
        if self.dist.main:
            log.info(
                "starting from %s: %s encoder, %s decoder (%s), vocabulary of %d; %.1f%% of the training words "
                "are not in it and train as <unk>",
                source, enc.name, dec.cell, "attention" if dec.attention else "no attention", len(model.vocab),
                100 * unknown,
            )  # fmt: skip
        return model

    def _cache_features(self) -> None:
        c = self.config
        for split in (self.train_split, self.val_split):
            # Rank 0 encodes; the others wait, then open the finished cache.
            if self.dist.main:
                split.features = build_feature_cache(
                    self.model.encoder,
                    split.paths,
                    c.cache_dir,
                    device=self.device,
                    num_workers=c.num_workers,
                    progress=c.progress,
                )
            self.dist.barrier()
            if not self.dist.main:
                split.features = build_feature_cache(
                    self.model.encoder, split.paths, c.cache_dir, device=self.device, num_workers=0, progress=False
                )
            skip = set(split.features.failed)
            split.pairs = _make_pairs(split.records, self.vocab, c.max_caption_words, skip)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decoder_params = [p for p in self.model.decoder.parameters()]
        last_stage = self.model.encoder.last_stage_parameters()
        return torch.optim.AdamW(
            [
                {"params": decoder_params, "lr": c.lr, "weight_decay": c.weight_decay},
                {"params": last_stage, "lr": c.encoder_lr, "weight_decay": c.weight_decay},
            ]
        )

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "step":
            return c.step_gamma ** (step // (c.step_epochs * self.steps_per_epoch))
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def _wrap(self) -> nn.Module:
        module: nn.Module = _TrainModule(self.model)
        if self.config.compile:
            module = torch.compile(module)
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        return module

    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- state --------------------------------------------------------------------------------------

    def _finetuning(self, epoch: int) -> bool:
        return self.config.finetune_after is not None and epoch >= self.config.finetune_after

    def _self_critical(self, epoch: int) -> bool:
        return self.config.scst_after is not None and epoch >= self.config.scst_after

    def _training_state(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
            "best_metrics": self.best_metrics,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_score, self.bad_epochs = state["best_score"], state["bad_epochs"]
        self.best_metrics = state.get("best_metrics", {})
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        log.info("resumed from epoch %d step %d (global step %d)", self.epoch, self.step_in_epoch, self.global_step)

    def _metadata(self) -> dict[str, Any]:
        return {
            "training": {
                "data": str(self.config.data),
                "format": self.corpus.source,
                "splits": self.corpus.split_sizes(),
                "epochs_completed": self.epoch,
                "steps": self.global_step,
                "config": dataclasses.asdict(self.config),
            },
            "metrics": {"val": self.best_metrics},
        }

    def save_last(self) -> None:
        if self.dist.main:
            payload = self.model.state_payload(metadata=self._metadata())
            payload["training"] = self._training_state()
            save_checkpoint(self.out / "last.pt", payload)

    def _save_best(self) -> None:
        if self.dist.main:
            self.model.save(self.out / "best.pt", half=self.config.half_checkpoint, metadata=self._metadata())

    # -- loop ---------------------------------------------------------------------------------------

    def _start_finetuning(self) -> None:
        encoder = self.model.encoder
        if not encoder.trainable:
            encoder.set_trainable(True)
            self.module = self._wrap()  # DDP must see the newly trainable parameters
            log.info("fine-tuning the encoder's last stage from epoch %d", self.epoch)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(ids) for _, ids in self.train_split.pairs]
        c = self.config
        return epoch_batches(
            lengths, c.batch_size, seed=c.seed, epoch=epoch, rank=self.dist.rank, world=self.dist.world
        )

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        c = self.config
        split = self.train_split
        batches = self._epoch_batches(epoch)[self.step_in_epoch :]
        if self._finetuning(epoch):
            flat = [i for b in batches for i in b]
            loader = DataLoader(
                _ImagePairs(split, flat, self.model.encoder.preprocess),
                batch_size=c.batch_size,
                num_workers=c.num_workers,
                collate_fn=_collate_pixels,
                pin_memory=self.device.type == "cuda",
            )
            for pixels, captions in loader:
                yield pixels, captions, True
            return
        for batch in batches:
            rows = [split.pairs[i][0] for i in batch]
            yield split.features.get(rows), _pad([split.pairs[i][1] for i in batch]), False

    def train_step(self, inputs: torch.Tensor, captions: torch.Tensor, from_pixels: bool) -> float:
        inputs = inputs.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            logits, alphas = self.module(inputs if from_pixels else inputs.float(), captions, from_pixels)
            loss = caption_loss(logits, alphas, captions, self.config)
        self._optimize(loss)
        self.scheduler.step()
        return float(loss.detach())

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

    def fit(self) -> dict[str, Any]:
        c = self.config
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
            (self.out / "vocab.txt").write_text("\n".join(self.vocab.tokens) + "\n")
        log.info(
            "%d training captions over %d images, vocabulary %d, %d steps/epoch",
            len(self.train_split.pairs),
            len(self.train_split.records),
            len(self.vocab),
            self.steps_per_epoch,
        )
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
        if self.writer is not None:
            self.writer.close()
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

    def _run_epoch(self) -> str:
        """One epoch of cross-entropy steps or, from ``scst_after``, self-critical ones; resumes mid-epoch."""
        c = self.config
        self.module.train()
        if self._self_critical(self.epoch):
            batches = self._scst_batches(self.epoch)
            total, title = len(batches), f"epoch {self.epoch + 1}/{c.epochs} (self-critical)"
            steps = (
                _Step(*self.scst_step(rows), captions=len(rows) * c.scst_samples)
                for rows in batches[self.step_in_epoch :]
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
        self.last_rate = seen * self.dist.world / max(time.perf_counter() - start, 1e-9)
        self.last_reward = float(np.mean(rewards)) if rewards else None
        return "done"

    # -- self-critical epochs -------------------------------------------------------------------------

    def _scst_rows(self) -> list[int]:
        """Training images with features (an unreadable image has none) and at least one reference."""
        split = self.train_split
        skip = set(split.features.failed)
        return [i for i, r in enumerate(split.records) if str(r.path) not in skip and r.captions]

    def _scst_batches(self, epoch: int) -> list[list[int]]:
        """Batches of training-image rows: a seeded shuffle per epoch, split evenly across processes."""
        c = self.config
        rows = self._scst_rows()
        batches = epoch_batches(
            [0] * len(rows), c.scst_batch_images, seed=c.seed, epoch=epoch, rank=self.dist.rank, world=self.dist.world
        )
        return [[rows[i] for i in batch] for batch in batches]

    def _build_reward(self) -> CiderD:
        started = time.perf_counter()
        references = [[tokenize(caption) for caption in r.captions] for r in self.train_split.records]
        reward = CiderD(references)
        if self.dist.main:
            seconds = time.perf_counter() - started
            log.info("CIDEr-D reward over %d training images built in %.1fs", len(reward), seconds)
        return reward

    def scst_step(self, rows: list[int]) -> tuple[float, float]:
        """One self-critical step on training images ``rows``; returns (loss, mean CIDEr-D of the samples)."""
        c = self.config
        if self.cider is None:
            self.cider = self._build_reward()
        grid = self.train_split.features.get(rows).to(self.device, non_blocking=True).float()
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            tokens, log_probs, mask = self.module(grid, None, False, sample=(c.scst_samples, c.scst_max_length))
        images = [row for row in rows for _ in range(c.scst_samples)]
        captions = [self.vocab.decode_tokens(row) for row in tokens.tolist()]
        rewards = torch.as_tensor(self.cider.scores(images, captions), dtype=torch.float32, device=self.device)
        loss = scst_loss(log_probs.float(), mask, leave_one_out_advantage(rewards, c.scst_samples))
        self.optimizer.param_groups[0]["lr"] = c.scst_lr  # the decoder's; the frozen encoder's stays as it is
        self._optimize(loss)
        return float(loss.detach()), float(rewards.mean())

    def _end_epoch(self) -> bool:
        """Validate, log, checkpoint; returns True when early stopping says stop."""
        c = self.config
        metrics: dict[str, float] = {}
        if self.dist.main:
            metrics = self.evaluate_val()
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
            if improved:
                self._save_best()
            self.save_last()
        if self.dist.world > 1:
            flag = torch.tensor([int(stop)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0, group=self.dist.group)
            stop = bool(flag.item())
        return stop

    @torch.no_grad()
    def evaluate_val(self) -> dict[str, float]:
        """Validation loss (teacher forced) and caption metrics on the validation split."""
        c = self.config
        model = self.model.eval()
        split = self.val_split
        from_pixels = self.model.encoder.trainable
        grids = self._val_grids(from_pixels)
        total, count = 0.0, 0
        by_row: dict[int, list[list[int]]] = {}
        for row, ids in split.pairs:
            by_row.setdefault(row, []).append(ids)
        predictions: dict[str, str] = {}
        beam = c.val_method == "beam"
        options = DecodingOptions(
            method="beam" if beam else "greedy",
            max_length=c.max_caption_words,
            **({"beam_size": c.val_beam_size} if beam else {}),
        )
        for rows, grid in grids:
            grid = grid.to(self.device).float()
            pairs = [(i, ids) for i, r in enumerate(rows) for ids in by_row.get(r, [])]
            if pairs:
                captions = _pad([ids for _, ids in pairs]).to(self.device)
                logits, alphas = model.decoder(grid[[i for i, _ in pairs]], captions)
                total += float(caption_loss(logits, alphas, captions, c)) * len(pairs)
                count += len(pairs)
            for r, hyps in zip(rows, decode(model.decoder, grid, options, model.rule_masks()), strict=True):
                if r in by_row:
                    predictions[split.records[r].image_id] = self.vocab.decode(hyps[0].tokens)
        references = {k: v for k, v in self.val_corpus_references().items() if k in predictions}
        metrics = compute_metrics(predictions, references, java=False) if predictions else {}
        metrics["loss"] = total / max(count, 1)
        self.module.train()
        return metrics

    def val_corpus_references(self) -> dict[str, list[str]]:
        return {r.image_id: list(r.captions) for r in self.val_split.records}

    def _val_grids(self, from_pixels: bool) -> Iterator[tuple[list[int], torch.Tensor]]:
        split, size = self.val_split, 256
        if not from_pixels:
            for start in range(0, len(split.records), size):
                rows = list(range(start, min(start + size, len(split.records))))
                yield rows, split.features.get(rows)
            return
        images = DataLoader(ImageFiles(split.paths, self.model.encoder.preprocess), batch_size=64)
        for start, (pixels, _, _) in zip(range(0, len(split.records), 64), images, strict=True):
            rows = list(range(start, start + len(pixels)))
            yield rows, self.model.encoder.forward_features(pixels.to(self.device))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("time", "step", "epoch"):
                    self.writer.add_scalar(key, value, record.get("step", self.global_step))

    def _check_ranks_agree(self) -> None:
        """Under DDP every rank must end with the same weights; say so (or fail) in the log."""
        if self.dist.world == 1:
            return
        flat = torch.cat([p.detach().double().flatten() for p in self.model.decoder.parameters()])
        checksum = torch.stack([flat.sum(), (flat * flat).sum()])  # on the device the backend expects
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world)]
        dist.all_gather(gathered, checksum, group=self.dist.group)
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
        if trainer.dist.world > 1:
            dist.destroy_process_group()
            trainer.dist.group = None  # the last reference: freeing it waits for its gloo threads to finish
