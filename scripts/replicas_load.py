"""Helpers for scripts/replicas-smoke.sh: free ports, the nginx config, readiness, and the load run.

    python scripts/replicas_load.py free-ports N
    python scripts/replicas_load.py nginx-conf --template deploy/nginx/captioner.conf --listen PORT \
        --replica PORT --replica PORT [--user USER GROUP] --out FILE
    python scripts/replicas_load.py wait-ready URL [URL ...] [--pid PID ...] [--timeout S]
    python scripts/replicas_load.py load --url http://127.0.0.1:PORT --photos DIR [--duration S]
        [--concurrency N] [--kill-pid PID --kill-port PORT --kill-at FRACTION] [--access-log F] [--error-log F]

`load` posts real photos to POST /caption at a fixed concurrency for a fixed time, optionally SIGKILLs
one replica part of the way through, prints a table (with each replica's share and nginx's retries
from its access log, joined on X-Request-ID) and, as its last line, ``requests=N ok=N failed=N``.
A request is ok only on 200 with a caption in the JSON body. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
REPLICAS_BEGIN = "# --- replicas: begin ---"
REPLICAS_END = "# --- replicas: end ---"
LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+[^;\n]+;", re.MULTILINE)
SERVER_OPTIONS = re.compile(r"^\s*server\s+\S+(?P<options>[^;]*);", re.MULTILINE)
USER = re.compile(r"^#?[ \t]*user[ \t]+[^;\n]+;", re.MULTILINE)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def nginx_conf(template: str, listen: int, replicas: list[int], user: tuple[str, str] | None = None) -> str:
    """The template with its listen address and its replicas' server lines replaced (their options kept)."""
    if len(LISTEN.findall(template)) != 1:
        raise ValueError("the template must have exactly one `listen` line")
    begin, end = template.find(REPLICAS_BEGIN), template.find(REPLICAS_END)
    if begin < 0 or end < begin or template.count(REPLICAS_BEGIN) != 1:
        raise ValueError(f"the template must have one {REPLICAS_BEGIN!r} ... {REPLICAS_END!r} block")
    # one line per replica for each shape of server line (primary, backup), in the template's order
    shapes = list(dict.fromkeys(m.group("options") for m in SERVER_OPTIONS.finditer(template[begin:end])))
    if not shapes:
        raise ValueError("no `server` line between the replicas markers")
    indent = template[template.rfind("\n", 0, begin) + 1 : begin]
    servers = "".join(f"{indent}server 127.0.0.1:{port}{options};\n" for options in shapes for port in replicas)
    text = template[: begin + len(REPLICAS_BEGIN)] + "\n" + servers + indent + template[end:]
    text = LISTEN.sub(lambda m: f"{m.group('indent')}listen 127.0.0.1:{listen};", text)
    if user is not None:
        if len(USER.findall(text)) != 1:
            raise ValueError("the template must have one `user` line (commented or not)")
        text = USER.sub(f"user {user[0]} {user[1]};", text)
    return text


def wait_ready(urls: list[str], pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(urls)
    with httpx.Client(timeout=2.0) as client:
        while waiting:
            for pid in pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    sys.exit(f"replicas-smoke: process {pid} exited before it was ready")
            for url in list(waiting):
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        waiting.remove(url)
            if waiting and time.monotonic() > deadline:
                sys.exit(f"replicas-smoke: not ready after {timeout:.0f} s: {', '.join(waiting)}")
            if waiting:
                time.sleep(0.25)


def load_photos(folder: Path, limit: int, seed: int = 0) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not paths:
        sys.exit(f"replicas-smoke: no photos (.jpg, .jpeg, .png) in {folder}")
    random.Random(seed).shuffle(paths)
    return [(p.name, p.read_bytes()) for p in paths[:limit]]


@dataclass
class Result:
    request_id: str  # the last attempt's X-Request-ID
    start: float  # seconds since the load began
    latency: float  # from the first attempt's start to the last answer, Retry-After waits included
    status: str  # the last answer's HTTP status, or the client-side exception's name
    ok: bool
    refused: int = 0  # 503/429 answers that were retried after their Retry-After
    id_echoed: bool = True  # the answer carried exactly the X-Request-ID sent


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(value))) if value else 1.0
    except ValueError:  # an HTTP date: not sent by the service
        return 1.0


