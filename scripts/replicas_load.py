"""Helpers for scripts/replicas-smoke.sh: free ports, the nginx config, readiness, and the load run.

    python scripts/replicas_load.py free-ports N
    python scripts/replicas_load.py nginx-conf --template deploy/nginx/captioner.conf --listen PORT \
        --replica PORT --replica PORT [--user USER GROUP] --out FILE
    python scripts/replicas_load.py wait-ready URL [URL ...] [--pid PID ...] [--timeout S]
    python scripts/replicas_load.py limits --url http://127.0.0.1:PORT --conf NGINX_CONF
    python scripts/replicas_load.py load --url http://127.0.0.1:PORT --photos DIR [--duration S]
        [--concurrency N] [--kill-pid PID --kill-port PORT --kill-at FRACTION] [--access-log F] [--error-log F]
        [--replica-log F ...]

`limits` checks nginx's own limits with the numbers read from the config: a request with a large but
allowed header passes; an oversized header, a malformed request and an oversized body get the service's
JSON error shape; a burst over the rate from one address gets 429 JSON with Retry-After and passes again
after that wait; one connection over the per-address limit gets 429 JSON. Last line ``limits: ok``, or
exit status 1.

`load` posts real photos to POST /caption at a fixed concurrency for a fixed time, optionally SIGKILLs
one replica part of the way through, prints a table (with each replica's share and nginx's retries
from its access log, joined on X-Request-ID) and, as its last line, ``requests=N ok=N failed=N``.
A request is ok only on 200 with a caption in the JSON body. Exit status 1 when any request failed.
Each worker connects from its own loopback address (127.1.x.y), as that many clients would, so nginx's
per-address limits see them as separate clients; with the replicas' JSON access logs (--replica-log), it
checks that the replicas logged those addresses, not nginx's, as the clients (CAPTIONER_TRUSTED_PROXIES).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
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


def client_address(index: int) -> str:
    """The loopback address load worker ``index`` connects from (Linux routes all of 127.0.0.0/8 to lo)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


# --- nginx's own limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NginxLimits:
    rate: int  # requests per second from one address (limit_req_zone ... rate=Nr/s)
    burst: int  # requests over the rate let through at once (limit_req ... burst=N)
    connections: int  # requests in progress from one address (limit_conn)
    header_line: int  # bytes: the largest header line (large_client_header_buffers N SIZE)
    body: int  # bytes: client_max_body_size


def _size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", text).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": 1024**2}[unit.lower()]


def read_limits(conf: str) -> NginxLimits:
    """The limits the config sets (each directive once, outside comments)."""
    text = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    patterns = {
        "rate": r"limit_req_zone\s+\S+\s+zone=\S+\s+rate=(\d+)r/s;",
        "burst": r"limit_req\s+zone=\S+\s+burst=(\d+)\b",
        "connections": r"limit_conn\s+\S+\s+(\d+);",
        "header_line": r"large_client_header_buffers\s+\d+\s+(\w+);",
        "body": r"client_max_body_size\s+(\w+);",
    }
    values = {}
    for name, pattern in patterns.items():
        found = re.findall(pattern, text)
        if len(found) != 1:
            raise ValueError(f"the nginx config must set {pattern!r} exactly once (found {len(found)})")
        values[name] = _size(found[0])
    return NginxLimits(**values)


