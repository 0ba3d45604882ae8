"""Security headers on every response: a content security policy, no MIME sniffing, no framing.

The web page (``/``) loads only its own script and stylesheet, draws the photo from a ``blob:`` URL and
talks to its own origin, so its policy allows nothing else. The API docs (:mod:`service.routes.docs`)
load Swagger UI and ReDoc from this service too, so their policies name no other host and start from
``default-src 'none'``, each allowing only what its page was seen to need in Chromium:

* ``/docs`` (Swagger UI): its script and stylesheet, the one inline script of FastAPI's page by its
  hash (no ``'unsafe-inline'``), ``data:`` images (the stylesheet's icons), fetches of the spec and
  "Try it out" requests to this origin; forms never submit (the Authorize dialog is script-driven).
* ``/redoc`` (ReDoc): its script, inline styles (ReDoc's styled-components write ``<style>`` elements,
  and FastAPI's page has one), ``data:`` images, the spec from this origin, and its search index in a
  ``blob:`` worker. ReDoc (2.x and 3.x alike) also shows ``https://cdn.redoc.ly/redoc/logo-mini.svg``
  in its sidebar footer; the policy refuses it before any request leaves the browser (Chromium logs that
  one refusal to the console) and ReDoc then drops the image.

Nothing may frame any page (clickjacking).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.routes.docs import SWAGGER_SCRIPT_HASHES

PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_POLICY = (
    f"default-src 'none'; script-src 'self' {' '.join(SWAGGER_SCRIPT_HASHES)}; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
REDOC_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def policy_for(scope: Scope) -> str:
    """The policy for the request's path within the app (behind a proxy: without its ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path == "/redoc" or path.startswith("/redoc/"):
        return REDOC_POLICY
    if path == "/docs" or path.startswith("/docs/"):  # the page and its assets (/docs/assets/...)
        return DOCS_POLICY
    return PAGE_POLICY


class SecurityHeadersMiddleware:
    """Pure ASGI: adds the headers to each HTTP response's start message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = policy_for(scope).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in (*COMMON_HEADERS, (b"content-security-policy", policy)) if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
