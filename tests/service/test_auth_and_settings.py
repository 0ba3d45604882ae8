"""API keys, CORS and settings from the environment."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from captioner.model import DEFAULT_CHECKPOINT
from service.app import ModelLoadError, create_app
from service.settings import Settings
from tests.service import images

KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: Path) -> Iterator[TestClient]:
    settings = Settings(checkpoint=tiny_checkpoint, api_keys=KEYS, cors_origins=["https://example.org"])
    with TestClient(create_app(settings)) as client:
        yield client


def _post(client: TestClient, headers: dict[str, str] | None = None, **kwargs):
    files = kwargs.pop("files", {"image": ("x.png", images.png(), "image/png")})
    return client.post("/caption", params={"method": "greedy"}, files=files, headers=headers or {}, **kwargs)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LW9uZQ=="}],
    ids=["none", "wrong-header", "wrong-bearer", "basic"],
)
def test_requests_without_a_valid_key_get_401(secured: TestClient, headers: dict[str, str]) -> None:
    for response in (_post(secured, headers), secured.get("/model", headers=headers)):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_valid_keys_are_accepted(secured: TestClient) -> None:
    assert _post(secured, {"X-API-Key": "key-one"}).status_code == 200
    assert _post(secured, {"Authorization": "Bearer key-two"}).status_code == 200
    assert secured.get("/model", headers={"X-API-Key": "key-two"}).status_code == 200


def test_nothing_else_runs_without_a_key(secured: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """No body is read, no option checked, no image decoded, nothing batched: 401 comes first."""
    import service.routes.caption as caption_route

    def never(*args, **kwargs):
        raise AssertionError("ran without a valid API key")

    monkeypatch.setattr(caption_route, "read_form", never)
    monkeypatch.setattr(caption_route, "_decode", never)
    monkeypatch.setattr(secured.app.state.batcher, "submit", never)
    oversized = {"image": ("x.png", b"\0" * (Settings().max_upload_bytes + 1), "image/png")}
    for response in (
        _post(secured, files=oversized),
        secured.post("/caption?beam_size=999", content=b"not multipart", headers={"content-type": "text/plain"}),
    ):
        assert response.status_code == 401


def test_probes_metrics_and_page_stay_open(secured: TestClient) -> None:
    for path in ("/health", "/ready", "/metrics", "/", "/openapi.json"):
        assert secured.get(path).status_code == 200, path


def test_cors(secured: TestClient) -> None:
    preflight = secured.options(
        "/caption",
        headers={
            "Origin": "https://example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://example.org"
    other = secured.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(tmp_path / "m.pt"))
    monkeypatch.setenv("CAPTIONER_DEVICE", "cpu")
    monkeypatch.setenv("CAPTIONER_MAX_UPLOAD_BYTES", "12345")
    monkeypatch.setenv("CAPTIONER_MAX_IMAGE_PIXELS", "1000000")
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CAPTIONER_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("CAPTIONER_API_KEYS", "a, b ,c")
    monkeypatch.setenv("CAPTIONER_CORS_ORIGINS", "https://x.org,https://y.org")
    settings = Settings()
    assert settings.checkpoint == tmp_path / "m.pt"
    assert (settings.max_upload_bytes, settings.max_image_pixels) == (12345, 1_000_000)
    assert (settings.max_batch_size, settings.max_wait_ms) == (4, 2.5)
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.cors_origins == ["https://x.org", "https://y.org"]
    assert settings.encoder_chunk_size is None  # unset: the library's choice for the device
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings()
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CAPTIONER_ENCODER_CHUNK_SIZE", "0")
    with pytest.raises(ValueError, match="encoder_chunk_size"):
        Settings()


def test_encoder_chunk_size_setting_reaches_the_model(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONER_ENCODER_CHUNK_SIZE", "3")
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as client:
        assert client.get("/ready").status_code == 200
        assert client.app.state.loaded.model.encoder_chunk_size == 3
        assert client.app.state.loaded.model.encoder.fused  # BatchNorm folded for serving


def test_the_service_model_is_fused_and_captions_as_the_checkpoint_does(tiny_checkpoint: Path) -> None:
    from captioner import Captioner
    from tests.service.images import png

    data = png(seed=2)
    unfused = Captioner.from_checkpoint(tiny_checkpoint)
    expected = unfused.caption([data], method="greedy")[0].captions[0].text
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as client:
        answer = client.post("/caption", params={"method": "greedy"}, files={"image": ("a.png", data, "image/png")})
        assert answer.status_code == 200
        assert answer.json()["captions"][0]["text"] == expected


@pytest.mark.parametrize(("megabytes", "expected"), [(None, [64 * 2**20]), (8, [8 * 2**20]), (0, [])])
def test_startup_tunes_malloc_unless_switched_off(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, megabytes: int | None, expected: list[int]
) -> None:
    """The thresholds are set at startup, before the model loads (see captioner.runtime)."""
    import service.app

    calls: list[int] = []
    monkeypatch.setattr(service.app, "tune_malloc", lambda threshold: calls.append(threshold) or True)
    if megabytes is not None:
        monkeypatch.setenv("CAPTIONER_MALLOC_MMAP_THRESHOLD_MB", str(megabytes))
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as client:
        assert client.get("/ready").status_code == 200
    assert calls == expected
    monkeypatch.setenv("CAPTIONER_MALLOC_MMAP_THRESHOLD_MB", "-1")
    with pytest.raises(ValueError, match="malloc_mmap_threshold_mb"):
        Settings()


def test_missing_checkpoint_fails_startup_with_one_line(tmp_path: Path) -> None:
    app = create_app(Settings(checkpoint=tmp_path / "absent.pt"))
    with pytest.raises(ModelLoadError) as failure, TestClient(app):
        pass
    message = str(failure.value)
    assert "\n" not in message and "checkpoint not found" in message and "absent.pt" in message
    assert app.state.startup_error == message


@pytest.mark.skipif(DEFAULT_CHECKPOINT.is_file(), reason="a default model is bundled, so startup succeeds")
def test_no_default_model_fails_startup_with_a_hint() -> None:
    app = create_app(Settings(checkpoint=None))
    with pytest.raises(ModelLoadError, match="CAPTIONER_CHECKPOINT or pass --checkpoint"), TestClient(app):
        pass
    assert TestClient(app).get("/ready").status_code == 503


def test_corrupt_checkpoint_fails_startup(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"definitely not a torch file")
    app = create_app(Settings(checkpoint=bad))
    with pytest.raises(ModelLoadError, match="not a readable checkpoint"), TestClient(app):
        pass


@pytest.mark.parametrize(
    ("backend", "onnxruntime_installed", "served_by"),
    [
        ("auto", True, "onnxruntime"),  # the default on CPU
        ("auto", False, "torch"),  # without the onnx extra, auto falls back to PyTorch
        ("torch", True, "torch"),
        ("onnxruntime", True, "onnxruntime"),
    ],
)
def test_the_backend_setting_picks_what_runs_the_model(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, backend: str, onnxruntime_installed: bool, served_by: str
) -> None:
    import captioner.backends

    monkeypatch.setenv("CAPTIONER_BACKEND", backend)
    monkeypatch.setattr(captioner.backends, "onnxruntime_available", lambda: onnxruntime_installed)
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as client:
        assert client.get("/model").json()["backend"] == served_by
        assert client.app.state.loaded.model.backend == served_by


def test_onnxruntime_backend_without_the_extra_fails_startup_with_one_line(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from service.app import ModelLoadError, load_model

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match=r"captioner\[onnx\]"):
        load_model(Settings(checkpoint=tiny_checkpoint, backend="onnxruntime"))
    monkeypatch.setenv("CAPTIONER_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="backend"):
        Settings()


@pytest.mark.parametrize("keys", [None, "", " , "], ids=["unset", "empty", "commas"])
def test_required_api_keys_missing_stop_the_server_before_it_loads(
    keys: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a Kubernetes pod does when the Secret is missing: exit 2 with one line saying why."""
    from service import cli

    monkeypatch.setattr(cli, "create_app", lambda settings: pytest.fail("got past the settings"))
    monkeypatch.setenv("CAPTIONER_REQUIRE_API_KEYS", "true")
    if keys is None:
        monkeypatch.delenv("CAPTIONER_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("CAPTIONER_API_KEYS", keys)
    with pytest.raises(SystemExit) as stopped:
        cli.main([])
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()  # one line, no usage summary
    assert line.startswith("captioner-serve: invalid settings: ") and stopped.value.code == 2, err
    assert "CAPTIONER_API_KEYS is empty" in line and "CAPTIONER_REQUIRE_API_KEYS=false" in line, err
    assert "Traceback" not in err
    monkeypatch.setenv("CAPTIONER_API_KEYS", "key-one")
    assert Settings().require_api_keys and Settings().api_keys == ["key-one"]


@pytest.mark.parametrize("keys", [[], KEYS], ids=["open", "with-keys"])
def test_an_open_api_is_announced_once_at_start(
    tiny_checkpoint: Path, keys: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), TestClient(create_app(Settings(checkpoint=tiny_checkpoint, api_keys=keys))):
        pass
    warnings = [r for r in caplog.records if "no API keys" in r.getMessage()]
    assert len(warnings) == (0 if keys else 1), caplog.text
    assert all(r.levelno == logging.WARNING and "CAPTIONER_REQUIRE_API_KEYS" in r.getMessage() for r in warnings)
