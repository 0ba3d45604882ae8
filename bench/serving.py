"""Serving benchmark: the real ``captioner-serve`` on loopback versus the bare model, in one run.

The bare model is encoder + decoder (``Captioner.caption_pixels`` on an already preprocessed tensor)
in this process, on the same photos the servers get. Two servers run side by side, one with
micro-batching and one without (``CAPTIONER_MAX_BATCH_SIZE=1``), and are driven over HTTP at
concurrency 1, 8 and 32 with real photos, each request encoded once before timing and sent over
keep-alive connections (see :class:`Connection`). At each level the servers take turns round by
round (an idle server takes no CPU), and at concurrency 1 the bare model takes a turn too, so every
number is timed in the same machine state: on a shared VM the CPU's speed drifts by tens of percent
within minutes. Prints a table and the two goal ratios:

    p50 latency at concurrency 1            <= 1.15 x bare model time
    throughput at concurrency 8, batching   >= 1.3 x throughput without it

Usage::

    python bench/serving.py --checkpoint runs/best.pt            # default: the bundled model
    python bench/serving.py --checkpoint tiny.pt --rounds 3 --method greedy
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import torch

from captioner.decoding import DecodingOptions
from captioner.encoders import default_chunk_size
from captioner.model import DEFAULT_CHECKPOINT, Captioner
from captioner.onnx_backend import onnxruntime_available
from captioner.runtime import tune_malloc
from captioner.transforms import load_image
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench/serving.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="onnxruntime" if onnxruntime_available() else "torch",
        help="what runs the model, in the bare model and the servers (CAPTIONER_BACKEND); default: the service's "
        "own choice on CPU (onnxruntime when installed)",
    )
    parser.add_argument("--method", default="beam", choices=["greedy", "beam", "sample"])
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="rounds per concurrency level; in each, every server (and at concurrency 1 the bare model) takes a turn",
    )
    parser.add_argument(
        "--round-size",
        type=int,
        default=8,
        help="requests (and bare runs) per turn at concurrency 1; at concurrency C, max(4 C, this)",
    )
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32], help="levels; none: skip them")
    parser.add_argument(
        "--burst",
        type=int,
        default=400,
        help="then send this many uploads at once to a server with the service's default settings (admission "
        "control, batch size): the overload row; 0 skips it",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="the micro-batching server's limit")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the micro-batching server's wait")
    parser.add_argument(
        "--encoder-chunk-size",
        type=int,
        default=None,
        help="the servers' CAPTIONER_ENCODER_CHUNK_SIZE (most images per encoder pass); default: the library's choice",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the bare model and the servers (OMP_NUM_THREADS); default: torch's choice. "
        "1 gives steadier numbers on a machine shared with other CPU-heavy work",
    )
    parser.add_argument(
        "--malloc-mmap-threshold-mb",
        type=int,
        default=Settings.model_fields["malloc_mmap_threshold_mb"].default,
        help="the servers' CAPTIONER_MALLOC_MMAP_THRESHOLD_MB, applied to the bare model in this process too "
        "(captioner.runtime.tune_malloc), so both run with the same allocator; 0: glibc's defaults for both",
    )
    return parser


@dataclass
class Level:
    setting: str
    concurrency: int
    latencies_ms: list[float]
    seconds: float
    batch_sizes: list[int]
    model_ms: list[float]  # the server's own transform + encoder + decoder time for each request's batch
    decode_ms: list[float]  # the server's upload decoding (JPEG -> RGB) time per request
    handler_ms: list[float]  # the server's time inside the handler, upload parsing included
    peak_rss_mb: float | None = None  # the server process's peak resident memory so far

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


class Bare:
    """The bare model in this process: encoder + decoder on already preprocessed photos.

    Runs cycle through the same photos the server is sent: beam search takes longer on a photo whose
    caption is longer, so timing one photo would compare the server against a different workload.
    """

    def __init__(
        self,
        checkpoint: Path | None,
        device: str,
        images: list[bytes],
        options: DecodingOptions,
        backend: str = "torch",
    ) -> None:
        model = Captioner.from_checkpoint(checkpoint, device=device, backend=backend)
        self.model = model.optimize_for_inference()  # as the server
        self.images = images
        self.pixels = [self.model.preprocess([image]) for image in images]  # each (1, 3, S, S)
        self.options = options
        self.turn = 0
        self.run(5)  # warm-up

    def _next(self) -> int:
        self.turn += 1
        return self.turn % len(self.images)

    def run(self, runs: int) -> list[float]:
        """ms of encoder + decoder for ``runs`` single photos."""
        times = []
        for _ in range(runs):
            pixels = self.pixels[self._next()]
            started = time.perf_counter()
            self.model.caption_pixels(pixels, self.options)
            if str(self.model.device).startswith("cuda"):  # torch.device, or "cpu" for ONNX Runtime
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000.0)
        return times

    def preprocess_ms(self, runs: int) -> float:
        return _median_ms(lambda: self.model.preprocess([load_image(self.images[self._next()])]), runs)


def _load_launcher():
    """tests/service/server.py, which starts ``captioner-serve`` for the tests as well, loaded from its file: the
    install provides neither tests/ nor bench/ as packages, and a script's folder is what it can import from."""
    spec = importlib.util.spec_from_file_location("captioner_tests_server", ROOT / "tests" / "service" / "server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


_launcher = _load_launcher()


class Server:
    """``captioner-serve --port 0`` with the given CAPTIONER_* environment (the caller's own stay out, but for
    where exports made on first use are cached), started by the tests' launcher."""

    def __init__(self, checkpoint: Path | None, device: str, env: dict[str, str], threads: int | None) -> None:
        args = ["--host", "127.0.0.1", "--port", "0", "--no-access-log", "--device", device]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        if threads is not None:
            env = {"OMP_NUM_THREADS": str(threads), **env}
        self.server = _launcher.launch(args, env)

    def wait_ready(self, timeout: float = 120.0) -> str:
        try:
            return self.server.wait_ready(timeout)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None

    def peak_rss_mb(self) -> float | None:
        """The server process's peak resident memory (Linux), read before it stops."""
        try:
            status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else None

    def stop(self) -> None:
        _launcher.stop(self.server, timeout=30)


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the timed requests.

    Each photo's request (headers and multipart body) is encoded once, before timing, and sent as
    bytes: what is timed is the server plus the loopback round trip, not a client library building
    multipart bodies (httpx's ``files=`` costs 1-2.5 ms per request here, 2-4 % of the model time).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one encoded request; returns the response's status and body."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
        length = next((int(v) for k, v in headers.items() if k.strip().lower() == "content-length"), None)
        if length is None:
            raise RuntimeError(f"response without Content-Length: {status_line}")
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def encode_request(url: str, name: str, data: bytes, params: dict[str, str]) -> bytes:
    """``POST /caption?params`` with ``data`` as the multipart field ``image``, as bytes on the wire."""
    boundary = f"bench-{uuid.uuid4().hex}"
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="image"; filename="{name}"\r\n'.encode(),
        b"Content-Type: image/jpeg\r\n\r\n", data, f"\r\n--{boundary}--\r\n".encode(),
    ])  # fmt: skip
    host = url.removeprefix("http://")
    head = (
        f"POST /caption?{urlencode(params)} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def drive(url: str, requests: list[bytes], concurrency: int, total: int) -> Level:
    """``total`` requests from ``concurrency`` clients, each sending its next request when answered."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    model_ms: list[float] = []
    decode_ms: list[float] = []
    handler_ms: list[float] = []
    counter = iter(range(total))
    connections = [await Connection.open(url) for _ in range(concurrency)]

    async def worker(connection: Connection) -> None:
        for i in counter:
            started = time.perf_counter()
            status, body = await connection.send(requests[i % len(requests)])
            latencies.append((time.perf_counter() - started) * 1000.0)
            if status != 200:
                raise SystemExit(f"POST /caption answered {status}: {body[:500]!r}")
            timing = json.loads(body)["timing"]
            batch_sizes.append(timing["batch_size"])
            model_ms.append(timing["model_ms"])
            decode_ms.append(timing["decode_ms"])
            handler_ms.append(timing["total_ms"])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in connections))
        seconds = time.perf_counter() - started
    finally:
        for connection in connections:
            await connection.close()
    return Level("", concurrency, latencies, seconds, batch_sizes, model_ms, decode_ms, handler_ms)


@dataclass
class Burst:
    """``size`` requests sent at the same moment, each on its own new connection."""

    size: int
    statuses: list[int]  # 0: the connection failed (reset, closed) before a response came
    latencies_ms: list[float]
    retry_after: list[bool]  # the response carried Retry-After
    seconds: float
    peak_rss_mb: float | None = None

    def latencies(self, status: int) -> list[float]:
        return sorted(ms for ms, s in zip(self.latencies_ms, self.statuses, strict=True) if s == status)

    def retry_after_missing(self, status: int) -> int:
        return sum(1 for s, r in zip(self.statuses, self.retry_after, strict=True) if s == status and not r)


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


async def burst(url: str, requests: list[bytes], size: int) -> Burst:
    """Open ``size`` connections, then send one request on each at once, as a crowd of clients would."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    streams = [await asyncio.open_connection(host, int(port)) for _ in range(size)]
    go = asyncio.Event()

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float, bool]:
        await go.wait()
        started = time.perf_counter()
        try:
            writer.write(requests[i % len(requests)])
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status = int(head.split()[1])
            length = int(re.search(r"content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            return 0, (time.perf_counter() - started) * 1000.0, False
        finally:
            writer.close()
        return status, (time.perf_counter() - started) * 1000.0, "\r\nretry-after:" in head

    tasks = [asyncio.ensure_future(one(i, r, w)) for i, (r, w) in enumerate(streams)]
    started = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    return Burst(size, [r[0] for r in results], [r[1] for r in results], [r[2] for r in results], seconds)


def print_burst(result: Burst) -> None:
    counts = {status: result.statuses.count(status) for status in sorted(set(result.statuses))}
    ok, shed = result.latencies(200), result.latencies(503)
    print(f"\noverload: a burst of {result.size} simultaneous uploads to a server with the default settings")
    print(f"| {'status':>6} | {'count':>5} | {'p50 ms':>8} | {'p99 ms':>8} | {'max ms':>8} | {'no Retry-After':>14} |")
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for status, count in counts.items():
        times = result.latencies(status)
        label = str(status) if status else "failed"
        print(
            f"| {label:>6} | {count:>5} | {_percentile(times, 50):>8.0f} | {_percentile(times, 99):>8.0f} | "
            f"{times[-1]:>8.0f} | {result.retry_after_missing(status):>14} |"
        )
    others = sum(n for status, n in counts.items() if status not in (200, 503))
    print(
        f"accepted {len(ok)}, shed {len(shed)}, other {others} in {result.seconds:.1f} s; peak RSS "
        f"{result.peak_rss_mb or float('nan'):.0f} MB"
    )
    goals = [
        ("only 200 and 503", others == 0),
        ("accepted p99 <= 8 s", _percentile(ok, 99) <= 8000.0),
        ("every 503 has Retry-After", result.retry_after_missing(503) == 0),
        ("every 503 in < 1.5 s", not shed or shed[-1] < 1500.0),
    ]
    print("goals: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in goals))


def _merge(rounds: list[Level]) -> Level:
    def cat(name: str) -> list[float]:
        return [x for r in rounds for x in getattr(r, name)]

    return Level(
        "", rounds[0].concurrency, cat("latencies_ms"), sum(r.seconds for r in rounds), cat("batch_sizes"),
        cat("model_ms"), cat("decode_ms"), cat("handler_ms"),
    )  # fmt: skip


def bench_servers(
    envs: dict[str, dict[str, str]],
    args: argparse.Namespace,
    photos: list[tuple[str, bytes]],
    params: dict[str, str],
    bare: Bare,
) -> tuple[list[Level], list[float]]:
    """All servers run side by side (an idle one takes no CPU) and, at each concurrency level, take
    turns round by round, with the bare model taking its turn at concurrency 1: every setting is
    timed in the same machine state, so the ratios hold even though a shared VM's speed drifts by
    tens of percent within minutes."""
    servers = {setting: Server(args.checkpoint, args.device, env, args.threads) for setting, env in envs.items()}
    bare_ms: list[float] = []
    try:
        urls = {setting: server.wait_ready() for setting, server in servers.items()}
        requests = {
            setting: [encode_request(url, name, data, params) for name, data in photos] for setting, url in urls.items()
        }
        levels = []
        for concurrency in args.concurrency:
            for setting, url in urls.items():
                asyncio.run(drive(url, requests[setting], concurrency, max(2 * concurrency, 8)))  # warm-up
            per_round = args.round_size if concurrency == 1 else max(4 * concurrency, args.round_size)
            rounds: dict[str, list[Level]] = {setting: [] for setting in servers}
            for _ in range(args.rounds):
                for setting, url in urls.items():
                    rounds[setting].append(asyncio.run(drive(url, requests[setting], concurrency, per_round)))
                if concurrency == 1:
                    bare_ms += bare.run(args.round_size)
            for setting, server in servers.items():
                level = _merge(rounds[setting])
                level.setting = setting
                level.peak_rss_mb = server.peak_rss_mb()
                levels.append(level)
        return levels, bare_ms
    finally:
        for server in servers.values():
            server.stop()


def bench_burst(
    env: dict[str, str], args: argparse.Namespace, photos: list[tuple[str, bytes]], params: dict[str, str]
) -> Burst:
    """The overload row: one server with the service's defaults, warmed up, then one burst."""
    server = Server(args.checkpoint, args.device, env, args.threads)
    try:
        url = server.wait_ready()
        requests = [encode_request(url, name, data, params) for name, data in photos]
        asyncio.run(drive(url, requests, 8, 32))  # warm-up, and the admission estimate from real batches
        result = asyncio.run(burst(url, requests, args.burst))
        result.peak_rss_mb = server.peak_rss_mb()
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.round_size < 1:
        parser.error("--rounds and --round-size must be >= 1")
    if args.encoder_chunk_size is not None and not 1 <= args.encoder_chunk_size <= 1024:
        parser.error(f"--encoder-chunk-size must be in [1, 1024], got {args.encoder_chunk_size}")
    if not 0 <= args.malloc_mmap_threshold_mb <= 1024:
        parser.error(f"--malloc-mmap-threshold-mb must be in [0, 1024], got {args.malloc_mmap_threshold_mb}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc_mmap_threshold_mb:
        tune_malloc(args.malloc_mmap_threshold_mb * 1024 * 1024)  # the same allocator as the servers
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        raise SystemExit("no bundled default model yet: pass --checkpoint PATH")
    files = sorted(args.images.glob("*.jpg"))[:32]
    if not files:
        raise SystemExit(f"no JPEG photos in {args.images} (pass --images DIR)")
    photos = [(p.name, p.read_bytes()) for p in files]
    options = DecodingOptions(method=args.method)
    params = {"method": args.method}

    bare = Bare(args.checkpoint, args.device, [data for _, data in photos], options, args.backend)
    load_before = os.getloadavg()[0]
    common = {
        "CAPTIONER_MALLOC_MMAP_THRESHOLD_MB": str(args.malloc_mmap_threshold_mb),
        "CAPTIONER_BACKEND": args.backend,
    }
    if args.encoder_chunk_size is not None:
        common["CAPTIONER_ENCODER_CHUNK_SIZE"] = str(args.encoder_chunk_size)
    batching = {"CAPTIONER_MAX_BATCH_SIZE": str(args.max_batch_size), "CAPTIONER_MAX_WAIT_MS": str(args.max_wait_ms)}
    envs = {"micro-batching": {**common, **batching}, "no batching": {**common, "CAPTIONER_MAX_BATCH_SIZE": "1"}}
    levels, bare_ms = bench_servers(envs, args, photos, params, bare) if args.concurrency else ([], [])
    bare_p50 = statistics.median(bare_ms) if bare_ms else statistics.median(bare.run(args.round_size * args.rounds))
    preprocess_ms = bare.preprocess_ms(32)

    print(
        f"\ncheckpoint: {args.checkpoint or DEFAULT_CHECKPOINT}   device: {args.device}   backend: {args.backend}   "
        f"method: {args.method}"
    )
    mb = args.malloc_mmap_threshold_mb
    print(f"malloc (bare and servers): {f'mmap threshold {mb} MiB, trim {2 * mb} MiB' if mb else 'glibc defaults'}")
    chunk = args.encoder_chunk_size or f"default ({default_chunk_size(args.device) or 'whole batch'})"
    print(f"encoder chunk size (servers): {chunk}")
    print(f"torch threads: {torch.get_num_threads()}   CPUs: {os.cpu_count()}   photos: {len(photos)} ({args.images})")
    header = (
        f"| {'setting':<28} | {'conc.':>5} | {'requests':>8} | {'p50 ms':>8} | {'p95 ms':>8} | {'req/s':>7} "
        f"| {'mean batch':>10} | {'model ms/batch':>14} | {'peak RSS MB':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, ms in (("bare model, 1 image", bare_p50), ("bare model + preprocessing", bare_p50 + preprocess_ms)):
        print(
            f"| {name:<28} | {1:>5} | {len(bare_ms):>8} | {ms:>8.1f} | {'':>8} | {1000.0 / ms:>7.1f} "
            f"| {1:>10} | {bare_p50:>14.1f} | {'':>11} |"
        )
    for level in levels:
        print(
            f"| {'server, ' + level.setting:<28} | {level.concurrency:>5} | {len(level.latencies_ms):>8} | "
            f"{level.percentile(50):>8.1f} | {level.percentile(95):>8.1f} | {level.throughput:>7.1f} | "
            f"{statistics.mean(level.batch_sizes):>10.2f} | {statistics.median(level.model_ms):>14.1f} | "
            f"{level.peak_rss_mb or float('nan'):>11.0f} |"
        )

    def find(setting: str, concurrency: int) -> Level | None:
        return next((lv for lv in levels if lv.setting == setting and lv.concurrency == concurrency), None)

    single, with8, without8 = find("micro-batching", 1), find("micro-batching", 8), find("no batching", 8)
    if single is not None:
        handler = statistics.median(single.handler_ms)
        print("\nwhere a request's time goes at concurrency 1 with micro-batching (server-side medians, ms):")
        decode, model = statistics.median(single.decode_ms), statistics.median(single.model_ms)
        print(
            f"  upload decoding {decode:.1f} | tensor + encoder + decoder {model:.1f} | rest of the handler "
            f"(upload parsing, thread hand-offs, response) {handler - decode - model:.1f} | "
            f"HTTP outside the handler {single.percentile(50) - handler:.1f}"
        )
    print(f"the servers (and at concurrency 1 the bare model) took turns: {args.rounds} rounds per level")
    if args.burst:
        print_burst(bench_burst(common, args, photos, params))
    print(f"1-minute load average: {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")

    print()
    if single is not None:
        ratio = single.percentile(50) / bare_p50
        verdict = "met" if ratio <= 1.15 else "NOT met"
        print(f"p50 at concurrency 1 / bare model time: {ratio:.2f}x   (goal <= 1.15x: {verdict})")
    if with8 is not None and without8 is not None:
        ratio = with8.throughput / without8.throughput
        verdict = "met" if ratio >= 1.3 else "NOT met"
        print(f"throughput at concurrency 8, batching / none: {ratio:.2f}x   (goal >= 1.3x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
