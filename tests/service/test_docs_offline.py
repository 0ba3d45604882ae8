"""``/docs`` and ``/redoc`` load everything from the service itself (no CDN), under a policy naming no host."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from service.routes.docs import ASSETS, inline_script_hashes
from service.security import DOCS_POLICY, PAGE_POLICY, REDOC_POLICY, policy_for

# every URL FastAPI's two pages can name: stylesheet/favicon links, scripts, ReDoc's spec-url, Swagger's url
_URL = re.compile(r"""(?:\bsrc|\bhref|\bspec-url)="([^"]*)"|\burl: '([^']*)'""")
_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


def referenced_urls(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


@pytest.mark.parametrize(
    ("page", "needs"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"}),
    ],
)
def test_docs_pages_reference_only_their_own_origin(client: TestClient, page: str, needs: set[str]) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http://" not in html and "https://" not in html, "the page names another host"
    urls = referenced_urls(html)
    assert {url.rsplit("/", 1)[-1] for url in urls} == needs
    page_url = f"{client.base_url}{page}"
    for url in urls:
        assert not url.startswith("//") and not urlsplit(url).scheme, url
        absolute = urljoin(page_url, url)
        assert urlsplit(absolute).netloc == urlsplit(page_url).netloc, absolute
        asset = client.get(absolute)
        assert asset.status_code == 200, absolute
        expected = _TYPES[url[url.rindex(".") :]]
        assert expected in asset.headers["content-type"], (absolute, asset.headers["content-type"])
        assert len(asset.content) > 1000 or url.endswith(".png"), absolute  # a real file, not a stub


def test_assets_are_cached_and_only_the_listed_files_are_served(client: TestClient) -> None:
    assert set(ASSETS) == {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"}
    first = client.get("/docs/assets/swagger-ui.css")
    assert first.status_code == 200 and first.headers["etag"]
    again = client.get("/docs/assets/swagger-ui.css", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    for name in ("index.html", "..%2F__init__.py", "core.py", "favicon.ico"):
        missing = client.get(f"/docs/assets/{name}")
        assert missing.status_code == 404, name
        assert missing.json()["error"]["code"] == "not_found"


def test_docs_policies_name_no_host_and_allow_only_the_swagger_pages_own_script(client: TestClient) -> None:
    docs, redoc = client.get("/docs"), client.get("/redoc")
    assert docs.headers["content-security-policy"] == DOCS_POLICY
    assert redoc.headers["content-security-policy"] == REDOC_POLICY
    assert client.get("/docs/assets/redoc.standalone.js").headers["content-security-policy"] == DOCS_POLICY
    for policy in (DOCS_POLICY, REDOC_POLICY):
        assert "http" not in policy and "*" not in policy, policy
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        script_src = next(d for d in policy.split("; ") if d.startswith("script-src "))
        assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
    # the hash in the policy is the one of the inline script the page really serves
    served = inline_script_hashes(docs.text)
    assert len(served) == 1 and served[0] in DOCS_POLICY
    assert not inline_script_hashes(redoc.text)


def test_policy_follows_the_path_within_the_app_behind_a_proxy_prefix() -> None:
    assert policy_for({"path": "/api/docs", "root_path": "/api"}) == DOCS_POLICY
    assert policy_for({"path": "/api/redoc", "root_path": "/api"}) == REDOC_POLICY
    assert policy_for({"path": "/redoc", "root_path": ""}) == REDOC_POLICY
    assert policy_for({"path": "/docs/assets/swagger-ui.css"}) == DOCS_POLICY
    assert policy_for({"path": "/docsx"}) == PAGE_POLICY
    assert policy_for({"path": "/"}) == PAGE_POLICY
