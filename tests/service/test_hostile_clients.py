"""Clients that never finish: stalled or endless headers, stalled or trickling bodies, uploads that hold memory.

Against the real ``captioner-serve`` process (its HTTP protocol is part of what is tested), with the time
limits shortened so that each rule shows within seconds; raw sockets, so that a request can stop anywhere.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service import images
from tests.service.server import Server, running_server

pytestmark = pytest.mark.slow  # one server process, started for these tests (~20-60 s with its first ONNX export)

HEADER_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 3.0
SLOW_AFTER_S = 0.5
MAX_SLOW = 3
UPLOAD_MEMORY_MB = 2
CAPTION_503 = 'captioner_requests_total{method="POST",route="/caption",status="503"}'
SETTINGS = {
    "CAPTIONER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "CAPTIONER_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    "CAPTIONER_SLOW_UPLOAD_AFTER_S": str(SLOW_AFTER_S),
    "CAPTIONER_MAX_SLOW_UPLOADS": str(MAX_SLOW),
    "CAPTIONER_MAX_UPLOAD_MEMORY_MB": str(UPLOAD_MEMORY_MB),
    "CAPTIONER_MAX_HEADER_COUNT": "50",
    "CAPTIONER_MAX_CONNECTIONS": "350",
    "CAPTIONER_MAX_WAIT_MS": "1",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Server]:
    with running_server(tiny_checkpoint, SETTINGS) as running:
        yield running
    assert "Traceback" not in running.log, running.log


@pytest.fixture(autouse=True)
def _no_upload_left(server: Server) -> Iterator[None]:
    """Each test starts and ends with no upload in progress, so the shared slots and memory are free."""
    _wait_for(lambda: _metric(server, "captioner_uploads_in_progress") == 0, "uploads still in progress")
    yield
    _wait_for(lambda: _metric(server, "captioner_uploads_in_progress") == 0, "uploads still in progress")


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.05)


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None and "{" in name:
        return 0.0  # a labelled counter appears at its first count
    assert match, f"no metric {name}"
    return float(match.group(1))


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The status, headers and JSON body of the one response on ``sock``, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def _upload_head(server: Server, content_length: int) -> bytes:
    host = server.url.removeprefix("http://")
    return (
        f"POST /caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()


def _part_head() -> bytes:
    return b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'


def _caption(server: Server) -> httpx.Response:
    data = images.png(seed=1, width=64, height=48)
    return httpx.post(f"{server.url}/caption", files={"image": ("x.png", data, "image/png")}, timeout=30)


# --- headers ----------------------------------------------------------------------------------------


def test_headers_that_never_arrive_get_a_json_408_and_the_connection_closes(server: Server) -> None:
    for sent in (b"", b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Le"):
        with _connect(server) as sock:
            sock.sendall(sent)
            started = time.monotonic()
            status, headers, body = _read_response(sock)  # returns only because the server closed it
            waited = time.monotonic() - started
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert waited >= HEADER_TIMEOUT_S * 0.9


def test_a_keep_alive_connection_that_starts_a_second_request_and_stalls_is_closed(server: Server) -> None:
    host = server.url.removeprefix("http://")
    with _connect(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /heal")  # a byte of the next request cancels uvicorn's keep-alive timeout
        status, _, body = _read_response(sock)
    assert status == 408 and "headers did not arrive" in body["error"]["message"]


def test_headers_over_the_size_or_count_limit_get_a_json_431(server: Server) -> None:
    host = server.url.removeprefix("http://")
    big = f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 20_000}\r\n\r\n"
    many = f"GET /health HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"X-{i}: v\r\n" for i in range(60)) + "\r\n"
    for request, limit in ((big, "limit of 16,384 bytes"), (many, "the limit is 50")):
        with _connect(server) as sock:
            sock.sendall(request.encode())
            status, _, body = _read_response(sock)
        assert status == 431 and body["error"]["code"] == "headers_too_large", body
        assert limit in body["error"]["message"]


def test_connections_over_the_limit_get_a_json_503_at_once(server: Server) -> None:
    sockets = [_connect(server) for _ in range(360)]  # within the 1 s header deadline of the first
    try:
        answers = [_read_response(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    refused = [body for status, _, body in answers if status == 503]
    assert len(refused) == 10 and "350 connections open" in refused[0]["error"]["message"], answers[-1]
    assert {status for status, _, _ in answers} == {408, 503}  # the others: no headers in time


def _stream_headers_until_refused(server: Server, sent: list[int]) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        total = 0
        try:
            while total < 50_000_000:
                sock.sendall(b"X-Endless: " + b"z" * 1000 + b"\r\n")
                total += 1013
        except OSError:  # the server answered 431 and closed the connection
            pass
        sent.append(total)


def test_endless_header_streams_are_cut_off_without_holding_memory(server: Server) -> None:
    rss_before = _rss_bytes(server)
    sent: list[int] = []
    threads = [threading.Thread(target=_stream_headers_until_refused, args=(server, sent)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(sent) == 5
    # the server buffers at most 16 KiB of headers; what else got out went into the kernel's socket buffers
    assert max(sent) < 5_000_000, sent
    assert _rss_bytes(server) - rss_before < 100 * 2**20  # the audit saw +0.5 GB with httptools


def _rss_bytes(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


# --- bodies -----------------------------------------------------------------------------------------


def test_a_stalled_body_gets_a_json_408(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(_upload_head(server, 5_000_000) + _part_head() + b"\xff" * 1000)
        started = time.monotonic()
        status, headers, body = _read_response(sock)
        waited = time.monotonic() - started
    # nothing sent for the idle timeout, which is also when the rate rule starts: either may say so first
    message = body["error"]["message"]
    assert status == 408 and ("sent nothing for 3 s" in message or "the upload is too slow" in message), body
    assert headers["connection"] == "close" and waited >= IDLE_TIMEOUT_S * 0.9


def test_a_body_trickling_below_the_minimum_rate_gets_a_json_408(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(_upload_head(server, 5_000_000) + _part_head())
        sock.settimeout(0.2)
        data = b""
        while not data:  # 10 bytes every 0.2 s: never idle, far below 32 KiB/s
            sock.sendall(b"\xff" * 10)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"the upload is too slow" in data


def test_slow_uploads_compete_only_with_each_other(server: Server) -> None:
    """Six stalled uploads: after SLOW_AFTER_S three hold the slow slots and three are refused (503, closed);
    /ready says the slots are taken, and a normal request is still served."""
    sockets = [_connect(server) for _ in range(2 * MAX_SLOW)]
    try:
        for sock in sockets:
            sock.sendall(_upload_head(server, 5_000_000) + _part_head() + b"\xff" * 100)
        time.sleep(SLOW_AFTER_S + 1.0)  # past the slow mark, well before the idle timeout
        refused = []
        for sock in sockets:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                refused.append(sock.recv(65536))
        assert len(refused) == MAX_SLOW, refused
        assert all(r.startswith(b"HTTP/1.1 503") and b"too many slow uploads" in r for r in refused), refused
        assert _metric(server, "captioner_slow_uploads") == MAX_SLOW
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 200 and "slots for slow uploads are taken" in ready.json()["uploads_saturated"]
        assert _caption(server).status_code == 200
    finally:
        for sock in sockets:
            sock.close()


def test_stalled_uploads_by_the_hundred_do_not_starve_normal_requests(server: Server) -> None:
    """The audit's 300 connections that send headers and then nothing held every request slot (normal requests
    got 503); now they hold nothing, and all but MAX_SLOW are dropped after SLOW_AFTER_S."""
    sockets = []
    try:
        for _ in range(300):
            sock = _connect(server)
            sock.sendall(_upload_head(server, 5_000_000))
            sockets.append(sock)
        statuses = [_caption(server).status_code for _ in range(20)]
        assert statuses == [200] * 20
        _wait_for(lambda: _metric(server, "captioner_uploads_in_progress") <= MAX_SLOW, "stalled uploads dropped")
    finally:
        for sock in sockets:
            sock.close()


def test_memory_held_by_uploads_is_bounded_and_reported(server: Server) -> None:
    """Uploads that send most of a big body and stop: what they hold stays under the upload memory limit; when
    it is nearly all taken /ready answers 503 and a new upload is refused; it all comes back when they time out."""
    limit = UPLOAD_MEMORY_MB * 2**20
    sockets = [_connect(server) for _ in range(3)]
    try:
        for sock in sockets[:2]:  # 2 x 0.95 MiB: 95 % of the limit
            sock.sendall(_upload_head(server, 1_100_000) + _part_head() + b"\xff" * (limit * 95 // 200))
        _wait_for(lambda: _metric(server, "captioner_upload_bytes_held") >= 0.9 * limit, "uploads held")
        refused_before = _metric(server, CAPTION_503)
        sockets[2].sendall(_upload_head(server, 1_100_000) + _part_head() + b"\xff" * 500_000)
        try:
            status, headers, body = _read_response(sockets[2])
            assert status == 503 and "MiB of uploads, its limit" in body["error"]["message"], body
            assert int(headers["retry-after"]) >= 1
        except ConnectionResetError:
            pass  # closed with some of the body unread: the kernel may reset the connection before the 503 is read
        _wait_for(lambda: _metric(server, CAPTION_503) == refused_before + 1, "the third upload refused")
        assert _metric(server, "captioner_upload_bytes_held") <= limit
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "saturated"
        for sock in sockets[:2]:
            assert _read_response(sock)[0] == 408  # nothing more sent: the idle timeout
        assert _metric(server, "captioner_upload_bytes_held") == 0
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        assert _caption(server).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
