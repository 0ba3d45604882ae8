"""Training-side throughput against bare-PyTorch baselines, measured in one run on one machine.

1. encoder: bare ``forward_features`` on random tensors (images/s) vs the feature cache build on
   real JPEGs, decoding + preprocessing included (goal: >= 70% of bare);
2. decoder: a bare ``nn.LSTM`` + linear head train step on random tokens (captions/s) vs the
   training loop on cached features with the same sizes (goal: >= 50% of bare);
3. optionally the wall time of a full run, read from its ``log.jsonl`` (``--run-dir``).

    python bench/training_throughput.py --data ../shared/data/flickr8k [--images 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from captioner.config import EncoderConfig
from captioner.encoders import build_encoder, default_chunk_size
from training.data import load_corpus
from training.engine import TrainConfig, Trainer
from training.features import build_feature_cache


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Flickr8k folder (or any data set training reads)")
    parser.add_argument("--encoder", default="efficientnet_lite2")
    parser.add_argument("--images", type=int, default=256, help="images for the encoder comparison")
    parser.add_argument("--encoder-batch", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="captions per training step")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--train-images", type=int, default=600, help="training images for the loop timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", default=None, help="a finished run whose wall time to report")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_encoder(encoder, device, batch: int, images: int) -> float:
    size = encoder.preprocess.crop
    x = torch.randn(batch, 3, size, size, device=device)
    amp = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        chunk_size = default_chunk_size(device)  # as fast as the bare encoder goes (see CPU_CHUNK_SIZE)
        encoder.forward_features(x, chunk_size=chunk_size)  # warm-up
        _sync(device)
        start, done = time.perf_counter(), 0
        while done < images:
            encoder.forward_features(x, chunk_size=chunk_size)
            done += batch
        _sync(device)
    return done / (time.perf_counter() - start)


def bare_lstm(vocab: int, hidden: int, batch: int, steps: int, device) -> float:
    torch.manual_seed(0)
    embed, lstm, head = nn.Embedding(vocab, hidden), nn.LSTM(hidden, hidden, batch_first=True), nn.Linear(hidden, vocab)
    modules = nn.ModuleList([embed, lstm, head]).to(device)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, 21), device=device)

    def step():
        out, _ = lstm(embed(tokens[:, :-1]))
        loss = nn.functional.cross_entropy(head(out).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    corpus = load_corpus(args.data)
    paths = [str(r.path) for r in corpus.records[: args.images]]
    encoder = build_encoder(EncoderConfig(args.encoder)).to(device)
    rows = []
    bare = bare_encoder(encoder, device, args.encoder_batch, args.images)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        build_feature_cache(
            encoder,
            paths,
            cache,
            device=device,
            batch_size=args.encoder_batch,
            num_workers=args.num_workers,
            progress=False,
        )
        ours = len(paths) / (time.perf_counter() - start)
    rows.append(("encoder images/s", bare, ours, 0.70))

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig.from_dict(
            dict(
                data=args.data,
                output_dir=f"{tmp}/run",
                cache_dir=f"{tmp}/cache",
                encoder=args.encoder,
                attention=False,
                embed_dim=args.hidden,
                hidden_dim=args.hidden,
                epochs=1,
                batch_size=args.batch_size,
                limit_images=args.train_images,
                device=args.device,
                num_workers=args.num_workers,
                progress=False,
                val_max_images=8,
                warmup_steps=1,
            )
        )
        trainer = Trainer(config)
        vocab = len(trainer.vocab)
        trainer._run_epoch()  # warm-up epoch (also fills the page cache)
        trainer.step_in_epoch = 0
        trainer._run_epoch()
        loop = trainer.last_rate
    steps = max(3, min(30, args.train_images * 5 // args.batch_size))
    bare_rate = bare_lstm(vocab, args.hidden, args.batch_size, steps, device)
    rows.append((f"LSTM train captions/s (V={vocab})", bare_rate, loop, 0.50))

    print(
        f"\ndevice {device}, encoder {args.encoder}, {torch.get_num_threads()} CPU threads, "
        f"{args.num_workers} loader workers\n"
    )
    print(f"| {'measure':<34} | {'bare':>10} | {'ours':>10} | {'ratio':>6} | {'goal':>5} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 7}|")
    for name, base, value, goal in rows:
        ratio = value / base
        mark = "met" if ratio >= goal else "MISSED"
        print(f"| {name:<34} | {base:>10.1f} | {value:>10.1f} | {ratio:>5.0%} | {goal:>4.0%} {mark} |")
    if args.run_dir:
        log = [json.loads(line) for line in (Path(args.run_dir) / "log.jsonl").read_text().splitlines()]
        ends = [r for r in log if r.get("event") == "end"]
        epochs = [r for r in log if "train_loss" in r and "epoch" in r]
        wall = sum(r["wall_seconds"] for r in ends)  # a resumed run has several start/end pairs
        print(f"\nfull run {args.run_dir}: {len(epochs)} epochs, {wall / 60:.1f} min of training wall time")


if __name__ == "__main__":
    main()
