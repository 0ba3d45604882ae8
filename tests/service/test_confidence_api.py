"""Caption confidence, image tags and abstention through ``POST /caption`` and ``GET /model``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from captioner import Captioner
from captioner.decoding import DecodingOptions
from captioner.model import CaptionResult
from service.app import create_app
from service.schemas import CaptionResponse
from service.settings import Settings
from tests.helpers import fake_confidence_model
from tests.service import images
from tests.service.tiny_model import save_tiny_checkpoint

BEAM3 = {"method": "beam", "beam_size": 3, "num_captions": 3, "max_length": 8}


def _post(client: TestClient, data: bytes, **options) -> dict:
    response = client.post("/caption", params=options, files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def _alone(client: TestClient, data: bytes, **options) -> CaptionResult:
    """What the served model itself gives for this image and these options (no service in between)."""
    model: Captioner = client.app.state.loaded.model
    return model.caption([data], DecodingOptions(**options))[0]


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


def test_a_calibrated_model_answers_each_captions_confidence_and_the_tags(calibrated_client: TestClient) -> None:
    data = images.png(seed=11)
    body = _post(calibrated_client, data, **BEAM3)
    want = _alone(calibrated_client, data, **BEAM3)
    assert [c["text"] for c in body["captions"]] == [c.text for c in want.captions]
    confidences = [c["confidence"] for c in body["captions"]]
    assert confidences == [pytest.approx(c.confidence, abs=1e-4) for c in want.captions]
    assert all(0.0 < c < 1.0 for c in confidences) and len(set(confidences)) > 1  # per caption, not one number
    assert all(c == round(c, 4) for c in confidences)
    assert body["tags"], "the model has an ImageNet head: there are tags"
    assert body["tags"] == [
        {"name": t.name, "confidence": pytest.approx(t.confidence, abs=1e-4), "parents": list(t.parents)}
        for t in want.tags
    ]
    assert body["abstained"] is False
    assert body["options"]["min_confidence"] == 0.0


def test_a_model_without_calibration_answers_confidence_null_and_no_tags_without_a_head(client: TestClient) -> None:
    body = _post(client, images.png(seed=12), method="beam", num_captions=2)
    assert len(body["captions"]) == 2
    assert all("confidence" in c and c["confidence"] is None for c in body["captions"])
    assert body["tags"] == [] and body["abstained"] is False


def test_tags_without_a_confidence_model(tmp_path: Path) -> None:
    """A head but no calibration: the tags are there, the confidence is null, never a made-up number."""
    checkpoint = save_tiny_checkpoint(tmp_path / "head-only.pt", attention=False, class_head=True)
    with TestClient(create_app(Settings(checkpoint=checkpoint))) as client:
        body = _post(client, images.png(seed=13), method="greedy")
        info = client.get("/model").json()
    assert body["tags"] and body["captions"][0]["confidence"] is None
    assert info["confidence"] is None and info["tags"] == {"count": 5, "min_confidence": 0.02}


def test_min_confidence_keeps_only_the_captions_at_or_above_it(calibrated_client: TestClient) -> None:
    data = images.png(seed=11)
    everything = _post(calibrated_client, data, **BEAM3)["captions"]
    confidences = sorted(c["confidence"] for c in everything)
    bar = (confidences[0] + confidences[-1]) / 2  # between the least and the most confident caption
    body = _post(calibrated_client, data, **BEAM3, min_confidence=bar)
    kept = [c["text"] for c in everything if c["confidence"] >= bar]
    assert 0 < len(kept) < len(everything)
    assert [c["text"] for c in body["captions"]] == kept
    assert body["abstained"] is False and body["options"]["min_confidence"] == pytest.approx(bar)


def test_min_confidence_1_abstains_and_keeps_the_tags(calibrated_client: TestClient) -> None:
    data = images.png(seed=14)
    plain = _post(calibrated_client, data, method="greedy")
    body = _post(calibrated_client, data, method="greedy", min_confidence=1.0)
    assert body["abstained"] is True and body["captions"] == []
    assert body["tags"] and body["tags"] == plain["tags"]
    assert body["options"] == {"method": "greedy", "max_length": 20, "min_confidence": 1.0, "attention": False}


def test_min_confidence_as_a_form_field(calibrated_client: TestClient) -> None:
    response = calibrated_client.post(
        "/caption",
        data={"method": "greedy", "min_confidence": "1"},
        files={"image": ("x.png", images.png(seed=15), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["abstained"] is True


def test_min_confidence_on_a_model_without_calibration_is_refused_before_it_is_queued(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = client.app.state.batcher
    submitted: list[object] = []
    submit = batcher.submit

    async def counting_submit(*args, **kwargs):
        submitted.append(args)
        return await submit(*args, **kwargs)

    monkeypatch.setattr(batcher, "submit", counting_submit)
    refused = client.post(
        "/caption", params={"min_confidence": 0.5}, files={"image": ("x.png", images.png(), "image/png")}
    )
    message = _error(refused, 422, "confidence_unavailable")
    assert "min_confidence" in message and "captioner calibrate" in message
    assert submitted == []
    # 0, the default, never abstains and needs no calibration
    assert _post(client, images.png(), method="greedy", min_confidence=0)["abstained"] is False
    assert len(submitted) == 1


@pytest.mark.parametrize("value", ["-0.1", "1.5", "high", "nan", "inf"])
def test_min_confidence_out_of_range_is_422(calibrated_client: TestClient, value: str) -> None:
    response = calibrated_client.post(
        "/caption", params={"min_confidence": value}, files={"image": ("x.png", images.png(), "image/png")}
    )
    message = _error(response, 422, "invalid_option")
    assert "min_confidence must be a number in [0.0, 1.0]" in message


def test_model_info_describes_the_confidence_model_and_the_tags(
    calibrated_client: TestClient, client: TestClient
) -> None:
    info = calibrated_client.get("/model").json()
    assert info["confidence"] == {
        "target": "test: made up",
        "signals": ["mean_log_prob", "feature_residual"],
        "fitted_on": {"data": "random"},
    }
    assert info["tags"] == {"count": 5, "min_confidence": 0.02}
    plain = client.get("/model").json()
    assert plain["confidence"] is None and plain["tags"] is None


def test_model_info_shows_no_server_paths_in_the_confidence_fit(tmp_path: Path) -> None:
    model = Captioner.from_checkpoint(save_tiny_checkpoint(tmp_path / "model.pt", attention=False))
    confidence = fake_confidence_model(model.encoder.feature_dim)
    model.confidence_model = dataclasses.replace(confidence, fitted_on={"data": "/srv/secret/flickr8k", "images": 1000})
    model.save(tmp_path / "model.pt")
    with TestClient(create_app(Settings(checkpoint=tmp_path / "model.pt"))) as client:
        info = client.get("/model").json()
    assert info["confidence"]["fitted_on"] == {"data": "flickr8k", "images": 1000}
    assert "/srv" not in json.dumps(info)


def test_openapi_documents_confidence_tags_and_min_confidence(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/caption"]["post"]["parameters"]}
    assert params["min_confidence"]["schema"]["minimum"] == 0.0
    assert params["min_confidence"]["schema"]["maximum"] == 1.0
    assert "abstain" in params["min_confidence"]["description"]
    schemas = spec["components"]["schemas"]
    response = schemas["CaptionResponse"]
    assert {"abstained", "tags"} <= set(response["required"])
    assert "confidence" in schemas["CaptionOut"]["required"]  # always present, null when unknown
    assert "4 decimals" in schemas["CaptionOut"]["properties"]["confidence"]["description"]
    assert set(schemas["TagOut"]["properties"]) == {"name", "confidence", "parents"}
    example = response["examples"][0]
    CaptionResponse.model_validate(example)  # the example is a valid response
    assert example["captions"][0]["confidence"] is not None and example["tags"][0]["parents"]
    assert "confidence_unavailable" in spec["paths"]["/caption"]["post"]["responses"]["422"]["description"]
