"""The real server under pressure: stalled uploads and the queue, JSON access logs, and SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service import images
from tests.service.server import Server, running_server

pytestmark = pytest.mark.slow  # real server processes, and waits for their grace periods

PNG = images.png(seed=11, width=160, height=120)


def _multipart(data: bytes) -> tuple[bytes, bytes]:
    """(headers, body) of ``POST /caption?method=greedy`` with ``data`` in field ``image``."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /caption?method=greedy HTTP/1.1\r\nHost: test\r\nX-Request-ID: slow-upload\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def _read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {reply!r}"
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += conn.recv(65536)
    return int(status_line.split()[1]), headers, body


def _start_upload(server: Server) -> tuple[socket.socket, bytes]:
    """A client that has sent its headers and half its body, then stalls: a request in progress."""
    address = urlsplit(server.url)
    conn = socket.create_connection((address.hostname, address.port), timeout=30)
    head, body = _multipart(PNG)
    conn.sendall(head + body[: len(body) // 2])
    return conn, body[len(body) // 2 :]


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _in_progress(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("captioner_requests_in_progress "):
            return float(line.split()[1])
    raise AssertionError("no captioner_requests_in_progress metric")


def test_an_upload_in_progress_takes_no_place_in_the_queue(tiny_checkpoint: Path) -> None:
    """CAPTIONER_MAX_QUEUE bounds requests whose upload is complete: a stalled upload (here the only place) does
    not make the server refuse others (the audit saw 256 stalled uploads take every place); its own limits are
    tests/service/test_hostile_clients.py's. Refusal from the headers is test_admission's."""
    env = {"CAPTIONER_MAX_QUEUE": "1", "CAPTIONER_ACCESS_LOG": "json"}
    with running_server(tiny_checkpoint, env) as server:
        slow, rest = _start_upload(server)
        _wait_until(lambda: _in_progress(server) == 1)
        address = urlsplit(server.url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as other:
            head, body = _multipart(PNG)
            other.sendall(head.replace(b"slow-upload", b"other-upload") + body)
            status, headers, _ = _read_response(other)
        assert status == 200 and headers["x-request-id"] == "other-upload"
        slow.sendall(rest)  # the stalled upload is still served when it goes on
        status, headers, body = _read_response(slow)
        slow.close()
        assert status == 200 and json.loads(body)["captions"] and headers["x-request-id"] == "slow-upload"
        server.process.send_signal(signal.SIGINT)
        server.process.wait(30)
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    caption_records = [r for r in records if r["path"] == "/caption"]
    assert [(r["status"], r["request_id"]) for r in caption_records] == [(200, "other-upload"), (200, "slow-upload")]
    assert not any('"POST /caption' in line for line in server.lines)  # no uvicorn text access line as well


def test_sigterm_drains_requests_in_progress_then_exits_0(tiny_checkpoint: Path) -> None:
    with running_server(tiny_checkpoint, {"CAPTIONER_SHUTDOWN_GRACE_S": "30"}) as server:
        slow, rest = _start_upload(server)
        _wait_until(lambda: _in_progress(server) == 1)
        server.process.send_signal(signal.SIGTERM)
        _wait_until(lambda: "Waiting for connections to close" in server.log)
        address = urlsplit(server.url)
        with pytest.raises(OSError):  # no longer listening: balancers and probes see it at once
            socket.create_connection((address.hostname, address.port), timeout=5).close()
        time.sleep(0.5)
        assert server.process.poll() is None  # still finishing the upload in progress
        slow.sendall(rest)
        status, _, body = _read_response(slow)
        slow.close()
        assert status == 200 and json.loads(body)["captions"]
        assert server.process.wait(30) == 0, server.log


def test_sigterm_gives_up_on_a_stalled_request_after_the_grace_period(tiny_checkpoint: Path) -> None:
    with running_server(tiny_checkpoint, {"CAPTIONER_SHUTDOWN_GRACE_S": "1"}) as server:
        slow, _ = _start_upload(server)  # never finishes
        _wait_until(lambda: _in_progress(server) == 1)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status, headers, body = _read_response(slow)  # answered, not dropped: a balancer retries elsewhere
        slow.close()
        assert status == 503 and json.loads(body)["error"]["code"] == "draining" and headers["retry-after"] == "1"
        assert server.process.wait(30) == 0, server.log
        assert time.monotonic() - started < 10
        assert "Traceback" not in server.log and "gave up on POST /caption" in server.log
