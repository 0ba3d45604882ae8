"""Big and slow uploads against the real ``captioner-serve`` with its default settings.

Two measurements, one server (default settings: admission control, batch size, decode threads):

1. **Big uploads.** ``--uploads`` clients (default 24) each send a ~9 MB photo at the same time, for
   ``--rounds`` rounds: every answer's status and latency, and the server's peak resident memory
   (VmHWM) at the end. Goal: only 200s, peak RSS < 1.5 GB.
2. **Slow uploads.** Normal traffic (real photos at ``--concurrency`` 4) is timed alone and with
   ``--slow`` clients (default 64) holding connections open while trickling their bodies a few bytes
   at a time, in alternating rounds (alone, with, alone, with, ...), so both are timed in the same
   machine state. Goal: every normal request answered 200; p50 with slow clients <= 1.25 x alone.

3. **Clients that never finish** (the hardening audit's findings, now bounded): ``--stalled`` (300)
   connections send an upload's headers (Content-Length 5 MB) and nothing more while 20 normal
   requests are timed one after another (goal: all 200, each within 3 s); ``--unfinished`` (150)
   uploads send all but the last KiB of a 9.9 MB body and stop (goal: RSS sampled during the round stays
   under 1.5 GB); 5 endless header streams (goal: cut off, RSS grows < 100 MB), one 1 MB header and
   20,000 header fields (goal: 431 each).

Usage::

    python bench/upload_pressure.py                       # the bundled model, Flickr8k/COCO-mini photos
    python bench/upload_pressure.py --checkpoint tiny.pt --images DIR --uploads 4 --slow 8 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

from PIL import Image
from serving import DEFAULT_IMAGES, Server, drive, encode_request

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the service's default limit


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench/upload_pressure.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos")
    parser.add_argument("--uploads", type=int, default=24, help="simultaneous big uploads per round")
    parser.add_argument("--upload-mb", type=float, default=9.0, help="size of each big upload (JPEG)")
    parser.add_argument("--slow", type=int, default=64, help="clients trickling their bodies")
    parser.add_argument("--concurrency", type=int, default=4, help="normal clients beside the slow ones")
    parser.add_argument("--requests", type=int, default=24, help="normal requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stalled", type=int, default=300, help="connections that send headers and stop")
    parser.add_argument("--unfinished", type=int, default=150, help="9.9 MB uploads that stop 1 KiB short")
    return parser


def big_jpeg(photo: Path, megabytes: float) -> bytes:
    """The photo scaled up and saved as a JPEG of about ``megabytes`` (under the service's upload limit)."""
    target = min(int(megabytes * 1e6), MAX_UPLOAD_BYTES - 64 * 1024)
    image = Image.open(photo).convert("RGB")
    side = 2000
    while True:
        scale = side / min(image.size)
        big = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=100, subsampling=0)
        data = buffer.getvalue()
        if len(data) >= 0.9 * target or big.width * big.height > 35_000_000:
            break
        side = round(side * min(1.6, (target / len(data)) ** 0.5))
    for quality in (98, 95, 92, 90):  # too big: a little less quality is enough at this size
        if len(data) <= target:
            break
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=quality)
        data = buffer.getvalue()
    return data


