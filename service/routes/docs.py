"""``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc) with their assets served by this service, not a CDN.

FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net, so without internet they stay blank.
Here the same pages (FastAPI's ``get_swagger_ui_html`` / ``get_redoc_html``) load them from
``/docs/assets/``, which serves the files that the PyPI package ``fastapi-offline`` (MIT; a dependency of
the ``serve`` extra) ships in ``fastapi_offline/static``: ``swagger-ui-bundle.js`` and ``swagger-ui.css``
from the npm package swagger-ui-dist (Apache-2.0) and ``redoc.standalone.js`` from the npm package redoc
(MIT), byte for byte (fastapi-offline 1.7.7: swagger-ui-dist 5.32.6 and redoc 2.5.3), and a favicon.
Why a package and not the files committed here: it is kept up to date with those two npm
packages by its maintainer, ``pip install -U`` refreshes it like any other dependency, and the repository
does not carry 2.8 MB of minified JavaScript. Only its files are used (its ``FastAPIOffline`` factory
would build the app itself); the tests check that each one is there and that the pages render offline.

All URLs in the pages are relative (``openapi.json``, ``docs/assets/...``), so they keep working behind a
proxy that serves the app under a path prefix (``root_path``), and the Swagger page's one inline script
is the same for every request: its hash (:data:`SWAGGER_SCRIPT_HASHES`) is what the ``/docs``
Content-Security-Policy allows instead of ``'unsafe-inline'`` (see :mod:`service.security`).
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_PACKAGE = ("fastapi_offline", "static")
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
TITLE = "captioner"
# relative to /docs and /redoc (and to a proxy's path prefix): the spec is /openapi.json
OPENAPI_URL = "openapi.json"
ASSETS_URL = "docs/assets"

router = APIRouter(include_in_schema=False)
_assets = StaticFiles(packages=[ASSETS_PACKAGE])  # fails here, at import, when fastapi-offline is missing


def swagger_ui_html() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL,
        title=f"{TITLE} - Swagger UI",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        oauth2_redirect_url=None,  # the API takes keys, not OAuth2
    )


def redoc_html() -> HTMLResponse:
    return get_redoc_html(
        openapi_url=OPENAPI_URL,
        title=f"{TITLE} - ReDoc",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


def inline_script_hashes(html: str) -> tuple[str, ...]:
    """CSP source expressions (``'sha256-...'``) for each inline ``<script>`` of ``html``."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return tuple(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)


SWAGGER_SCRIPT_HASHES = inline_script_hashes(bytes(swagger_ui_html().body).decode())


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return swagger_ui_html()


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return redoc_html()


@router.get("/docs/assets/{name}")
async def asset(name: str, request: Request) -> Response:
    """One of :data:`ASSETS`, with ETag/Last-Modified and 304 answers (Starlette's static file handling)."""
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail="Not Found")
    return await _assets.get_response(name, request.scope)
