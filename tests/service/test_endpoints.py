"""Every endpoint through TestClient (lifespan included), over the tiny checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner import Captioner
from captioner.decoding import BEAM_SIZE_RANGE, MAX_LENGTH_RANGE
from service.app import create_app
from service.settings import Settings
from tests.service import images


def _caption(client: TestClient, data: bytes, **options) -> dict:
    response = client.post("/caption", params=options, files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["model_id"].startswith("tiny-")


def test_ready_is_503_until_the_model_is_loaded(tiny_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint))
    client = TestClient(app)  # no `with`: the lifespan has not run, so nothing is loaded
    assert client.get("/health").status_code == 200
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    caption = client.post("/caption", files={"image": ("x.png", images.png(), "image/png")})
    assert caption.status_code == 503
    with client:
        assert client.get("/ready").status_code == 200


def test_caption_returns_captions_options_model_and_timing(client: TestClient, model: Captioner) -> None:
    data = images.png(seed=1)
    body = _caption(client, data, method="beam", beam_size=3, num_captions=2, max_length=12)
    assert len(body["captions"]) == 2
    expected = model.caption([data], method="beam", beam_size=3, num_captions=2, max_length=12)[0].captions
    for got, want in zip(body["captions"], expected, strict=True):
        assert got["text"] == want.text
        assert got["tokens"] == want.tokens
        assert got["log_prob"] == pytest.approx(want.log_prob, abs=1e-4)
        assert got["score"] == pytest.approx(want.score, abs=1e-4)
        assert got["attention"] is None  # not asked for
    assert body["captions"][0]["score"] >= body["captions"][1]["score"]
    assert body["options"] == {  # only what beam search uses
        "method": "beam",
        "max_length": 12,
        "beam_size": 3,
        "length_penalty": 0.0,
        "num_captions": 2,
        "min_confidence": 0.0,
        "guided_by_tags": False,
        "attention": False,
    }
    assert body["model_id"] == client.get("/ready").json()["model_id"]
    assert body["image"] == {"width": 96, "height": 64}
    timing = body["timing"]
    assert timing["batch_size"] == 1
    assert timing["total_ms"] >= timing["model_ms"] > 0


def test_options_as_form_fields(client: TestClient, model: Captioner) -> None:
    data = images.png(seed=2)
    response = client.post(
        "/caption?method=beam",
        data={"method": "greedy", "max_length": "4"},  # form fields override the query
        files={"image": ("x.png", data, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"]["method"] == "greedy" and body["options"]["max_length"] == 4
    assert body["captions"][0]["text"] == model.caption([data], method="greedy", max_length=4)[0].captions[0].text
    assert len(body["captions"][0]["tokens"]) <= 4


def test_sampling_with_a_seed_repeats(client: TestClient) -> None:
    data = images.png(seed=3)
    options = {"method": "sample", "seed": 7, "num_captions": 3, "temperature": 1.5}
    first, second = _caption(client, data, **options), _caption(client, data, **options)
    assert [c["text"] for c in first["captions"]] == [c["text"] for c in second["captions"]]
    assert len(first["captions"]) == 3


def test_attention_maps_cover_the_grid(client: TestClient) -> None:
    body = _caption(client, images.png(seed=4), method="greedy", attention="true")
    h, w = body["attention_shape"]
    caption = body["captions"][0]
    assert len(caption["attention"]) == len(caption["tokens"])
    for row in caption["attention"]:
        assert len(row) == h * w
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
    region = body["attention_region"]
    # 96x64 -> short side 256 -> 384x256 -> centre crop 224: the crop spans the middle of both axes.
    assert region["width"] == pytest.approx(224 / 384)
    assert region["height"] == pytest.approx(224 / 256)
    assert region["left"] == pytest.approx((1 - 224 / 384) / 2)


def test_attention_is_null_when_the_model_has_none(tiny_checkpoint_no_attention: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint_no_attention))) as client:
        body = _caption(client, images.png(), method="greedy", attention="true")
        assert body["attention_shape"] is None
        assert body["captions"][0]["attention"] is None
        assert client.get("/model").json()["attention"] is False


def test_model_info(client: TestClient, model: Captioner, tiny_checkpoint: Path) -> None:
    info = client.get("/model").json()
    assert info["checkpoint"] == tiny_checkpoint.name  # the file name only: no server paths
    assert info["id"] == f"tiny-{info['checkpoint_sha256'][:12]}"
    assert info["encoder"]["name"] == "resnet18"
    assert info["encoder"]["preprocess"]["crop"] == 224
    assert info["decoder"]["hidden_dim"] == 16 and info["decoder"]["attention"] is True
    assert info["vocab_size"] == len(model.vocab)
    assert info["attention"] is True
    assert info["training_data"] == {"data": "unit-test captions", "format": "test", "splits": {"train": 5}}
    assert info["metrics"] == {"val": {"bleu4": 0.0}}
    assert info["metadata"]["training"]["config"] == {"epochs": 0}
    # served on onnxruntime by default (CPU, onnxruntime installed); the count is the PyTorch model's
    assert info["backend"] == model.backend == "onnxruntime"
    assert info["parameters"] == sum(p.numel() for p in Captioner.from_checkpoint(tiny_checkpoint).parameters())


def _sample_value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))).strip(",") == want:
            return float(match.group(2))
    return 0.0


def test_metrics_count_requests_by_status_and_batches(client: TestClient) -> None:
    before = client.get("/metrics").text
    _caption(client, images.png(seed=5), method="greedy")
    client.post("/caption", params={"beam_size": 999}, files={"image": ("x.png", images.png(), "image/png")})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return _sample_value(after, name, **labels) - _sample_value(before, name, **labels)

    assert delta("captioner_requests_total", method="POST", route="/caption", status="200") == 1
    assert delta("captioner_requests_total", method="POST", route="/caption", status="422") == 1
    assert delta("captioner_request_latency_seconds_count", method="POST", route="/caption") == 2
    assert _sample_value(after, "captioner_batch_size_count") - _sample_value(before, "captioner_batch_size_count") == 1
    assert "captioner_batch_seconds_bucket" in after


def test_openapi_documents_caption_with_example_and_ranges(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/caption"]["post"]
    params = {p["name"]: p for p in post["parameters"]}
    assert set(params) >= {
        "method",
        "temperature",
        "top_k",
        "top_p",
        "beam_size",
        "num_captions",
        "max_length",
        "seed",
        "attention",
    }
    assert params["beam_size"]["schema"]["minimum"] == BEAM_SIZE_RANGE[0]
    assert params["beam_size"]["schema"]["maximum"] == BEAM_SIZE_RANGE[1]
    assert params["max_length"]["schema"]["maximum"] == MAX_LENGTH_RANGE[1]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    schema = spec["components"]["schemas"]["CaptionResponse"]
    assert schema["examples"][0]["captions"][0]["text"]
    assert {"401", "413", "415", "422"} <= set(post["responses"])
    for path in ("/health", "/ready", "/model", "/metrics"):
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_web_page_and_assets_need_no_cdn(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200
        assert not re.search(r"https?://", response.text), f"{asset} loads something from outside the server"
    assert not re.search(r"(src|href)=\"https?://", page.text)
    icon = re.search(r'<link rel="icon" href="([^"]+)"', page.text)
    assert icon is not None  # without one the browser asks for /favicon.ico and logs a 404
    response = client.get(icon.group(1))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_unknown_path_and_method_are_json_errors(client: TestClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = client.get("/caption")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_real_photo(client: TestClient, model: Captioner, photo: Path) -> None:
    data = photo.read_bytes()
    response = client.post("/caption", files={"image": (photo.name, data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    with Image.open(photo) as im:
        assert (body["image"]["width"], body["image"]["height"]) == im.size
    assert body["captions"][0]["text"] == model.caption([data])[0].captions[0].text


def test_an_option_the_method_does_not_use_is_422_and_the_echo_shows_only_what_applies(client: TestClient) -> None:
    data = images.png(seed=3)
    refused = client.post(
        "/caption", params={"method": "greedy", "beam_size": 5}, files={"image": ("a.png", data, "image/png")}
    )
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "invalid_option" and "method greedy does not use beam_size" in error["message"]
    greedy = _caption(client, data, method="greedy", max_length=5)
    assert greedy["options"] == {"method": "greedy", "max_length": 5, "min_confidence": 0.0, "attention": False}
    sample = _caption(client, data, method="sample", seed=4, top_k=3)
    assert sample["options"] == {
        "method": "sample", "max_length": 20, "temperature": 1.0, "top_k": 3, "top_p": 1.0, "num_captions": 1,
        "seed": 4, "min_confidence": 0.0, "attention": False,
    }  # fmt: skip


def test_model_info_shows_no_server_paths(tmp_path: Path) -> None:
    from tests.service.tiny_model import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "private" / "model.pt")
    model = Captioner.from_checkpoint(checkpoint)
    model.metadata["training"] = {"data": "/srv/secret/flickr8k", "config": {"output_dir": "/home/me/runs/x"}}
    model.metadata["cache"] = ["~/cache/features", "relative/is/fine"]
    model.save(checkpoint)
    with TestClient(create_app(Settings(checkpoint=checkpoint, backend="torch"))) as client:
        info = client.get("/model").json()
    text = json.dumps(info)
    assert "/srv" not in text and "/home" not in text and str(tmp_path) not in text and "~/" not in text
    assert info["checkpoint"] == "model.pt" and info["training_data"]["data"] == "flickr8k"
    assert info["metadata"]["training"]["config"]["output_dir"] == "x"
    assert info["metadata"]["cache"] == ["features", "relative/is/fine"]


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    from service.security import DOCS_POLICY, PAGE_POLICY

    not_an_image = client.post("/caption", files={"image": ("x.jpg", b"text", "image/jpeg")})
    responses = {
        "page": client.get("/"),
        "script": client.get("/static/app.js"),
        "health": client.get("/health"),
        "error": not_an_image,
        "missing": client.get("/no-such-route"),
        "docs": client.get("/docs"),
    }
    assert not_an_image.status_code == 415 and responses["missing"].status_code == 404
    for name, response in responses.items():
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["x-frame-options"] == "DENY", name
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy, name
        assert policy == (DOCS_POLICY if name == "docs" else PAGE_POLICY), name
    # the page's policy admits its own script and blob: previews, and nothing from another host
    assert "http" not in PAGE_POLICY and "blob:" in PAGE_POLICY
