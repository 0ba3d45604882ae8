"""Captioning a split and scoring the captions: one path for ``captioner-eval`` and the trainer's validation.

Both feed :func:`predict_captions` batches of ``(rows, feature grid)`` (from the feature cache, or from
the fine-tuning encoder) and score what it returns with :func:`score_captions`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from captioner import Captioner, DecodingOptions
from captioner.arrays import array_namespace
from captioner.decoding import decode
from training.batches import Split, pad
from training.config import TrainConfig
from training.data import CaptionCorpus, ImageRecord
from training.features import ImageFiles
from training.losses import caption_loss
from training.metrics import compute_metrics

Batches = Iterable[tuple[list[int], torch.Tensor]]  # (record rows, their feature grids (B, C, h, w))


def predict_captions(
    model: Captioner,
    batches: Batches,
    records: Sequence[ImageRecord],
    options: DecodingOptions,
    *,
    keep: Container[int] | None = None,
) -> dict[str, str]:
    """Each batch's best caption per image under ``options`` and the model's caption rules, by image id;
    with ``keep``, only for the rows in it (the rest of a batch is decoded all the same)."""
    predictions: dict[str, str] = {}
    for rows, grid in batches:
        grid = model.on_backend(grid)  # a torch tensor, or numpy for the onnxruntime backend
        xp = array_namespace(grid)
        grid = xp.astype(grid, xp.float32)
        for row, hyps in zip(rows, decode(model.decoder, grid, options, model.rule_masks()), strict=True):
            if keep is None or row in keep:
                predictions[records[row].image_id] = model.vocab.decode(hyps[0].tokens)
    return predictions


def score_captions(
    predictions: dict[str, str], records: Sequence[ImageRecord], *, java: bool | None
) -> dict[str, float]:
    """BLEU, METEOR (with ``java``; None: when Java is found), ROUGE-L and CIDEr of ``predictions`` against
    the captions of the records they caption."""
    references = {r.image_id: list(r.captions) for r in records if r.image_id in predictions}
    return compute_metrics(predictions, references, java=java)


def caption_shape_rates(predictions: dict[str, str], corpus: CaptionCorpus, model: Captioner) -> dict[str, float]:
    """The share of captions that end where human captions do not (``dangling``) and that start where
    they do not (``subjectless``), judged by rules learned from the data's training captions (whatever
    the checkpoint holds, so models with and without rules are judged alike); else the checkpoint's."""
    from captioner.caption_rules import CaptionRules
    from captioner.text import tokenize

    train = corpus.train_captions()
    rules = CaptionRules.learn(train) if train else model.caption_rules
    if rules is None or not predictions:
        return {}
    words = [tokenize(caption) for caption in predictions.values()]
    return {
        "dangling": sum(rules.dangling(w) for w in words) / len(words),
        "subjectless": sum(rules.subjectless(w) for w in words) / len(words),
    }


def validation_options(config: TrainConfig) -> DecodingOptions:
    if config.val_method == "beam":
        return DecodingOptions(method="beam", max_length=config.max_caption_words, beam_size=config.val_beam_size)
    return DecodingOptions(method="greedy", max_length=config.max_caption_words)


@torch.no_grad()
def validate(model: Captioner, split: Split, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation loss (teacher forced, as trained) and caption metrics on ``split``; leaves ``model`` in
    eval mode. Images with no usable caption are neither captioned nor scored."""
    model.eval()
    by_row: dict[int, list[list[int]]] = {}
    for row, ids in split.pairs:
        by_row.setdefault(row, []).append(ids)
    total, count = 0.0, 0

    def with_loss(batches: Batches) -> Iterator[tuple[list[int], torch.Tensor]]:
        nonlocal total, count
        for rows, grid in batches:
            grid = grid.to(device).float()
            pairs = [(i, ids) for i, r in enumerate(rows) for ids in by_row.get(r, [])]
            if pairs:
                captions = pad([ids for _, ids in pairs]).to(device)
                logits, alphas = model.decoder(grid[[i for i, _ in pairs]], captions)
                loss = caption_loss(
                    logits, alphas, captions, label_smoothing=config.label_smoothing, attention_reg=config.attention_reg
                )
                total += float(loss) * len(pairs)
                count += len(pairs)
            yield rows, grid

    grids = _validation_grids(model, split, device)
    predictions = predict_captions(model, with_loss(grids), split.records, validation_options(config), keep=by_row)
    metrics = score_captions(predictions, split.records, java=False) if predictions else {}
    metrics["loss"] = total / max(count, 1)
    return metrics


def _validation_grids(model: Captioner, split: Split, device: torch.device) -> Batches:
    """The cached grids, or while the encoder fine-tunes (the cache is stale then) grids it computes."""
    size = 256
    if not model.encoder.trainable:
        assert split.features is not None  # cache_features has run (Trainer.__init__)
        for start in range(0, len(split.records), size):
            rows = list(range(start, min(start + size, len(split.records))))
            yield rows, split.features.get(rows)
        return
    images = DataLoader(ImageFiles(split.paths, model.encoder.preprocess), batch_size=64)
    for start, (pixels, _, _) in zip(range(0, len(split.records), 64), images, strict=True):
        rows = list(range(start, start + len(pixels)))
        yield rows, model.encoder.forward_features(pixels.to(device))
