"""What the ImageNet-1k class head costs, and whether the ONNX export computes the same probabilities.

Each image's ``class_probabilities`` come from the encoder pass the captions use (the head is one linear
layer on the average-pooled grid). This times ``caption_pixels`` (beam 3) and the encoder pass alone on
one batch of photos, with the head and with it switched off on the same model, in interleaved rounds,
and prints ms per image (medians) and the ratio, then the head alone on the batch's grids (the difference
the rows measure, without the noise of two whole runs). The goal: the head adds at most 5 % at batch 8.

With ``--onnx`` it also loads the model on ONNX Runtime (exported into the cache on first use) and prints
the largest absolute difference of the class probabilities from PyTorch's on the same photos.

    python bench/class_head.py [--checkpoint CKPT] [--data ../shared/data/flickr8k] [--batch 8] [--onnx]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner, DecodingOptions
from captioner.model import class_probabilities
from captioner.runtime import tune_malloc
from training.data import load_corpus

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Flickr8k folder; its test photos are used")
    parser.add_argument("--batch", type=int, default=8, help="photos per timed call")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also compare ONNX Runtime's class probabilities")
    return parser


def _ms_per_image(call: Callable[[], object], images: int) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000.0 / images


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit("--batch and --rounds must be >= 1")
    tune_malloc()  # as the service runs it
    model = Captioner.from_checkpoint(args.checkpoint)
    head = model.encoder.classifier
    if head is None:
        raise SystemExit("this model's encoder has no class head: nothing to measure")
    paths = [str(r.path) for r in load_corpus(str(args.data)).split("test", restval_as_train=False)[: args.batch]]
    pixels = model.preprocess(paths)
    options = DecodingOptions(method="beam", beam_size=args.beam_size)
    calls: dict[str, Callable[[], object]] = {
        f"caption_pixels, beam {args.beam_size}": lambda: model.caption_pixels(pixels, options),
        "encoder pass": lambda: model.encode_with_class_logits(pixels),
    }
    times: dict[tuple[str, bool], list[float]] = {(name, h): [] for name in calls for h in (False, True)}
    for call in calls.values():
        call()  # warm-up
    for _ in range(args.rounds):
        for name, call in calls.items():
            for with_head in (False, True):
                model.encoder.set_classifier(head if with_head else None)
                times[name, with_head].append(_ms_per_image(call, len(paths)))
    model.encoder.set_classifier(head)
    # the head alone, on the batch's grid: what the two rows above differ by, without their noise
    grid = model.encode(pixels)
    alone = [
        _ms_per_image(lambda: class_probabilities(model.encoder.class_logits(grid), len(paths)), len(paths))
        for _ in range(20 * args.rounds)
    ]

    print(
        f"\n{len(paths)} Flickr8k test photos per call, {args.rounds} interleaved rounds (medians), "
        f"torch threads: {torch.get_num_threads()}\n"
    )
    print("| what                    | without head ms/img | with head ms/img | extra  |")
    print("|-------------------------|--------------------:|-----------------:|-------:|")
    for name in calls:
        without, with_head = (statistics.median(times[name, h]) for h in (False, True))
        print(f"| {name:<23} | {without:>19.2f} | {with_head:>16.2f} | {100 * (with_head / without - 1):>+5.1f}% |")
    head_ms = statistics.median(alone)
    encoder_ms = statistics.median(times["encoder pass", False])
    print(
        f"\nthe head alone (pool, linear, softmax) on the batch's grids: {head_ms:.3f} ms per image, "
        f"{100 * head_ms / encoder_ms:.2f} % of the encoder pass"
    )

    if args.onnx:
        onnx_model = Captioner.from_checkpoint(args.checkpoint, backend="onnxruntime")
        want = model.caption_pixels(pixels, options)
        have = onnx_model.caption_pixels(pixels, options)
        diffs = [
            float(np.abs(h.class_probabilities - w.class_probabilities).max())  # type: ignore[operator]
            for h, w in zip(have, want, strict=True)
        ]
        same_top5 = sum(
            list(np.argsort(-h.class_probabilities)[:5]) == list(np.argsort(-w.class_probabilities)[:5])  # type: ignore[operator]
            for h, w in zip(have, want, strict=True)
        )
        same_captions = sum(h.captions[0].text == w.captions[0].text for h, w in zip(have, want, strict=True))
        print(
            f"\nONNX Runtime vs PyTorch on {len(paths)} photos: class probabilities max abs diff {max(diffs):.2e}; "
            f"same top-5 classes {same_top5}/{len(paths)}; same beam-{args.beam_size} caption "
            f"{same_captions}/{len(paths)}"
        )


if __name__ == "__main__":
    main()
