"""Bad input gets a clear JSON error (400/413/415/422), never a 500, and the server stays up."""

from __future__ import annotations

import builtins
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner.options import SEED_MAX, VALID_VALUES, DecodingOptions
from service.app import create_app
from service.settings import Settings
from tests.service import images

MAX_UPLOAD = 200_000
MAX_PIXELS = 250_000


@pytest.fixture(scope="module")
def limited(tiny_checkpoint: Path) -> Iterator[TestClient]:
    settings = Settings(checkpoint=tiny_checkpoint, max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS)
    with TestClient(create_app(settings)) as client:
        yield client


def _error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "\n" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]["message"]


def _upload(client: TestClient, data: bytes, name: str = "photo.jpg", **params):
    return client.post("/caption", params=params, files={"image": (name, data, "image/jpeg")})


def _jpeg() -> bytes:
    return images.encode(images.pattern(), "JPEG", quality=90)


# --- the request itself ------------------------------------------------------------------------


def test_empty_body(client: TestClient) -> None:
    assert "image" in _error(client.post("/caption"), 400, "empty_body")


def test_empty_multipart_body(client: TestClient) -> None:
    response = client.post("/caption", content=b"", headers={"content-type": "multipart/form-data; boundary=abc"})
    _error(response, 400, "empty_body")


def test_missing_image_field(client: TestClient) -> None:
    response = client.post("/caption", data={"method": "greedy"}, files={})
    # httpx sends a urlencoded body when there are no files: that is the wrong media type.
    _error(response, 415, "unsupported_media_type")
    response = client.post(
        "/caption",
        content=b'--b\r\nContent-Disposition: form-data; name="method"\r\n\r\ngreedy\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert "'image'" in _error(response, 400, "missing_image")


def test_wrong_field_name(client: TestClient) -> None:
    response = client.post("/caption", files={"file": ("photo.jpg", _jpeg(), "image/jpeg")})
    message = _error(response, 400, "missing_image")
    assert "'file'" in message and "'image'" in message


def test_not_multipart(client: TestClient) -> None:
    response = client.post("/caption", content=_jpeg(), headers={"content-type": "image/jpeg"})
    assert "multipart/form-data" in _error(response, 415, "unsupported_media_type")
    response = client.post("/caption", json={"image": "aGVsbG8="})
    _error(response, 415, "unsupported_media_type")


def test_malformed_multipart(client: TestClient) -> None:
    response = client.post(
        "/caption", content=b"this is not multipart", headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert _error(response, 400, "bad_request").startswith("malformed multipart body")
    response = client.post("/caption", content=b"x", headers={"content-type": "multipart/form-data"})
    assert "boundary" in _error(response, 400, "bad_request")


# --- the uploaded file -------------------------------------------------------------------------


def test_zero_byte_file(client: TestClient) -> None:
    assert "zero bytes" in _error(_upload(client, b""), 400, "empty_file")


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"just some text, not a picture\n", "notes.jpg"),
        (images.PDF, "scan.jpg"),
        (images.SVG, "drawing.svg"),
        (b"\x00" * 1000, "zeros.png"),
    ],
    ids=["text-named-jpg", "pdf-named-jpg", "svg", "zeros"],
)
def test_not_an_image(client: TestClient, data: bytes, name: str) -> None:
    message = _error(_upload(client, data, name), 415, "unsupported_image_format")
    assert "JPEG" in message


