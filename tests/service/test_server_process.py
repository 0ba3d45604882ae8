"""The real server process: ``captioner-serve`` on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service import cli
from tests.service import images
from tests.service.server import ROOT, Server, running_server

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Server]:
    env = {"CAPTIONER_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "CAPTIONER_MAX_WAIT_MS": "1000"}
    with running_server(tiny_checkpoint, env) as running:
        yield running
    assert running.process.returncode == 130, running.log  # stopped by Ctrl-C (tests.service.server.stop)
    assert running.lines[-1] == "captioner-serve: interrupted\n" and "Traceback" not in running.log


def _upload_bytes() -> tuple[str, bytes]:
    photos = images.real_photos()
    if photos and photos[0].stat().st_size < MAX_UPLOAD:
        return photos[0].name, photos[0].read_bytes()
    return "pattern.png", images.png(seed=42, width=320, height=240)


@pytest.mark.slow
def test_endpoints_over_http(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready").json()
        assert ready["status"] == "ready"
        assert client.get("/model").json()["id"] == ready["model_id"]
        name, data = _upload_bytes()
        response = client.post("/caption", params={"attention": "true"}, files={"image": (name, data, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_id"] == ready["model_id"] and body["captions"][0]["attention"]
        bad = client.post("/caption", files={"image": ("x.jpg", b"%PDF-1.4 not really", "image/jpeg")})
        assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image_format"
        assert client.get("/health").status_code == 200
        assert 'captioner_requests_total{method="POST",route="/caption",status="200"}' in client.get("/metrics").text
        assert "captioner" in client.get("/").text


@pytest.mark.slow
def test_oversized_upload_is_refused_before_its_body_is_sent(server: Server) -> None:
    """Only the headers go out; the 413 comes back without the server waiting for 100 MB."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as conn:
        conn.sendall(
            b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


@pytest.mark.slow
def test_concurrent_requests_share_batches(server: Server) -> None:
    uploads = [images.png(seed=200 + i) for i in range(8)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/caption", params={"method": "greedy"}, files={"image": ("x.png", d)}) for d in uploads)
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["timing"]["batch_size"] for r in responses) > 1


def test_missing_checkpoint_fails_at_start_with_one_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """``captioner-serve`` itself (in this process, to save an interpreter start): a non-zero exit status
    and one error line instead of a traceback."""
    missing = tmp_path / "nowhere.pt"
    assert cli.main(["--port", "0", "--checkpoint", str(missing), "--log-level", "warning"]) != 0
    output = "".join(capfd.readouterr())
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "cannot load the model" in line]
    assert len(errors) == 1 and f"checkpoint not found: {missing}" in errors[0], output


def _bench_serving():
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_serving_benchmark_client_gets_the_same_answers_as_httpx(server: Server) -> None:
    """bench/serving.py times pre-encoded requests over its own keep-alive connections: they must be real requests."""
    bench = _bench_serving()
    uploads = [(f"{i}.png", images.png(seed=300 + i)) for i in range(3)]
    params = {"method": "greedy"}
    requests = [bench.encode_request(server.url, name, data, params) for name, data in uploads]

    async def send_all() -> list[tuple[int, bytes]]:
        connection = await bench.Connection.open(server.url)
        try:
            return [await connection.send(request) for request in requests + requests]  # one connection, kept alive
        finally:
            await connection.close()

    answers = asyncio.run(send_all())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        expected = [client.post("/caption", params=params, files={"image": u}).json()["captions"] for u in uploads]
    assert [status for status, _ in answers] == [200] * 6
    assert [json.loads(body)["captions"] for _, body in answers] == expected + expected

    level = asyncio.run(bench.drive(server.url, requests, 3, 7))
    assert len(level.latencies_ms) == len(level.model_ms) == len(level.batch_sizes) == 7
    assert level.seconds > 0 and all(ms > 0 for ms in level.latencies_ms)


@pytest.mark.slow
def test_serving_benchmark_runs_end_to_end(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Both servers side by side, taking turns with the bare model; the table and both verdicts print."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(images.encode(images.pattern(seed=400 + i), "JPEG"))
    bench = _bench_serving()
    argv = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--method", "greedy"]
    assert bench.main([*argv, "--concurrency", "1", "2", "--rounds", "2", "--round-size", "2", "--burst", "12"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]) for line in out.splitlines() if line.startswith("|")}
    for setting in ("server, micro-batching", "server, no batching"):
        assert {(setting, "1", "4"), (setting, "2", "16")} <= rows, out  # 2 rounds of 2 / of max(4 x 2, 2)
    assert "p50 at concurrency 1 / bare model time" in out and "where a request's time goes" in out
    assert "overload: a burst of 12 simultaneous uploads" in out
    burst_rows = [line for line in out.split("overload:")[1].splitlines() if line.startswith("|")][2:]
    assert sum(int(row.split("|")[2]) for row in burst_rows) == 12, out  # every request answered and counted
    assert "only 200 and 503: met" in out, out


@pytest.mark.slow
def test_upload_pressure_benchmark_runs_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Run as its usage says, ``python bench/upload_pressure.py``: a script, whose folder is first on sys.path
    so that it imports its sibling serving.py."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"{i}.jpg").write_bytes(images.encode(images.pattern(seed=500 + i), "JPEG"))
    argv = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--uploads", "3", "--upload-mb", "1"]
    argv += ["--slow", "4", "--requests", "4", "--rounds", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload_pressure.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "statuses 200: 3;" in out and "big uploads all 200: met" in out, out
    assert "| beside 4 slow uploads" in out and "p50 beside slow uploads / alone" in out
