"""The HTTP/1.1 connection protocol ``captioner-serve`` runs: uvicorn's h11 one, with limits on headers.

uvicorn picks httptools when it is installed (``uvicorn[standard]``), and neither of its protocols bounds
how long a client may take to send a request's headers: a connection that sends half a request line and
then nothing is held for as long as the client likes, and with httptools the headers' size is not bounded
either (an audit sent a 1 MB header, 20,000 header fields, and five endless header streams that added
0.5 GB). This protocol is h11's (which buffers at most ``h11_max_incomplete_event_size`` bytes of an
unfinished request line and headers, then refuses the request) plus:

- a cap on open connections (each may hold a header buffer and uvicorn's 64 KiB of unread body): one
  over it is answered 503 and closed before anything is read;
- a deadline on each request's line and headers, counted from the connection's start or from the end of
  the previous response: a client that has not sent them by then gets a 408 and the connection closes;
- JSON bodies (the service's error shape) for the protocol's own refusals: 408, 431 when the headers are
  over the size limit, 400 for a malformed request, instead of uvicorn's plain text.

The header field count, and the size of headers that arrived whole, are checked by :class:`HeaderLimits`,
an ASGI middleware (its answer gets the request id and security headers like any other); the body is the
route's business (``service.uploads`` times it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_response


def error_bytes(status: int, reason: str, code: str, message: str, *, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response with the service's JSON error body that closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{retry}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def guarded_h11_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a ``header_timeout_s`` deadline on each request's headers, and at most
    ``max_connections`` open connections: one more is answered 503 and closed at once (see above)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # this one is already counted
                message = f"the server has {max_connections} connections open, its limit; retry later"
                transport.write(error_bytes(503, "Service Unavailable", "overloaded", message, retry_after=1))
                transport.close()
                return
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            # Armed for the request *after* the one just answered, before uvicorn goes on to a pipelined one.
            if not self.transport.is_closing():
                self._arm_header_deadline()
            super().on_response_complete()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_late, self.cycle)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self, cycle_when_armed: object) -> None:
            """The deadline passed: unless a request's headers came in since it was armed, answer 408 and close.

            A new request starts a new cycle, so the same cycle means no new request has been parsed yet;
            an idle keep-alive connection is closed by uvicorn's own (shorter) keep-alive timeout first."""
            self._header_deadline = None
            if self.transport.is_closing() or self.cycle is not cycle_when_armed:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # the request before is still being answered; its response re-arms the deadline
            self.logger.info("request headers not received within %g s: 408", header_timeout_s)
            message = f"the request's headers did not arrive within {header_timeout_s:g} s"
            self.transport.write(error_bytes(408, "Request Timeout", "request_timeout", message))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """h11 refused the request: over the header size limit (431), or malformed (400); JSON either way."""
            buffered, _ = self.conn.trailing_data
            limit = self.config.h11_max_incomplete_event_size
            if limit is not None and len(buffered) > limit:
                response = error_bytes(
                    431,
                    "Request Header Fields Too Large",
                    "headers_too_large",
                    f"the request line and headers are over the limit of {limit:,} bytes",
                )
            else:
                response = error_bytes(400, "Bad Request", "bad_request", "malformed HTTP request")
            self.logger.info("refused a request the HTTP parser could not take: %s", response.split(b"\r\n")[0])
            self.transport.write(response)
            self.transport.close()

    return GuardedH11Protocol


class HeaderLimits:
    """Pure ASGI: a request with more than ``max_count`` header fields, or whose headers total more than
    ``max_bytes``, is answered 431 without going further.

    The protocol's buffer limit only holds while the headers are incomplete: headers that arrive whole in one
    read are parsed whatever their size, so their size is checked here too."""

    def __init__(self, app: ASGIApp, *, max_count: int, max_bytes: int) -> None:
        self.app = app
        self.max_count = max_count
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
            message = None
            if len(headers) > self.max_count:
                message = f"the request has {len(headers)} header fields; the limit is {self.max_count}"
            elif size > self.max_bytes:
                message = f"the request's headers are over the limit of {self.max_bytes:,} bytes"
            if message is not None:
                response = error_response(431, "headers_too_large", message, {"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
