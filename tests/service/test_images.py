"""Unusual but valid images are captioned exactly as their correctly converted RGB version would be."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner import Captioner
from tests.service import images


def _served(client: TestClient, data: bytes, name: str) -> dict:
    files = {"image": (name, data, "application/octet-stream")}
    response = client.post("/caption", params={"method": "greedy"}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["captions"][0]


def _reference(model: Captioner, image: Image.Image) -> tuple[str, float]:
    caption = model.caption([image.convert("RGB")], method="greedy")[0].captions[0]
    return caption.text, caption.log_prob


def _assert_same(served: dict, reference: tuple[str, float]) -> None:
    assert served["text"] == reference[0]
    assert served["log_prob"] == pytest.approx(reference[1], abs=1e-4)


def _assert_differs(served: dict, reference: tuple[str, float]) -> None:
    """The negative control: the model tells these images apart, so the positive checks have teeth."""
    assert served["log_prob"] != pytest.approx(reference[1], abs=1e-4) or served["text"] != reference[0]


def test_exif_rotated_image_is_turned_upright(client: TestClient, model: Captioner) -> None:
    upright = images.pattern(96, 64, seed=11)
    served = _served(client, images.exif_rotated_png(upright), "rotated.png")
    _assert_same(served, _reference(model, upright))
    _assert_differs(served, _reference(model, upright.transpose(Image.Transpose.ROTATE_90)))


def test_exif_rotated_jpeg(client: TestClient, model: Captioner) -> None:
    upright = images.pattern(96, 64, seed=12)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = images.encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    with Image.open(io.BytesIO(data)) as stored:  # what a viewer shows: the stored pixels turned clockwise
        turned = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    expected = Image.fromarray(np.asarray(turned))  # pixels only: drop the EXIF that would rotate it again
    served = _served(client, data, "rotated.jpg")
    _assert_same(served, _reference(model, expected))
    assert client.post("/caption", files={"image": ("r.jpg", data)}).json()["image"] == {"width": 96, "height": 64}


def test_cmyk_tiff(client: TestClient, model: Captioner) -> None:
    rgb = images.pattern(seed=13)
    _assert_same(_served(client, images.cmyk_tiff(rgb), "cmyk.tif"), _reference(model, rgb))


def test_cmyk_jpeg(client: TestClient, model: Captioner) -> None:
    rgb = images.pattern(seed=14)
    data = images.cmyk_jpeg(rgb)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
        decoded = im.convert("RGB")
    _assert_same(_served(client, data, "cmyk.jpg"), _reference(model, decoded))


def test_16_bit_png(client: TestClient, model: Captioner) -> None:
    gray = images.pattern(seed=15).convert("L")
    served = _served(client, images.gray16_png(gray), "deep.png")
    _assert_same(served, _reference(model, gray))
    _assert_differs(served, _reference(model, Image.new("RGB", gray.size, (255, 255, 255))))  # the clipping bug


def test_palette_png(client: TestClient, model: Captioner) -> None:
    palette = images.pattern(seed=16).quantize(colors=32)
    _assert_same(_served(client, images.encode(palette, "PNG"), "palette.png"), _reference(model, palette))


def test_rgba_png_is_composited_on_white(client: TestClient, model: Captioner) -> None:
    rgba = images.pattern(seed=17).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, rgba.width, rgba.height // 2))  # top half fully transparent
    rgba.putalpha(alpha)
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    served = _served(client, images.encode(rgba, "PNG"), "alpha.png")
    _assert_same(served, _reference(model, on_white))
    on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    _assert_differs(served, _reference(model, on_black))


def test_animated_gif_uses_the_first_frame(client: TestClient, model: Captioner) -> None:
    first, second = images.pattern(seed=18), images.pattern(seed=19).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    data = images.animated_gif(first, second)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 2
        frame0 = gif.convert("RGB")
        gif.seek(1)
        frame1 = gif.convert("RGB")
    served = _served(client, data, "anim.gif")
    _assert_same(served, _reference(model, frame0))
    _assert_differs(served, _reference(model, frame1))


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_supported_formats(client: TestClient, fmt: str) -> None:
    served = _served(client, images.encode(images.pattern(seed=20), fmt), f"x.{fmt.lower()}")
    assert isinstance(served["text"], str)


def test_large_jpeg_reports_its_full_size_and_matches_the_library(client: TestClient, model: Captioner) -> None:
    # decoded at a reduced DCT scale on the upload thread: the reported size is still the photo's own,
    # and the caption is what the library gives for the same bytes (one preprocessing path)
    crop = model.preprocess_config.crop
    big = images.pattern(8 * crop + 40, 6 * crop + 30, seed=21)
    data = images.encode(big, "JPEG", quality=90)
    response = client.post("/caption", params={"method": "greedy"}, files={"image": ("big.jpg", data)})
    assert response.status_code == 200
    assert response.json()["image"] == {"width": big.width, "height": big.height}
    caption = model.caption([data], method="greedy")[0].captions[0]
    _assert_same(response.json()["captions"][0], (caption.text, caption.log_prob))