def _post(
    client: httpx.Client,
    url: str,
    photo: tuple[str, bytes],
    request_id: str,
    t0: float,
    retries: int = 0,
    max_wait: float = 5.0,
    stop: threading.Event | None = None,
) -> Result:
    """One caption request; a 503 or 429 is retried up to `retries` times after its Retry-After (at most
    `max_wait` seconds), as captioner.client does."""
    start = time.monotonic()
    refused = 0
    for attempt in range(retries + 1):
        rid = f"{request_id}.{attempt}"
        try:
            response = client.post(
                url, files={"image": (photo[0], photo[1], "image/jpeg")}, headers={"X-Request-ID": rid}
            )
        except httpx.HTTPError as exc:
            return Result(rid, start - t0, time.monotonic() - start, type(exc).__name__, False, refused)
        if response.status_code in (429, 503) and attempt < retries:
            refused += 1
            wait = _retry_after(response.headers.get("Retry-After"), max_wait)
            if stop is not None and stop.wait(wait):
                break
            if stop is None:
                time.sleep(wait)
            continue
        break
    latency = time.monotonic() - start
    ok = False
    status = str(response.status_code)
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, AttributeError):
        body = response.json()
        if response.status_code == 200:
            ok = bool(body["captions"][0]["text"].strip())
        else:  # the JSON error's code tells a replica's 503 (overloaded, draining) from nginx's (unavailable)
            status += f" {body['error']['code']}"
    echoed = response.headers.get_list("X-Request-ID") == [rid]
    return Result(rid, start - t0, latency, status, ok, refused, echoed)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


ACCESS = re.compile(r'"POST /caption[^"]*" status=(\d+) .*?rid=(\S+) upstream="([^"]*)" ustatus="([^"]*)"')


