"""Admission control, draining, faults and request ids, through the app (TestClient) and as units."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.admission import AdmissionControl, ModelTimeEstimator
from service.app import create_app
from service.settings import Settings
from tests.service import images

PNG = images.png(seed=3)


def _post(client: TestClient, **headers: str):
    return client.post("/caption?method=greedy", files={"image": ("p.png", PNG, "image/png")}, headers=headers)


def _metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_start!r}")


@pytest.fixture
def make_client(tiny_checkpoint: Path) -> Iterator:
    """A fresh app per test (these tests change its state), with the given settings."""
    clients: list[TestClient] = []

    def make(**settings) -> TestClient:
        client = TestClient(create_app(Settings(checkpoint=tiny_checkpoint, **settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# --- the estimate and the decision --------------------------------------------------------------


def test_estimator_is_model_seconds_per_request_weighted_towards_recent_batches() -> None:
    estimator = ModelTimeEstimator(decay=0.5)
    assert estimator.seconds_per_request is None and estimator.wait_s(100) == 0.0
    estimator.observe(1, 0.1)
    assert estimator.seconds_per_request == pytest.approx(0.1)
    estimator.observe(16, 0.8)  # a full batch: 50 ms per request
    assert estimator.seconds_per_request == pytest.approx((0.5 * 0.1 + 0.8) / (0.5 * 1 + 16))
    for _ in range(40):
        estimator.observe(16, 0.8)
    assert estimator.seconds_per_request == pytest.approx(0.05, rel=1e-6)
    assert estimator.wait_s(100) == pytest.approx(5.0, rel=1e-6)


def test_admission_refuses_over_the_budget_or_the_cap_with_a_retry_time() -> None:
    estimator = ModelTimeEstimator()
    estimator.observe(10, 0.5)  # 50 ms per request
    control = AdmissionControl(estimator, budget_s=5.0, max_queue=256)
    assert control.refuse(100) is None  # 5.0 s: at the budget, admitted
    over = control.refuse(130)  # 6.5 s
    assert over is not None and over.reason == "over_budget" and over.retry_after_s == 2
    assert "estimated wait 6.5 s" in over.message and "budget is 5 s" in over.message
    assert control.refuse(130, check_cap=False) == over  # after the upload: the same estimate, no cap
    full = AdmissionControl(estimator, budget_s=1000.0, max_queue=8).refuse(8)
    assert full is not None and full.reason == "queue_full" and full.retry_after_s >= 1
    assert AdmissionControl(estimator, budget_s=1000.0, max_queue=8).refuse(7) is None
    assert AdmissionControl(estimator, budget_s=1000.0, max_queue=8).refuse(8, check_cap=False) is None


# --- the app ------------------------------------------------------------------------------------


def _crowd(client: TestClient, requests: int, seconds_per_request: float, *, uploading: int = 0) -> None:
    """Pretend ``requests`` are uploaded and waiting for the model, each costing ``seconds_per_request``,
    and ``uploading`` more are still arriving."""
    state = client.app.state
    state.admission.estimator = ModelTimeEstimator()
    state.admission.estimator.observe(1, seconds_per_request)
    state.batcher._decoding = requests
    state.batcher._incoming = requests + uploading


def test_overloaded_server_answers_503_with_retry_after_and_counts_it(make_client) -> None:
    client = make_client(admission_budget_s=5.0)
    assert _post(client).status_code == 200
    _crowd(client, 20, 1.0)  # 20 s of work ahead
    response = _post(client)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert "estimated wait 20.0 s" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "15"
    assert _metric(client, 'captioner_refused_total{reason="over_budget"}') == 1
    assert _metric(client, "captioner_requests_in_progress") == 20
    assert _metric(client, "captioner_estimated_wait_seconds") == pytest.approx(20.0)
    _crowd(client, 0, 1.0)
    assert _post(client).status_code == 200  # nothing ahead: admitted again


def test_slow_uploads_do_not_make_the_server_refuse_others(make_client) -> None:
    client = make_client(admission_budget_s=5.0)
    _crowd(client, 0, 1.0, uploading=64)  # 64 clients trickling their bodies: no model work yet
    assert _post(client).status_code == 200


def test_queue_cap_refuses_whatever_the_estimate(make_client) -> None:
    client = make_client(max_queue=3)
    _crowd(client, 0, 0.0001, uploading=500)
    assert _post(client).status_code == 200  # uploads still arriving do not count against the cap
    _crowd(client, 3, 0.0001)
    response = _post(client)
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
    assert "the limit is 3" in response.json()["error"]["message"] and int(response.headers["retry-after"]) >= 1
    assert _metric(client, 'captioner_refused_total{reason="queue_full"}') == 1


def test_refusal_comes_before_the_body_is_read(make_client) -> None:
    """The route refuses from the headers alone: the ASGI app never asks for the body."""
    client = make_client()
    _crowd(client, 50, 1.0)
    body_reads = []
    sent: list[dict] = []

    async def receive() -> dict:
        body_reads.append(True)
        return {"type": "http.request", "body": b"", "more_body": True}  # a client still uploading

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/caption", "raw_path": b"/caption", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"9000000")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": client.app,
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 503 and not body_reads


def test_a_burst_arriving_at_an_empty_queue_is_refused_when_its_upload_completes(make_client) -> None:
    """Checked again after the upload: others finished theirs meanwhile, so the wait is now too long."""
    client = make_client()
    _crowd(client, 0, 1.0)
    boundary = "b"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n\r\n'.encode()
        + PNG
        + f"\r\n--{boundary}--\r\n".encode()
    )
    reads = []
    sent: list[dict] = []

    async def receive() -> dict:
        reads.append(True)
        client.app.state.batcher._decoding = 50  # the rest of the burst is through its uploads now
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/caption", "raw_path": b"/caption", "query_string": b"method=greedy", "root_path": "",
        "headers": [
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": client.app,
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)
    client.app.state.batcher._decoding = 0
    assert reads and sent[0]["status"] == 503
    assert (b"retry-after", b"45") in sent[0]["headers"]
    assert client.app.state.batcher._incoming == 0  # its place is released


def test_draining_refuses_new_work_but_stays_alive(make_client) -> None:
    client = make_client()
    client.app.state.draining = True
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    response = _post(client)
    assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
    assert response.headers["retry-after"] == "1"
    assert client.get("/health").status_code == 200  # alive: it is finishing its work
    assert _metric(client, 'captioner_refused_total{reason="draining"}') == 1


def test_a_fault_fails_liveness_and_readiness(make_client) -> None:
    client = make_client()
    batcher = client.app.state.batcher
    client.portal.call(batcher._set_fault, "the model has made no progress for 121 s")
    for path in ("/health", "/ready"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.json()["error"] == {
            "code": "unhealthy",
            "message": "the server cannot serve: the model has made no progress for 121 s",
        }
    assert _post(client).status_code == 503


def test_queue_timeout_is_504(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(queue_timeout_s=0.2, max_batch_size=1)
    batcher = client.app.state.batcher
    release = threading.Event()
    real_run = batcher._run

    def slow_run(batch):
        assert release.wait(20)
        return real_run(batch)

    monkeypatch.setattr(batcher, "_run", slow_run)
    first: list = []
    holder = threading.Thread(target=lambda: first.append(_post(client)))
    holder.start()
    while not batcher._running:
        time.sleep(0.005)
    response = _post(client)  # queued behind a batch that does not finish in time
    release.set()
    holder.join(20)
    assert first[0].status_code == 200
    assert response.status_code == 504 and response.json()["error"]["code"] == "queue_timeout"
    assert _metric(client, "captioner_queue_timeouts_total") == 1


def test_out_of_memory_is_503_never_500(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client()
    model = client.app.state.loaded.model

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "encode_with_class_logits", no_memory)
    response = _post(client)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "out_of_memory" and response.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert _post(client).status_code == 200


# --- request ids and the JSON access log ---------------------------------------------------------


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    given = client.get("/health", headers={"X-Request-ID": "lb-7f3a:42"})
    assert given.headers["x-request-id"] == "lb-7f3a:42"
    fresh = client.get("/health")
    assert len(fresh.headers["x-request-id"]) == 32 and int(fresh.headers["x-request-id"], 16) >= 0
    forged = client.get("/health", headers={"X-Request-ID": 'x" status=200 forged'})
    assert forged.headers["x-request-id"] != 'x" status=200 forged' and len(forged.headers["x-request-id"]) == 32
    error = client.get("/no-such-page", headers={"X-Request-ID": "abc"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "abc"


def test_json_access_log_has_one_object_per_request(make_client, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(access_log="json")
    with caplog.at_level(logging.INFO, logger="captioner.access"):
        _post(client, **{"X-Request-ID": "req-1"})
        client.get("/ready")
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "captioner.access"]
    assert [(r["method"], r["path"], r["status"], r["request_id"]) for r in records][:1] == [
        ("POST", "/caption", 200, "req-1")
    ]
    assert records[0]["bytes_in"] > len(PNG) and records[0]["duration_ms"] > 0
    assert records[1]["path"] == "/ready" and len(records[1]["request_id"]) == 32
