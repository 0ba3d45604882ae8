"""The library's image errors reach clients by their code: the status never depends on a message's wording."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from captioner.transforms import ImageError, ImageErrorCode
from service.errors import IMAGE_ERRORS, image_error
from service.routes import caption
from tests.service import images


def test_every_code_has_a_status() -> None:
    assert set(IMAGE_ERRORS) == set(ImageErrorCode)


@pytest.mark.parametrize(
    ("code", "status", "api_code"),
    [
        (ImageErrorCode.UNSUPPORTED_FORMAT, 415, "unsupported_image_format"),
        (ImageErrorCode.TOO_LARGE, 413, "image_too_large"),
        (ImageErrorCode.EMPTY_FILE, 400, "empty_file"),
        (ImageErrorCode.NO_SUCH_FILE, 400, "invalid_image"),
        (ImageErrorCode.INVALID_IMAGE, 400, "invalid_image"),
    ],
)
def test_the_code_decides_the_status(code: ImageErrorCode, status: int, api_code: str) -> None:
    # a message like no library message, and one that reads like another code's
    for message in ("the pixels could not be made sense of", "not a recognised image format; empty file"):
        error = image_error(ImageError(message, code))
        assert (error.status, error.code, error.message) == (status, api_code, message)


def test_an_upload_gets_the_status_of_its_error_code(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data, preprocess, *, max_pixels):
        raise ImageError("this picture is rather big, is it not", ImageErrorCode.TOO_LARGE)

    monkeypatch.setattr(caption, "load_crop", refuse)
    response = client.post("/caption", files={"image": ("photo.png", images.png(), "image/png")})
    assert response.status_code == 413, response.text
    assert response.json() == {"error": {"code": "image_too_large", "message": "this picture is rather big, is it not"}}