def _read_access_log(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """request id -> (the replicas it went to, their statuses), from the captioner log format."""
    by_id: dict[str, tuple[list[str], list[str]]] = {}
    if not path.is_file():
        return by_id
    for line in path.read_text(errors="replace").splitlines():
        m = ACCESS.search(line)
        if m:
            split = [part.strip() for part in re.split(r"[,:]\s", m.group(3)) if part.strip()]
            statuses = [part.strip() for part in re.split(r"[,:]\s", m.group(4)) if part.strip()]
            by_id[m.group(2)] = (split, statuses)
    return by_id


ERROR_LINE = re.compile(r"\[(?P<level>\w+)\] \d+#\d+: \*\d+ (?P<what>[^,]+?)(?: while (?P<while>[^,]+))?,")


def _summarise_error_log(path: Path) -> list[tuple[int, str]]:
    counts: collections.Counter[str] = collections.Counter()
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            m = ERROR_LINE.search(line)
            if m:
                what = m.group("what") + (f" while {m.group('while')}" if m.group("while") else "")
                counts[f"[{m.group('level')}] {what}"] += 1
    return [(n, what) for what, n in counts.most_common(6)]


def run_load(args: argparse.Namespace) -> int:
    photos = load_photos(Path(args.photos), args.max_photos)
    url = args.url.rstrip("/") + "/caption"
    results: list[Result] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**12))
    killed: list[float] = []
    t0 = time.monotonic()
    deadline = t0 + args.duration

    def worker(client: httpx.Client) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                n = next(counter)
            result = _post(
                client, url, photos[n % len(photos)], f"smoke-{os.getpid()}-{n}", t0, args.client_retries, 5.0, stop
            )
            with lock:
                results.append(result)

    def killer() -> None:
        if stop.wait(args.kill_at * args.duration):
            return
        os.kill(args.kill_pid, signal.SIGKILL)
        killed.append(time.monotonic() - t0)
        print(f"killed replica on port {args.kill_port} (pid {args.kill_pid}) at t={killed[0]:.1f}s", flush=True)

    print(
        f"load: {args.concurrency} concurrent POST /caption for {args.duration:g} s through {args.url}, "
        f"{len(photos)} photos from {args.photos}",
        flush=True,
    )
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(timeout=args.timeout, limits=limits) as client:
        threads = [threading.Thread(target=worker, args=(client,), daemon=True) for _ in range(args.concurrency)]
        if args.kill_pid:
            threads.append(threading.Thread(target=killer, daemon=True))
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            stop.set()
            print("replicas-smoke: interrupted", file=sys.stderr)
            return 130
    elapsed = time.monotonic() - t0

    ok = sum(r.ok for r in results)
    failed = len(results) - ok
    latencies = [r.latency * 1000 for r in results] or [0.0]
    statuses = collections.Counter(r.status for r in results)
    rows: list[tuple[str, str]] = [
        ("requests", str(len(results))),
        ("ok", str(ok)),
        ("failed", str(failed)),
        ("throughput", f"{len(results) / elapsed:.1f} req/s over {elapsed:.1f} s"),
        ("latency p50", f"{_percentile(latencies, 50):.0f} ms"),
        ("latency p99", f"{_percentile(latencies, 99):.0f} ms"),
        ("latency max", f"{max(latencies):.0f} ms"),
    ]
    rows += [(f"status {status}", str(n)) for status, n in sorted(statuses.items())]
    refused = sum(r.refused for r in results)
    if args.client_retries:
        rows.append(
            ("503/429 retried by client", f"{refused} (after Retry-After, up to {args.client_retries} per request)")
        )
    not_echoed = sum(not r.id_echoed for r in results if r.status[:1].isdigit())
    rows.append(("X-Request-ID echoed", "all" if not not_echoed else f"{not_echoed} answers without it, or another"))
    not_ok_200 = sum(1 for r in results if r.status == "200" and not r.ok)
    if not_ok_200:
        rows.append(("200 without caption", str(not_ok_200)))

    if args.access_log:
        logged = _read_access_log(Path(args.access_log))
        kill_t = killed[0] if killed else float("inf")
        share: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])  # before, after the kill
        retried = []
        unlogged = 0
        for r in results:
            entry = logged.get(r.request_id)
            if entry is None:
                unlogged += 1
                continue
            addrs, ustatuses = entry
            if addrs:
                last = addrs[-1] if ":" in addrs[-1] else "(no live upstreams)"
                share[last][r.start >= kill_t] += 1
            if len(addrs) > 1:
                retried.append(", ".join(f"{a} {s}" for a, s in zip(addrs, ustatuses, strict=False)))
        total = sum(sum(v) for v in share.values()) or 1
        for addr in sorted(share):
            before, after = share[addr]
            rows.append(
                (
                    f"answered by {addr}",
                    f"{before + after} ({100 * (before + after) / total:.0f}%)"
                    + (f": {before} before the kill, {after} after" if killed else ""),
                )
            )
        rows.append(("retried by nginx", str(len(retried))))
        rows += [("  e.g.", example) for example in retried[:3]]
        if unlogged:
            rows.append(("not in access log", str(unlogged)))
    if args.error_log:
        rows += [(f"nginx error log ×{n}", what) for n, what in _summarise_error_log(Path(args.error_log))]

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.kill_pid and not killed:
        print("replicas-smoke: the replica was never killed (the run ended first)", file=sys.stderr)
        failed = failed or 1
    print(f"requests={len(results)} ok={ok} failed={len(results) - ok}", flush=True)
    return 1 if failed or not results else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("free-ports", help="print N free loopback ports")
    p.add_argument("count", type=int)

    p = sub.add_parser("nginx-conf", help="write the nginx config for these ports")
    p.add_argument("--template", required=True, type=Path)
    p.add_argument("--listen", required=True, type=int)
    p.add_argument("--replica", required=True, type=int, action="append", help="a replica's port (repeat)")
    p.add_argument("--user", nargs=2, metavar=("USER", "GROUP"), help="set nginx's `user` (when run as root)")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("wait-ready", help="wait until every URL answers 200")
    p.add_argument("urls", nargs="+")
    p.add_argument("--pid", type=int, action="append", default=[], help="fail if this process exits (repeat)")
    p.add_argument("--timeout", type=float, default=180.0)

    p = sub.add_parser("load", help="drive POST /caption load and print the table")
    p.add_argument("--url", required=True, help="the balancer's base URL")
    p.add_argument("--photos", required=True, help="a folder of photos")
    p.add_argument("--max-photos", type=int, default=200, help="photos read into memory and cycled (default 200)")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout in seconds")
    p.add_argument(
        "--client-retries",
        type=int,
        default=0,
        help="retry a 503/429 this many times after its Retry-After (at most 5 s), as captioner.client does; the "
        "last answer decides ok (default 0: a 503 fails the request)",
    )
    p.add_argument("--kill-pid", type=int, help="SIGKILL this process part of the way through")
    p.add_argument("--kill-port", type=int, help="its port, for the message")
    p.add_argument("--kill-at", type=float, default=1 / 3, help="when, as a fraction of --duration (default 1/3)")
    p.add_argument("--access-log", help="nginx's access log (captioner log format), for the per-replica share")
    p.add_argument("--error-log", help="nginx's error log, summarised")

    args = parser.parse_args(argv)
    if args.command == "free-ports":
        print(" ".join(map(str, free_ports(args.count))))
    elif args.command == "nginx-conf":
        text = nginx_conf(args.template.read_text(), args.listen, args.replica, tuple(args.user) if args.user else None)
        args.out.write_text(text)
    elif args.command == "wait-ready":
        wait_ready(args.urls, args.pid, args.timeout)
    else:
        return run_load(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
