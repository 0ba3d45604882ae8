"""Request ids on every response, and an optional JSON access log line per request.

A client or a load balancer may send ``X-Request-ID`` (nginx: ``proxy_set_header X-Request-ID
$request_id``); a well-formed one is kept, anything else (missing, too long, odd characters that could
forge log lines) is replaced by a fresh id. Either way the response echoes it, so one id follows a
request through the balancer's log, this service's log and the client's error report.

With ``CAPTIONER_ACCESS_LOG=json`` the logger ``captioner.access`` writes one JSON object per request
instead of uvicorn's text line: time, request id, method, path, status, duration, bytes in and client.
The client is the connection's peer, or the address in ``X-Forwarded-For`` when the peer is one of
``CAPTIONER_TRUSTED_PROXIES`` (uvicorn's proxy-headers middleware, set up by ``captioner-serve``, rewrites it
before this middleware sees the request).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

access_log = logging.getLogger("captioner.access")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when well formed, else a new random one (32 hex digits)."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI: sets ``scope["state"]["request_id"]``, echoes it as a header, optionally logs JSON lines."""

    def __init__(self, app: ASGIApp, *, json_log: bool) -> None:
        self.app = app
        self.json_log = json_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        received = 0

        async def receive_counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive_counting, send_with_id)
        finally:
            if self.json_log:
                client = scope.get("client")
                record = {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
                    "bytes_in": received,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                }
                access_log.info(json.dumps(record))
