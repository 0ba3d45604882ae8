"""The README's screenshot: the web page with the bundled model's caption of a real photo and one word's attention map.

It runs as a test so the picture can only show what the page really does; ``scripts/readme-screenshot.sh`` runs it
with ``CAPTIONER_SCREENSHOT=docs/images/web-page.png`` to regenerate the committed file (otherwise it is written to
a temp folder and checked there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.service.images import data_dir
from tests.service.server import Server, launch, stop

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # the real default model, a real server and Chromium

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

# COCO train2017 image 129648: a boy skateboarding, CC BY 2.0 (the README credits it); in the model's domain
PHOTO = "coco-mini/train2017/000000129648.jpg"
VIEWPORT = {"width": 1100, "height": 760}


@pytest.fixture(scope="module")
def default_server(browser: object) -> Iterator[Server]:
    server = launch(["--host", "127.0.0.1", "--port", "0"])  # no checkpoint: the bundled default model
    try:
        server.wait_ready(timeout=300)  # a first start exports the model to ONNX
        yield server
    finally:
        stop(server)


def test_the_readme_screenshot(browser, default_server: Server, tmp_path: Path) -> None:
    photo = data_dir() / PHOTO
    if not photo.is_file():
        pytest.skip(f"the README's photo is absent: {photo}")
    out = Path(os.environ.get("CAPTIONER_SCREENSHOT") or tmp_path / "web-page.png")
    expect = sync_api.expect
    page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
    page.goto(f"{default_server.url}/")
    # the page says what the model knows before anything is captioned
    expect(page.locator("#model-domain")).to_contain_text("Flickr8k", timeout=30_000)

    page.set_input_files("#file", str(photo))
    page.select_option("#method", "beam")
    page.click("#submit")
    caption = page.locator("#captions .caption").first
    expect(caption).to_be_visible(timeout=60_000)
    words = [w.strip() for w in caption.locator(".word").all_inner_texts()]
    assert any(w.startswith("skateboard") for w in words), words
    # hover the skateboard word: its attention map is painted over the photo
    index = next(i for i, w in enumerate(words) if w.startswith("skateboard"))
    caption.locator(".word").nth(index).hover()
    expect(page.locator("#preview")).to_have_attribute("data-word", str(index))
    page.screenshot(path=str(out), full_page=False)
    page.close()

    with Image.open(out) as shot:
        assert shot.size == (VIEWPORT["width"], VIEWPORT["height"])
        colours = shot.convert("RGB").resize((64, 48)).getcolors(64 * 48)
        assert colours is None or len(colours) > 200, "the screenshot is nearly blank"
