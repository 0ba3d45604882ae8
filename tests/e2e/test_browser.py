"""The web page in headless Chromium against the real server: choose or drop a photo, see its captions."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.images import data_dir, real_photos
from tests.service.server import Server, running_server
from tests.service.tiny_model import save_tiny_checkpoint

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real server and Chromium

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def photo() -> Path:
    photos = real_photos()
    if not photos:
        pytest.skip(f"no real photos under {data_dir()} (set CAPTIONER_DATA_DIR to the shared data folder)")
    return photos[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, browser: object) -> Iterator[Server]:
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", attention=True)
    with running_server(checkpoint) as running:
        yield running


def test_caption_a_photo_in_the_browser(photo: Path, browser, server: Server) -> None:
    expect = sync_api.expect
    page = browser.new_page()
    page_errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    # the server's Content-Security-Policy must not block anything the page does (Chromium reports it here)
    page.on("console", lambda m: page_errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.on(
        "request",
        lambda request: None if request.url.startswith((server.url, "blob:", "data:")) else outside.append(request.url),
    )
    page.goto(f"{server.url}/")

    # Choose a file: it is previewed, then captioned with greedy decoding.
    page.set_input_files("#file", str(photo))
    expect(page.locator("#preview-box")).to_be_visible()
    page.select_option("#method", "greedy")
    page.click("#submit")
    caption = page.locator("#captions .caption").first
    expect(caption).to_be_visible(timeout=60_000)
    assert caption.locator(".word").count() > 0
    assert "score" in caption.locator(".score").inner_text()
    # a model without a confidence calibration: no confidence shown (never a made-up one), no min confidence
    expect(caption.locator(".confidence")).to_be_empty()
    expect(page.locator("#min-confidence")).to_be_disabled()
    expect(page.locator("#status")).to_contain_text("ms")

    # Attention: hovering a word paints its heat map over the image.
    caption.locator(".word").nth(1).hover()
    expect(page.locator("#preview")).to_have_attribute("data-word", "1")

    # Drag and drop the same photo, beam search with two captions this time.
    encoded = base64.b64encode(photo.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            return transfer;
        }""",
        encoded,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#status")).to_contain_text("dropped.jpg")
    page.select_option("#method", "beam")
    page.fill("input[name=num_captions]", "2")
    page.click("#submit")
    expect(page.locator("#captions .caption")).to_have_count(2, timeout=60_000)

    # An option out of range shows the server's message, naming the valid range.
    page.fill("input[name=beam_size]", "99")
    page.evaluate("document.querySelector('#options').noValidate = true")
    page.click("#submit")
    expect(page.locator("#status")).to_contain_text("beam_size must be an integer in [1, 20]")

    assert not page_errors, page_errors
    assert not outside, f"the page fetched from outside the server: {outside}"
    assert "frame-ancestors 'none'" in page.request.get(f"{server.url}/").headers["content-security-policy"]
    page.close()


def test_a_large_photo_is_scaled_down_in_the_browser_before_upload(
    photo: Path, browser, server: Server, tmp_path: Path
) -> None:
    """A big phone-style JPEG (EXIF: rotate 90°) goes up as an upright JPEG at twice the model's resize."""
    from PIL import Image

    big = tmp_path / "big.jpg"
    with Image.open(photo) as image:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the stored pixels must be turned 90° clockwise to stand upright
        image.convert("RGB").resize((2000, 1500)).save(big, quality=95, exif=exif)
    short = 2 * 256  # the tiny model's ResNet preprocessing resizes the short side to 256
    long = round(short * 2000 / 1500)
    expect = sync_api.expect
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(f"{server.url}/")
    expect(page.locator("#model")).to_contain_text("resnet18")  # GET /model answered: the page knows the resize
    page.set_input_files("#file", str(big))
    expect(page.locator("#preview-box")).to_be_visible()
    page.select_option("#method", "greedy")
    with (
        page.expect_request(lambda r: r.url.endswith("/caption")) as sent,
        page.expect_response(lambda r: r.url.endswith("/caption")) as answered,
    ):
        page.click("#submit")
    body = answered.value.json()
    assert answered.value.status == 200, body
    assert body["image"] == {"width": short, "height": long}  # upright 1500 x 2000, scaled
    assert int(sent.value.header_value("content-length")) < big.stat().st_size / 3
    expect(page.locator("#status")).to_contain_text(f"sent scaled to {short}×{long}")
    expect(page.locator("#captions .caption").first).to_be_visible()
    assert not page_errors, page_errors
    page.close()