@pytest.mark.parametrize("pillow_format", ["TGA", "PCX", "SGI"])
def test_an_image_format_the_api_does_not_document_is_415(client: TestClient, pillow_format: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 200)).save(buffer, format=pillow_format)
    message = _error(
        _upload(client, buffer.getvalue(), f"photo.{pillow_format.lower()}"), 415, "unsupported_image_format"
    )
    assert "JPEG, PNG, GIF, WebP, BMP or TIFF" in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(client: TestClient, fmt: str) -> None:
    data = images.encode(images.pattern(256, 256), fmt)
    _error(_upload(client, data[: len(data) // 2]), 400, "invalid_image")


def test_decompression_bomb(client: TestClient) -> None:
    message = _error(_upload(client, images.decompression_bomb_png(), "bomb.png"), 413, "image_too_large")
    assert "decompression bomb" in message


def test_image_over_the_pixel_limit(limited: TestClient) -> None:
    data = images.encode(Image.new("RGB", (600, 500), (20, 120, 200)), "PNG")  # 300,000 pixels, a few KB
    assert len(data) < MAX_UPLOAD
    message = _error(_upload(limited, data, "big.png"), 413, "image_too_large")
    assert f"{MAX_PIXELS:,}" in message
    # A header-only giant under PIL's own bomb threshold is still refused before any pixel is decoded.
    huge = images.decompression_bomb_png(8000, 8000)
    _error(_upload(limited, huge, "huge.png"), 413, "image_too_large")


def test_upload_over_the_byte_limit(limited: TestClient) -> None:
    png = images.png()
    at_limit = png + b"\0" * (MAX_UPLOAD - len(png))  # PNG readers ignore bytes after the end chunk
    assert _upload(limited, at_limit, "x.png").status_code == 200
    message = _error(_upload(limited, at_limit + b"\0", "x.png"), 413, "payload_too_large")
    assert f"{MAX_UPLOAD:,} bytes" in message
    _error(_upload(limited, at_limit * 3, "x.png"), 413, "payload_too_large")  # refused by its Content-Length


def _stream_upload(client: TestClient, *, content_length: int | None, chunks: int) -> tuple[int, int]:
    """Call the ASGI app with an upload of ``chunks`` x 64 KiB; returns (status, chunks the app pulled)."""
    chunk = 64 * 1024
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        if pulled == 1:
            return {"type": "http.request", "body": head, "more_body": True}
        return {"type": "http.request", "body": b"\xff" * chunk, "more_body": pulled < chunks}

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=b")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/caption",
        "raw_path": b"/caption",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    client.portal.call(client.app, scope, receive, send)
    return messages[0]["status"], pulled


def test_oversized_upload_is_refused_while_streaming(limited: TestClient) -> None:
    """Chunked upload (no Content-Length): reading stops right after the limit, not at the end of 64 MiB."""
    status, pulled = _stream_upload(limited, content_length=None, chunks=1000)
    assert status == 413
    assert pulled <= (MAX_UPLOAD + 64 * 1024) // (64 * 1024) + 3, f"read {pulled} chunks of a refused upload"


def test_content_length_over_the_limit_is_refused_before_reading(limited: TestClient) -> None:
    status, pulled = _stream_upload(limited, content_length=64 * 1024 * 1000, chunks=1000)
    assert (status, pulled) == (413, 0)


def test_uploads_are_never_written_to_disk(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an upload touched the disk")

    real_open = builtins.open

    def open_read_only(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise AssertionError(f"an upload was written to {file}")
        return real_open(file, mode, *args, **kwargs)

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(builtins, "open", open_read_only)
    big = images.encode(images.pattern(900, 700), "PNG")  # ~1.9 MB: far past any in-memory spooling threshold
    response = client.post("/caption", params={"method": "greedy"}, files={"image": ("big.png", big, "image/png")})
    assert response.status_code == 200, response.text


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"method": "magic"}, "one of greedy, sample, beam"),
        ({"beam_size": 0}, "beam_size must be an integer in [1, 20]"),
        ({"beam_size": 21}, "beam_size must be an integer in [1, 20]"),
        ({"beam_size": "three"}, "beam_size must be an integer in [1, 20]"),
        ({"max_length": 101}, "max_length must be an integer in [1, 100]"),
        ({"num_captions": 0}, "num_captions must be an integer in [1, 20]"),
        ({"temperature": 0}, "temperature must be a number in (0, 10.0]"),
        ({"temperature": 11}, "temperature must be a number in (0, 10.0]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 1.5}, "top_p must be a number in (0, 1]"),
        ({"top_p": 0}, "top_p must be a number in (0, 1]"),
        ({"length_penalty": 9}, "length_penalty must be a number in [0.0, 5.0]"),
        ({"seed": -1}, "seed must be an integer in [0, "),
        ({"attention": "perhaps"}, "attention must be true or false"),
        ({"method": "greedy", "num_captions": 2}, "greedy decoding gives one caption"),
        ({"method": "beam", "beam_size": 2, "num_captions": 3}, "num_captions must be <= beam_size (2)"),
        ({"beam_sise": 3}, "unknown option 'beam_sise'; expected one of method,"),
        # given, an option the method does not use is refused even at its default value
        ({"method": "sample", "beam_size": 3}, "method sample does not use beam_size (beam_size is for beam)"),
        ({"method": "greedy", "num_captions": 1}, "method greedy does not use num_captions"),
        ({"method": "beam", "temperature": 1.0, "top_k": 0}, "method beam does not use temperature, top_k"),
        ({"seed": 5}, "method beam does not use seed"),  # the default method is beam
    ],
)
def test_out_of_range_options(client: TestClient, params: dict, expected: str) -> None:
    message = _error(_upload(client, images.png(), **params), 422, "invalid_option")
    assert expected in message


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1])
def test_the_seed_limit_is_the_librarys(client: TestClient, seed: int) -> None:
    """The API refuses the seeds DecodingOptions refuses, in the library's words; the largest valid seed runs."""
    message = _error(_upload(client, images.png(), method="sample", seed=seed), 422, "invalid_option")
    with pytest.raises(ValueError) as library:
        DecodingOptions(method="sample", seed=seed)
    stated = f"seed must be {VALID_VALUES['seed']}"
    assert message.startswith(stated + ", got") and str(library.value).startswith(stated + ", got")
    assert _upload(client, images.png(), method="sample", seed=SEED_MAX).status_code == 200