def _raw_request(port: int, data: bytes, source: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (what httpx would refuse to send) and read one answer: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as conn:
        conn.sendall(data)
        return _read_answer(conn)


def _read_answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = conn.recv(65536)
        if not chunk:
            break
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _json_error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> str | None:
    """None when the answer is ``expected`` with the service's JSON error ``code``; else what is wrong."""
    if status != expected:
        return f"status {status}, expected {expected}: {body[:120]!r}"
    if not headers.get("content-type", "").startswith("application/json"):
        return f"Content-Type {headers.get('content-type')!r}, not JSON: {body[:120]!r}"
    try:
        got = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"not the service's error shape: {body[:120]!r}"
    return None if got == code else f"error code {got!r}, expected {code!r}"


def check_limits(url: str, limits: NginxLimits) -> int:
    """Each of nginx's limits, from its own loopback address (127.2.0.x), so that no check uses up
    another's (or the load's) per-address budget. Prints a line per check; 0 when all hold."""
    port = int(url.rsplit(":", 1)[1].rstrip("/"))
    results: list[tuple[str, str | None, str]] = []  # (check, problem or None, what was seen)

    def client(source: str) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=source))

    with client("127.2.0.1") as http:
        padding = {"X-Padding": "p" * (limits.header_line // 2)}
        answer = http.get("/health", headers=padding)
        ok = None if answer.status_code == 200 else f"status {answer.status_code}: {answer.text[:120]!r}"
        results.append((f"a {limits.header_line // 2}-byte header", ok, str(answer.status_code)))
        answer = http.get("/health", headers={"X-Padding": "p" * (limits.header_line + 1)})
        problem = _json_error(answer.status_code, dict(answer.headers), answer.content, 431, "header_too_large")
        results.append((f"a {limits.header_line + 1}-byte header", problem, f"{answer.status_code} JSON"))

    bad_length = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"
    problem = _json_error(*_raw_request(port, bad_length, "127.2.0.2"), 400, "bad_request")
    results.append(("a malformed request", problem, "400 JSON"))
    garbled = b"NOT HTTP AT ALL\r\n\r\n"
    problem = _json_error(*_raw_request(port, garbled, "127.2.0.2"), 400, "bad_request")
    results.append(("a garbled request line", problem, "400 JSON"))
    big = f"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: {limits.body + 1}\r\n\r\n".encode()
    problem = _json_error(*_raw_request(port, big, "127.2.0.2"), 413, "payload_too_large")
    results.append((f"a {limits.body + 1}-byte body (headers only)", problem, "413 JSON"))

    # a burst: one request after another from one address, far faster than the rate, until nginx refuses
    with client("127.2.0.3") as http:
        passed, refused = 0, None
        for _ in range(20 * (limits.burst + 1)):
            answer = http.get("/health")
            if answer.status_code != 200:
                refused = answer
                break
            passed += 1
        if refused is None:
            results.append(("a burst from one address", f"{passed} requests passed, none refused", ""))
        else:
            problem = _json_error(refused.status_code, dict(refused.headers), refused.content, 429, "rate_limited")
            retry_after = refused.headers.get("Retry-After", "")
            if problem is None and not retry_after.isdigit():
                problem = f"Retry-After {retry_after!r}, not a number of seconds"
            if problem is None and passed < limits.burst:
                problem = f"refused after {passed} requests, within the burst of {limits.burst}"
            seen = f"{passed} passed, then 429 JSON, Retry-After: {retry_after}"
            if problem is None:
                time.sleep(float(retry_after))
                again = http.get("/health")
                seen += f"; after the wait: {again.status_code}"
                if again.status_code != 200:
                    problem = f"still refused after Retry-After: {again.status_code}"
            results.append(("a burst from one address", problem, seen))

    # connections: requests whose headers nginx has read count until they end; these wait for a body
    held: list[socket.socket] = []
    try:
        head = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100\r\n\r\n"
        for _ in range(limits.connections):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.2.0.4", 0))
            held.append(conn)
            conn.sendall(head)
        time.sleep(0.5)  # nginx has read every one of their headers
        status, headers, body = _raw_request(port, head, "127.2.0.4")
        problem = _json_error(status, headers, body, 429, "rate_limited")
        if problem is None and "retry-after" not in headers:
            problem = "no Retry-After"
        for conn in held:
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                if conn.recv(1):
                    problem = problem or "a held request was answered before its body was sent"
        results.append((f"request {limits.connections + 1} in progress from one address", problem, f"{status} JSON"))
    finally:
        for conn in held:
            conn.close()

    width = max(len(name) for name, _, _ in results)
    for name, problem, seen in results:
        print(f"  {name:<{width}}  {seen if problem is None else 'FAILED: ' + problem}")
    failed = [name for name, problem, _ in results if problem is not None]
    print("limits: ok" if not failed else f"limits: {len(failed)} failed", flush=True)
    return 1 if failed else 0


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


def _read_json_records(paths: list[Path]) -> list[dict]:
    """The JSON access-log records (CAPTIONER_ACCESS_LOG=json) among the lines of the replicas' logs."""
    records = []
    for path in paths:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))
    return records


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

    def worker(index: int) -> None:
        transport = httpx.HTTPTransport(local_address=client_address(index))
        with httpx.Client(timeout=args.timeout, transport=transport) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    n = next(counter)
                rid = f"smoke-{os.getpid()}-{n}"
                result = _post(client, url, photos[n % len(photos)], rid, t0, args.client_retries, 5.0, stop)
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
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
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
    wrong_clients = 0
    logged_requests = 0
    if args.replica_log:
        sent = {r.request_id for r in results}
        ours = {client_address(i) for i in range(args.concurrency)}
        logged = collections.Counter(
            record["client"].rsplit(":", 1)[0]
            for record in _read_json_records([Path(f) for f in args.replica_log])
            if record.get("request_id") in sent and record.get("client")
        )
        wrong_clients = sum(n for host, n in logged.items() if host not in ours)
        logged_requests = sum(logged.values())
        seen = f"{len(set(logged) & ours)} of the load's {len(ours)} addresses ({sum(logged.values())} requests)"
        if wrong_clients:
            seen += f"; {wrong_clients} logged as another client: {sorted(set(logged) - ours)[:3]}"
        rows.append(("clients in the replicas' logs", seen))

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if wrong_clients or (args.replica_log and not logged_requests):
        print("replicas-smoke: the replicas did not log the load's addresses as its clients", file=sys.stderr)
        failed = failed or 1
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

    p = sub.add_parser("limits", help="check nginx's own limits and JSON errors")
    p.add_argument("--url", required=True, help="the balancer's base URL (http://127.0.0.1:PORT)")
    p.add_argument("--conf", required=True, type=Path, help="the nginx config it runs, for the limits")

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
    p.add_argument(
        "--replica-log",
        action="append",
        default=[],
        help="a replica's output with its JSON access log (repeat): check that it logged the load's addresses as "
        "the clients, not nginx's",
    )

    args = parser.parse_args(argv)
    if args.command == "free-ports":
        print(" ".join(map(str, free_ports(args.count))))
    elif args.command == "nginx-conf":
        text = nginx_conf(args.template.read_text(), args.listen, args.replica, tuple(args.user) if args.user else None)
        args.out.write_text(text)
    elif args.command == "wait-ready":
        wait_ready(args.urls, args.pid, args.timeout)
    elif args.command == "limits":
        return check_limits(args.url, read_limits(args.conf.read_text()))
    else:
        return run_load(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
