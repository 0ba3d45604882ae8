"""Batched vs one-image-at-a-time captioning on CPU (or --device cuda).

Prints a table: for greedy and beam search, the time to caption N images in one batched call
against N single-image calls, and the speed-up ratio. Goal: batched >= 4x faster.

    python bench/decoding.py [--images 32] [--beam-size 3] [--encoder efficientnet_lite2]
"""

from __future__ import annotations

import argparse
import time

import torch

from captioner import Captioner, DecodingOptions, EncoderConfig, Vocabulary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--encoder", default="efficientnet_lite2")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--attention", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    return parser


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(args.vocab_size - 4)]])
    weights = "imagenet" if args.encoder.startswith("efficientnet") else None
    model = Captioner.build(
        EncoderConfig(args.encoder, weights=weights),
        vocab,
        embed_dim=args.hidden,
        hidden_dim=args.hidden,
        attention=args.attention,
    )
    model = model.to(args.device).eval()
    size = model.encoder.preprocess.crop
    pixels = torch.randn(args.images, 3, size, size, device=args.device)
    with torch.inference_mode():
        grid = model.encode(pixels)
    # An untrained decoder rarely says <end>: every caption runs to max_length, the worst case.
    rows = []
    for label, options in (
        ("greedy", DecodingOptions(method="greedy", max_length=args.max_length)),
        (
            f"beam {args.beam_size}",
            DecodingOptions(method="beam", beam_size=args.beam_size, max_length=args.max_length),
        ),  # noqa: E501
    ):
        model.caption_pixels(pixels[:2], options)  # warm-up
        for scope, fn_batched, fn_single in (
            (
                "decoder",
                lambda o=options: model.caption_features(grid, o),
                lambda o=options: [model.caption_features(grid[i : i + 1], o) for i in range(args.images)],
            ),
            (
                "encoder+decoder",
                lambda o=options: model.caption_pixels(pixels, o),
                lambda o=options: [model.caption_pixels(pixels[i : i + 1], o) for i in range(args.images)],
            ),
        ):
            batched = _best_of(fn_batched, args.repeats)
            single = _best_of(fn_single, args.repeats)
            rows.append((label, scope, batched, single, single / batched))
    print(
        f"\n{args.images} images, encoder {args.encoder} ({size}px), decoder LSTM H={args.hidden} V={args.vocab_size}"
        f"{' +attention' if args.attention else ''}, max_length {args.max_length}, device {args.device}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print(f"| {'method':<8} | {'scope':<16} | {'batched s':>9} | {'one-at-a-time s':>15} | {'speed-up':>8} |")
    print(f"|{'-' * 10}|{'-' * 18}|{'-' * 11}|{'-' * 17}|{'-' * 10}|")
    for label, scope, batched, single, ratio in rows:
        print(f"| {label:<8} | {scope:<16} | {batched:>9.3f} | {single:>15.3f} | {ratio:>7.1f}x |")


if __name__ == "__main__":
    main()
