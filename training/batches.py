"""What the trainer reads: the splits as (feature row, token ids) pairs over the feature cache, and each
epoch's batches of them (or of images, for self-critical epochs), identical on every resume."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from captioner import Vocabulary
from captioner.encoders import ImageEncoder
from training.config import TrainConfig
from training.data import CaptionCorpus, ImageRecord, load_corpus
from training.distributed import Dist
from training.features import FeatureStore, ImageFiles, build_feature_cache

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Captions of one split as (feature row, token ids) pairs, plus the images they belong to."""

    records: list[ImageRecord]
    pairs: list[tuple[int, list[int]]] = field(default_factory=list)
    features: FeatureStore | None = None

    @property
    def paths(self) -> list[str]:
        return [str(r.path) for r in self.records]


def load_corpora(config: TrainConfig, dist: Dist) -> tuple[CaptionCorpus, CaptionCorpus]:
    """The training corpus and the one validation reads (the same unless ``val_data`` names another)."""
    c = config
    corpus = load_corpus(c.data, format=c.data_format, images_dir=c.images_dir)
    if c.limit_images is not None:
        corpus = corpus.subset(c.limit_images)
    val = corpus
    if c.val_data:
        val = load_corpus(c.val_data, split="val") if str(c.val_data).endswith(".json") else load_corpus(c.val_data)
        if c.limit_images is not None:
            val = val.subset(c.limit_images)
    if dist.main:
        log.info("data: %s %s", corpus.source, corpus.split_sizes())
    return corpus, val


def make_splits(config: TrainConfig, corpus: CaptionCorpus, val_corpus: CaptionCorpus) -> tuple[Split, Split]:
    """The training and validation splits' images (their pairs come with the feature cache)."""
    train = Split(corpus.split("train"))
    val_records = val_corpus.split("val")
    if config.val_max_images is not None:
        val_records = val_records[: config.val_max_images]
    val = Split(val_records)
    if not train.records:
        raise ValueError(f"{config.data}: no training images (split sizes {corpus.split_sizes()})")
    if not val.records:
        raise ValueError(f"{config.data}: no validation images; pass --val-data or use a data set with a val split")
    return train, val


def cache_features(
    splits: Sequence[Split], encoder: ImageEncoder, vocab: Vocabulary, config: TrainConfig, device, dist: Dist
) -> None:
    """Encode each split's images into the feature cache, then pair its rows with their captions."""
    c = config
    for split in splits:
        # Rank 0 encodes; the others wait, then open the finished cache.
        if dist.main:
            split.features = build_feature_cache(
                encoder, split.paths, c.cache_dir, device=device, num_workers=c.num_workers, progress=c.progress
            )
        dist.barrier()
        if not dist.main:
            split.features = build_feature_cache(
                encoder, split.paths, c.cache_dir, device=device, num_workers=0, progress=False
            )
        assert split.features is not None  # built above, on this rank or (after the barrier) from rank 0's cache
        skip = set(split.features.failed)
        split.pairs = make_pairs(split.records, vocab, c.max_caption_words, skip)


def make_pairs(records: Sequence[ImageRecord], vocab: Vocabulary, max_words: int, skip: set[str]) -> list:
    """(row, <bos> ids <eos>) for every caption of every image not in ``skip``; empty captions are dropped."""
    pairs = []
    for row, record in enumerate(records):
        if str(record.path) in skip:
            continue
        for caption in record.captions:
            ids = vocab.encode(caption, add_special=False)[:max_words]
            if ids:
                pairs.append((row, [vocab.bos_id, *ids, vocab.eos_id]))
    return pairs


def pad(captions: Sequence[Sequence[int]]) -> torch.Tensor:
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
    return torch.stack([p for p, _ in items]), pad([ids for _, ids in items])


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


def caption_batches(split: Split, config: TrainConfig, *, epoch: int, dist: Dist) -> list[list[int]]:
    """This process's batches of ``split``'s pair indices in ``epoch`` (see :func:`epoch_batches`)."""
    lengths = [len(ids) for _, ids in split.pairs]
    return epoch_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch, rank=dist.rank, world=dist.world)


def load_caption_batches(
    split: Split,
    batches: Sequence[Sequence[int]],
    config: TrainConfig,
    *,
    pixels_from: ImageEncoder | None,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(inputs, captions, from_pixels)`` for each batch: cached feature grids, or with ``pixels_from`` (an
    encoder that fine-tunes) images read and preprocessed for it by a DataLoader."""
    if pixels_from is not None:
        flat = [i for b in batches for i in b]
        loader = DataLoader(
            _ImagePairs(split, flat, pixels_from.preprocess),
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            collate_fn=_collate_pixels,
            pin_memory=device.type == "cuda",
        )
        for pixels, captions in loader:
            yield pixels, captions, True
        return
    assert split.features is not None  # cache_features has run: the pairs come with it
    for batch in batches:
        rows = [split.pairs[i][0] for i in batch]
        yield split.features.get(rows), pad([split.pairs[i][1] for i in batch]), False


def image_batches(split: Split, config: TrainConfig, *, epoch: int, dist: Dist) -> list[list[int]]:
    """Self-critical batches of ``split``'s image rows: a seeded shuffle per epoch, split evenly across
    processes, over the images with features (an unreadable image has none) and at least one reference."""
    assert split.features is not None  # cache_features has run (Trainer.__init__)
    skip = set(split.features.failed)
    rows = [i for i, r in enumerate(split.records) if str(r.path) not in skip and r.captions]
    batches = epoch_batches(
        [0] * len(rows), config.scst_batch_images, seed=config.seed, epoch=epoch, rank=dist.rank, world=dist.world
    )
    return [[rows[i] for i in batch] for batch in batches]
