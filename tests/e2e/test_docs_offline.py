"""``/docs`` and ``/redoc`` in headless Chromium with every other host cut off: both render the API.

Each request for a host other than the test server is aborted and recorded, so a page that still needs a
CDN shows up as a blank page and a failed assertion, not as a slow test. The pages must not trip their
Content-Security-Policy either (Chromium logs each refusal to the console).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.service.server import Server, running_server
from tests.service.tiny_model import save_tiny_checkpoint

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real server and Chromium

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

# ReDoc (every 2.x and 3.x release) puts this logo in its sidebar footer, hard-coded. The /redoc policy
# refuses it before any request leaves the browser (so the route below never sees it) and ReDoc then
# drops the image; it is the one refusal the page may log.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, browser: object) -> Iterator[Server]:
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", attention=False)
    with running_server(checkpoint) as running:
        yield running


@dataclass
class Offline:
    """A page whose requests to any other host are aborted; what it tried and what it logged."""

    page: object
    aborted: list[str] = field(default_factory=list)  # reached the network layer: refused by the route
    attempted: list[str] = field(default_factory=list)  # every request for another host, blocked or not
    csp: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_offline(browser, server: Server, path: str) -> Offline:
    assert server.url is not None
    own = (server.url + "/", "blob:", "data:")
    offline = Offline(browser.new_page())
    page = offline.page

    def route(route) -> None:
        if route.request.url.startswith(own):
            route.continue_()
        else:
            offline.aborted.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    page.on("request", lambda r: None if r.url.startswith(own) else offline.attempted.append(r.url))
    page.on("console", lambda m: offline.csp.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda error: offline.errors.append(str(error)))
    page.goto(f"{server.url}{path}")
    return offline


def caption_operation(browser, server: Server) -> dict:
    page = browser.new_page()
    spec = page.request.get(f"{server.url}/openapi.json").json()
    page.close()
    return spec["paths"]["/caption"]["post"]


def test_swagger_ui_renders_and_runs_with_no_other_host(browser, server: Server) -> None:
    expect = sync_api.expect
    offline = open_offline(browser, server, "/docs")
    page = offline.page
    caption = page.locator(".opblock.opblock-post", has_text="/caption")
    expect(caption).to_be_visible(timeout=30_000)
    expect(caption.locator(".opblock-summary-path")).to_have_text("/caption")
    expect(caption).to_contain_text(caption_operation(browser, server)["summary"])

    # "Try it out" on GET /health: the request goes to this origin, and its answer shows up
    page.locator(".opblock-summary", has_text="/health").click()
    page.get_by_role("button", name="Try it out").click()
    page.get_by_role("button", name="Execute").click()
    expect(page.locator(".live-responses-table .response .response-col_status")).to_have_text("200", timeout=10_000)
    page.wait_for_load_state("networkidle")

    assert not offline.errors, offline.errors
    assert not offline.csp, offline.csp
    assert not offline.attempted, f"/docs asked another host: {offline.attempted}"
    assert not offline.aborted
    page.close()


def test_redoc_renders_and_searches_with_no_other_host(browser, server: Server) -> None:
    expect = sync_api.expect
    operation = caption_operation(browser, server)
    offline = open_offline(browser, server, "/redoc")
    page = offline.page
    section = page.locator(f'[data-section-id$="operation/{operation["operationId"]}"]')
    expect(section.locator("h2")).to_have_text(operation["summary"], timeout=30_000)
    expect(section.get_by_text("/caption", exact=True).first).to_be_attached()

    # search runs in a blob: worker, which the policy must allow
    page.get_by_placeholder("Search...").press_sequentially("caption", delay=50)
    expect(page.locator('[data-role="search:results"]')).to_contain_text(operation["summary"], timeout=10_000)
    page.wait_for_load_state("networkidle")
    expect(page.locator('img[alt="redocly logo"]')).to_have_count(0)  # refused, and dropped by ReDoc

    assert not offline.errors, offline.errors
    assert not offline.aborted, f"/redoc sent requests toward another host: {offline.aborted}"
    assert set(offline.attempted) <= {REDOC_LOGO}, f"/redoc asked another host: {offline.attempted}"
    assert all(REDOC_LOGO in message and "img-src" in message for message in offline.csp), offline.csp
    page.close()
