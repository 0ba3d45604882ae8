"""PyTorch versus ONNX Runtime: the same model, one process, interleaved round by round.

The PyTorch model is fused for inference (``optimize_for_inference``, as the service runs it); the
ONNX Runtime model is its export (``captioner export ... --format onnx``, or the cache's). Each round
times, for every backend in turn, on the same real photos (medians over rounds, ms per image):

    encoder at batch 1 and 8; caption() with beam 3 at batch 1 and 8;
    one decoder step at 1 and 3 rows (beam 3 of one photo), and of that the session call alone;

then two real servers (``CAPTIONER_BACKEND=torch`` / ``onnxruntime``, default settings otherwise) run
side by side and take turns round by round: p50 latency at concurrency 1, throughput at concurrency
32. Prints one table with the speed-ups and the goals (encoder >= 1.8x at batch 8 and >= 1.4x at
batch 1; caption() beam 3 batch 8 >= 1.5x; server throughput at concurrency 32 >= 1.5x), and how
many captions the backends agree on.

    python bench/backends.py [--checkpoint C] [--onnx DIR] [--int8 DIR] [--rounds 6] [--no-servers]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# bench/serving.py's server and client (run as a script, this folder is first on sys.path)
from serving import DEFAULT_IMAGES, Server, _merge, drive, encode_request

from captioner import Captioner, DecodingOptions
from captioner.arrays import to_numpy
from captioner.decoding import next_word_logits
from captioner.model import DEFAULT_CHECKPOINT
from captioner.runtime import tune_malloc

GOALS = {  # (row, minimum speed-up of onnxruntime over torch)
    "encoder, batch 8": 1.8,
    "encoder, batch 1": 1.4,
    "caption() beam 3, batch 8": 1.5,
    "server req/s, concurrency 32": 1.5,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--onnx", type=Path, default=None, help="its ONNX export (default: exported/cached on use)")
    parser.add_argument("--int8", type=Path, default=None, help="an int8 export to time as a third backend")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds; medians are reported")
    parser.add_argument("--server-rounds", type=int, default=4, help="turns per server at each concurrency")
    parser.add_argument("--concurrency", type=int, nargs=2, default=[1, 32], metavar=("LOW", "HIGH"))
    parser.add_argument("--no-servers", action="store_true", help="time the library only")
    return parser


def _ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000.0


def _step_ms(model: Captioner, grid: torch.Tensor, rows: int, steps: int = 30) -> tuple[float, float]:
    """ms per decoder step at ``rows`` rows: the whole step as decoding calls it, and the ONNX session alone."""
    # in the model's own kind of array: torch tensors, or numpy for ONNX Runtime
    tokens = model.on_backend(np.full((rows,), model.vocab.bos_id, dtype=np.int64))
    with torch.inference_mode():
        state = model.decoder.init_state(model.on_backend(grid[:1])).repeat_interleave(rows)
        whole = statistics.median(_ms(lambda: next_word_logits(model.decoder, tokens, state)) for _ in range(steps))
        session = getattr(model.decoder, "step_session", None)
        if session is None:
            return whole, float("nan")
        parts = [tokens, *state.hidden, *((state.memory, state.keys) if state.memory is not None else ())]
        feeds = {
            name: np.ascontiguousarray(to_numpy(t)) for name, t in zip(model.decoder._step_inputs, parts, strict=True)
        }
        alone = statistics.median(_ms(lambda: session.run(None, feeds)) for _ in range(steps))
    return whole, alone


def bench_library(models: dict[str, Captioner], photos: list[Path], rounds: int) -> dict[tuple[str, str], float]:
    beam = DecodingOptions(method="beam", beam_size=3)
    pixels = next(iter(models.values())).preprocess([str(p) for p in photos[:8]])  # (8, 3, S, S)
    grid = next(iter(models.values())).encode(pixels[:1])
    samples: dict[tuple[str, str], list[float]] = {}

    def add(row: str, backend: str, value: float) -> None:
        samples.setdefault((row, backend), []).append(value)

    def one_round(backend: str, model: Captioner) -> None:
        single = [_ms(lambda i=i: model.encode(pixels[i : i + 1])) for i in range(8)]
        add("encoder, batch 1", backend, statistics.median(single))
        add("encoder, batch 8", backend, _ms(lambda: model.encode(pixels)) / 8)
        one = [_ms(lambda i=i: model.caption_pixels(pixels[i : i + 1], beam)) for i in range(8)]
        add("caption() beam 3, batch 1", backend, statistics.median(one))
        add("caption() beam 3, batch 8", backend, _ms(lambda: model.caption_pixels(pixels, beam)) / 8)
        for rows in (1, 3):
            whole, alone = _step_ms(model, grid, rows)
            add(f"decoder step, {rows} row(s)", backend, whole)
            if alone == alone:  # not NaN: an ONNX session
                add(f"  of which the session call, {rows} row(s)", backend, alone)

    for model in models.values():  # warm-up
        model.caption_pixels(pixels[:2], beam)
    for _ in range(rounds):
        for backend, model in models.items():
            one_round(backend, model)
    return {key: statistics.median(values) for key, values in samples.items()}


def bench_servers(args: argparse.Namespace, photos: list[Path], backends: list[str]) -> dict[tuple[str, str], float]:
    servers = {b: Server(args.checkpoint, "cpu", {"CAPTIONER_BACKEND": b}, None) for b in backends}
    out: dict[tuple[str, str], float] = {}
    try:
        urls = {b: s.wait_ready(timeout=600) for b, s in servers.items()}
        uploads = [(p.name, p.read_bytes()) for p in photos]
        params = {"method": "beam", "beam_size": "3"}
        requests = {b: [encode_request(u, n, d, params) for n, d in uploads] for b, u in urls.items()}
        low, high = args.concurrency
        for concurrency in (low, high):
            for b, url in urls.items():
                asyncio.run(drive(url, requests[b], concurrency, max(2 * concurrency, 8)))  # warm-up
            per_round = 8 if concurrency == 1 else 4 * concurrency
            levels: dict[str, list] = {b: [] for b in backends}
            for _ in range(args.server_rounds):
                for b, url in urls.items():
                    levels[b].append(asyncio.run(drive(url, requests[b], concurrency, per_round)))
            for b in backends:
                level = _merge(levels[b])
                if concurrency == low:
                    out[(f"server p50 ms, concurrency {low}", b)] = level.percentile(50)
                else:
                    out[(f"server req/s, concurrency {high}", b)] = level.throughput
    finally:
        for server in servers.values():
            server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.rounds < 1 or args.server_rounds < 1:
        raise SystemExit("--rounds and --server-rounds must be >= 1")
    photos = sorted(args.images.glob("*.jpg"))[:32]
    if len(photos) < 8:
        raise SystemExit(f"need at least 8 JPEG photos in {args.images} (pass --images DIR)")
    tune_malloc()  # as the service does
    models = {
        "torch": Captioner.from_checkpoint(args.checkpoint).optimize_for_inference(),
        "onnxruntime": Captioner.from_checkpoint(args.onnx or args.checkpoint, backend="onnxruntime"),
    }
    if args.int8 is not None:
        models["onnxruntime int8"] = Captioner.from_checkpoint(args.int8, backend="onnxruntime")
    figures = bench_library(models, photos, args.rounds)
    if not args.no_servers:
        figures.update(bench_servers(args, photos, ["torch", "onnxruntime"]))

    beam = DecodingOptions(method="beam", beam_size=3)
    texts = {b: [r.captions[0].text for r in m.caption([str(p) for p in photos], beam)] for b, m in models.items()}
    backends = list(models)
    print(f"\ncheckpoint: {args.checkpoint or DEFAULT_CHECKPOINT}   photos: {len(photos)} ({args.images})")
    print(f"torch threads: {torch.get_num_threads()}   CPUs: {os.cpu_count()}   rounds: {args.rounds}")
    header = f"| {'median':<36} | " + " | ".join(f"{b:>16}" for b in backends) + " | speed-up | goal |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = dict.fromkeys(row for row, _ in figures)
    for row in rows:
        cells = [figures.get((row, b)) for b in backends]
        base, onnx = figures.get((row, "torch")), figures.get((row, "onnxruntime"))
        speedup = None
        if base and onnx:
            speedup = onnx / base if "req/s" in row else base / onnx
        goal = GOALS.get(row)
        verdict = "" if goal is None or speedup is None else f">= {goal} {'met' if speedup >= goal else 'MISSED'}"
        unit = "" if "req/s" in row else " ms"
        print(
            f"| {row:<36} | "
            + " | ".join(f"{c:>13.2f}{unit:3}" if c is not None else f"{'':>16}" for c in cells)
            + f" | {f'{speedup:.2f}x' if speedup else '':>8} | {verdict} |"
        )
    for b in backends[1:]:
        same = sum(a == c for a, c in zip(texts["torch"], texts[b], strict=True))
        print(f"beam-3 captions identical, torch vs {b}: {same}/{len(photos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
