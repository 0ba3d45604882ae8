"""Encoder time per image by chunk size: one pass over a whole batch versus a few images at a time.

On CPU a big batch's activations spill out of the cores' caches, so per image the encoder gets slower
as the batch grows; ``Captioner.encode`` and the feature cache therefore run the encoder in chunks of
``captioner.encoders.CPU_CHUNK_SIZE`` images on CPU. This prints ms per image for each chunk size
(rounds interleaved, medians), and the ratio of the whole batch in one pass to the default chunking.

    python bench/encoder_batch.py [--encoder efficientnet_lite2] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from captioner.config import EncoderConfig
from captioner.encoders import build_encoder, default_chunk_size
from captioner.runtime import tune_malloc


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet_lite2")
    parser.add_argument("--batch", type=int, default=32, help="images encoded per timing")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.batch < 1 or any(c < 1 for c in args.chunks):
        raise SystemExit("--batch and --chunks must be >= 1")
    tune_malloc()  # as the service runs it
    weights = "imagenet" if args.encoder.startswith("efficientnet") else None  # timing does not need trained weights
    encoder = build_encoder(EncoderConfig(args.encoder, weights=weights)).to(args.device).eval()
    size = encoder.preprocess.crop
    pixels = torch.randn(args.batch, 3, size, size, device=args.device)
    default = default_chunk_size(args.device) or args.batch
    chunks = sorted({min(c, args.batch) for c in [*args.chunks, default, args.batch]})

    def per_image_ms(chunk: int) -> float:
        started = time.perf_counter()
        encoder.forward_features(pixels, chunk_size=chunk)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000.0 / args.batch

    times: dict[int, list[float]] = {c: [] for c in chunks}
    with torch.inference_mode():
        per_image_ms(default)  # warm-up
        for _ in range(args.rounds):
            for chunk in chunks:
                times[chunk].append(per_image_ms(chunk))
    medians = {c: statistics.median(t) for c, t in times.items()}

    print(f"\nencoder: {args.encoder} ({size} px)   device: {args.device}   torch threads: {torch.get_num_threads()}")
    print(f"{args.batch} images per timing, {args.rounds} interleaved rounds (medians)\n")
    print("| chunk size   | ms per image | vs one pass |")
    print("|-------------:|-------------:|------------:|")
    for chunk in chunks:
        mark = " (default)" if chunk == default else ""
        print(f"| {f'{chunk}{mark}':>12} | {medians[chunk]:>12.1f} | {medians[args.batch] / medians[chunk]:>10.2f}x |")
    print(f"\none pass of {args.batch} / default chunks of {default}: {medians[args.batch] / medians[default]:.2f}x")


if __name__ == "__main__":
    main()