async def one_request(url: str, request: bytes) -> tuple[int, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        return int(head.split()[1]), (time.perf_counter() - started) * 1000.0
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0, (time.perf_counter() - started) * 1000.0
    finally:
        writer.close()


async def big_round(url: str, request: bytes, uploads: int) -> list[tuple[int, float]]:
    return await asyncio.gather(*(one_request(url, request) for _ in range(uploads)))


async def with_slow_clients(url: str, normal: list[bytes], args: argparse.Namespace, slow_request: bytes):
    """Normal traffic while ``args.slow`` clients send ``slow_request`` a few bytes every 100 ms."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stop = asyncio.Event()

    async def trickle() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(0, len(slow_request), 16):
                if stop.is_set():
                    return
                writer.write(slow_request[i : i + 16])
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        finally:
            writer.close()

    slow = [asyncio.ensure_future(trickle()) for _ in range(args.slow)]
    await asyncio.sleep(0.5)  # every slow client is connected and mid-body
    try:
        return await drive(url, normal, args.concurrency, args.requests)
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _status_of(reader: asyncio.StreamReader) -> int:
    """The status of the response on ``reader``, or 0 when the connection ends without one."""
    try:
        return int((await reader.readuntil(b"\r\n\r\n")).split()[1])
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0


async def stalled_round(url: str, stalled: int, normal: bytes) -> tuple[list[int], list[float], list[int]]:
    """``stalled`` connections send upload headers and stop; 20 normal requests are sent one after another.
    Returns the normal statuses and latencies (ms), and what each stalled connection was answered (0: nothing)."""
    host = url.removeprefix("http://")
    head = (
        f"POST /caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 5000000\r\n\r\n"
    ).encode()
    connections = [await _open(url) for _ in range(stalled)]
    for _, writer in connections:
        writer.write(head)
    statuses, latencies = [], []
    for _ in range(20):
        status, ms = await one_request(url, normal)
        statuses.append(status)
        latencies.append(ms)
    answers = await asyncio.gather(*(asyncio.wait_for(_status_of(r), 60) for r, _ in connections))
    for _, writer in connections:
        writer.close()
    return statuses, latencies, list(answers)


async def unfinished_round(url: str, body: bytes, uploads: int, pid: int) -> tuple[float, list[int]]:
    """``uploads`` connections send all of ``body`` but its last KiB and stop; the most RSS seen meanwhile (MB)
    and what each was answered."""
    connections = [await _open(url) for _ in range(uploads)]
    peak = _rss_mb(pid)
    for _, writer in connections:
        writer.write(body[:-1024])
    waiting = asyncio.gather(*(asyncio.wait_for(_status_of(r), 120) for r, _ in connections))
    while not waiting.done():
        peak = max(peak, _rss_mb(pid))
        await asyncio.sleep(0.05)
    for _, writer in connections:
        writer.close()
    return peak, list(waiting.result())


async def header_round(url: str, pid: int) -> tuple[list[int], float, list[int]]:
    """5 endless header streams (bytes each got out before the server cut it), the RSS growth (MB) meanwhile,
    and the statuses of a 1 MB header and of 20,000 header fields."""
    host = url.removeprefix("http://")
    before = peak = _rss_mb(pid)

    async def endless() -> int:
        reader, writer = await _open(url)
        sent = 0
        try:
            writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())
            while sent < 200_000_000:
                writer.write(b"X-Endless: " + b"z" * 4000 + b"\r\n")
                sent += 4013
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
        return sent

    streams = asyncio.gather(*(endless() for _ in range(5)))
    while not streams.done():
        peak = max(peak, _rss_mb(pid))
        await asyncio.sleep(0.02)
    big = f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 1_000_000}\r\n\r\n".encode()
    many = (f"GET /health HTTP/1.1\r\nHost: {host}\r\n" + "X-H: v\r\n" * 20_000 + "\r\n").encode()
    statuses = []
    for request in (big, many):
        reader, writer = await _open(url)
        try:
            writer.write(request)
            await writer.drain()
        except ConnectionError:
            pass
        statuses.append(await _status_of(reader))
        writer.close()
    return streams.result(), peak - before, statuses


def _counts(statuses: list[int]) -> str:
    return ", ".join(f"{s or 'no answer'}: {statuses.count(s)}" for s in sorted(set(statuses)))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    photos = sorted(args.images.glob("*.jpg"))[:16]
    if not photos:
        raise SystemExit(f"no JPEG photos in {args.images} (pass --images DIR)")
    server = Server(args.checkpoint, "cpu", {}, None)
    try:
        url = server.wait_ready()
        big = big_jpeg(photos[0], args.upload_mb)
        big_request = encode_request(url, "big.jpg", big, {"method": "beam"})
        normal = [encode_request(url, p.name, p.read_bytes(), {"method": "beam"}) for p in photos]
        asyncio.run(drive(url, normal, args.concurrency, 8))  # warm-up

        big_results: list[tuple[int, float]] = []
        for _ in range(args.rounds):
            big_results += asyncio.run(big_round(url, big_request, args.uploads))
        peak_rss = server.peak_rss_mb()

        alone: list[float] = []
        beside_slow: list[float] = []
        for _ in range(args.rounds):
            alone += asyncio.run(drive(url, normal, args.concurrency, args.requests)).latencies_ms
            beside_slow += asyncio.run(with_slow_clients(url, normal, args, normal[0])).latencies_ms

        pid = server.server.process.pid
        stalled_statuses, stalled_ms, stalled_answers = asyncio.run(stalled_round(url, args.stalled, normal[0]))
        unfinished_body = encode_request(url, "big.jpg", big_jpeg(photos[0], 9.9), {})
        unfinished_rss, unfinished_answers = asyncio.run(unfinished_round(url, unfinished_body, args.unfinished, pid))
        endless_sent, endless_rss, header_statuses = asyncio.run(header_round(url, pid))
    finally:
        server.stop()

    statuses = [status for status, _ in big_results]
    big_ok = [ms for status, ms in big_results if status == 200]
    print(f"\nbig uploads: {args.uploads} at once x {args.rounds} rounds, {len(big) / 1e6:.1f} MB JPEG each")
    counts = ", ".join(f"{s or 'failed'}: {statuses.count(s)}" for s in sorted(set(statuses)))
    print(f"  statuses {counts}; latency p50 {statistics.median(big_ok or [float('nan')]):.0f} ms")
    print(f"  server peak RSS {peak_rss or float('nan'):.0f} MB")
    p50_alone, p50_slow = statistics.median(alone), statistics.median(beside_slow)
    print(f"\nnormal requests at concurrency {args.concurrency}, {args.rounds} rounds of {args.requests} each way:")
    print(f"| {'setting':<32} | {'requests':>8} | {'p50 ms':>7} | {'max ms':>7} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for name, times in (("alone", alone), (f"beside {args.slow} slow uploads", beside_slow)):
        print(f"| {name:<32} | {len(times):>8} | {statistics.median(times):>7.0f} | {max(times):>7.0f} |")
    ratio = p50_slow / p50_alone
    print("\nclients that never finish:")
    print(f"| {'round':<44} | {'result':<60} |")
    print(f"|{'-' * 46}|{'-' * 62}|")
    most_sent_kib = max(endless_sent) / 1024
    rows = [
        (f"{args.stalled} stalled uploads: 20 normal requests",
         f"{_counts(stalled_statuses)}; max {max(stalled_ms):.0f} ms"),
        (f"{args.stalled} stalled uploads: their answers", _counts(stalled_answers)),
        (f"{args.unfinished} unfinished 9.9 MB uploads: RSS", f"max {unfinished_rss:.0f} MB during the round"),
        (f"{args.unfinished} unfinished 9.9 MB uploads: answers", _counts(unfinished_answers)),
        ("5 endless header streams", f"cut off after {most_sent_kib:.0f} KiB at most; RSS +{endless_rss:.0f} MB"),
        ("1 MB header; 20,000 header fields", f"{header_statuses[0]}; {header_statuses[1]}"),
    ]  # fmt: skip
    for name, result in rows:
        print(f"| {name:<44} | {result:<60} |")
    goals = [
        ("big uploads all 200", set(statuses) == {200}),
        ("peak RSS < 1.5 GB", peak_rss is not None and peak_rss < 1536),
        ("slow uploads p50 ratio <= 1.25", ratio <= 1.25),
        ("beside stalled uploads all 200 within 3 s", set(stalled_statuses) == {200} and max(stalled_ms) < 3000),
        ("unfinished uploads RSS < 1.5 GB", unfinished_rss < 1536),
        ("endless headers cut off, RSS + < 100 MB", max(endless_sent) < 200_000_000 and endless_rss < 100),
        ("oversized headers 431", header_statuses == [431, 431]),
    ]
    print(f"\np50 beside slow uploads / alone: {ratio:.2f}x")
    print("goals: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
