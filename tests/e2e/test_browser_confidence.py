"""The web page shows each caption's confidence, marks a low one plainly, shows the tags, and abstains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import images
from tests.service.server import Server, running_server
from tests.service.tiny_model import save_tiny_checkpoint

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real server and Chromium

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def unsure_server(tmp_path_factory: pytest.TempPathFactory, browser: object) -> Iterator[Server]:
    """A model with an ImageNet head (tags) whose confidence model puts every caption near 0, as for a photo
    far from its training data."""
    checkpoint = save_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "unsure.pt",
        attention=False,
        class_head=True,
        confidence=True,
        confidence_bias=-20.0,
    )
    with running_server(checkpoint) as running:
        yield running


def test_a_low_confidence_caption_is_marked_and_the_tags_are_shown(
    browser, unsure_server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "scene.png"
    image.write_bytes(images.png(seed=21))
    expect = sync_api.expect
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on("console", lambda m: page_errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{unsure_server.url}/")
    expect(page.locator("#model")).to_contain_text("confidence")  # GET /model: the model is calibrated
    expect(page.locator("#min-confidence")).to_be_enabled()

    page.set_input_files("#file", str(image))
    page.select_option("#method", "greedy")
    with page.expect_response(lambda r: r.url.endswith("/caption")) as answered:
        page.click("#submit")
    body = answered.value.json()
    assert answered.value.status == 200, body
    shown = body["captions"][0]["confidence"]
    assert shown < 0.5 and body["tags"]

    caption = page.locator("#captions .caption").first
    expect(caption).to_be_visible(timeout=60_000)
    expect(caption).to_have_class("caption low")
    expect(caption.locator(".confidence")).to_have_text(f"{round(shown * 100)} % · low confidence — likely wrong")
    tags = page.locator("#tags .tag")
    expect(tags).to_have_count(len(body["tags"]))
    first = body["tags"][0]
    expect(tags.first.locator(".tag-name")).to_have_text(first["name"])
    expect(tags.first.locator(".tag-confidence")).to_have_text(f"{round(first['confidence'] * 100)} %")
    if first["parents"]:
        expect(tags.first).to_have_attribute("title", " › ".join(first["parents"]))
    expect(page.locator("#abstained")).to_be_hidden()

    # Asking for at least 50 %: the model abstains, says so, and still shows what it sees.
    page.fill("#min-confidence", "0.5")
    page.click("#submit")
    expect(page.locator("#abstained")).to_be_visible(timeout=60_000)
    expect(page.locator("#abstained")).to_contain_text("abstained")
    expect(page.locator("#abstained")).to_contain_text("50 %")
    expect(page.locator("#captions .caption")).to_have_count(0)
    expect(page.locator("#tags .tag")).to_have_count(len(body["tags"]))
    assert not page_errors, page_errors
    page.close()