def test_out_of_range_form_field(client: TestClient) -> None:
    response = client.post("/caption", data={"top_p": "2"}, files={"image": ("x.png", images.png(), "image/png")})
    assert "top_p must be a number in (0, 1]" in _error(response, 422, "invalid_option")


def test_an_unused_option_is_refused_as_a_form_field_too(client: TestClient) -> None:
    files = {"image": ("x.png", images.png(), "image/png")}
    response = client.post("/caption", data={"method": "sample", "length_penalty": "0"}, files=files)
    assert "method sample does not use length_penalty" in _error(response, 422, "invalid_option")
    # the method from the query, the unused option from the form: the request as a whole names both
    response = client.post("/caption", params={"method": "greedy"}, data={"beam_size": "3"}, files=files)
    assert "method greedy does not use beam_size" in _error(response, 422, "invalid_option")


@pytest.mark.parametrize(
    "params",
    [
        {"method": "beam", "beam_size": 3},
        {"method": "greedy"},
        {"method": "greedy", "max_length": 20, "attention": "true"},
        {"method": "sample", "num_captions": 1, "top_k": 0, "seed": 1, "attention": "false"},
    ],
)
def test_the_options_a_method_uses_are_accepted(client: TestClient, params: dict) -> None:
    response = _upload(client, images.png(), **params)
    assert response.status_code == 200, response.text


# --- and afterwards ------------------------------------------------------------------------------


def test_server_stays_up_after_bad_input(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    response = _upload(client, _jpeg(), method="greedy")
    assert response.status_code == 200 and response.json()["captions"][0]["tokens"] is not None
    assert 'status="500"' not in client.get("/metrics").text


def test_a_failing_batch_fails_its_requests_not_the_server(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint))
    with TestClient(app, raise_server_exceptions=False) as client:
        model = app.state.loaded.model

        def broken(*args, **kwargs):
            raise RuntimeError("simulated model failure")

        monkeypatch.setattr(model, "encode_with_class_logits", broken)
        _error(_upload(client, _jpeg(), method="greedy"), 500, "internal_error")
        monkeypatch.undo()
        assert _upload(client, _jpeg(), method="greedy").status_code == 200
        assert client.get("/health").status_code == 200
