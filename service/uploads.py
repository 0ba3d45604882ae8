"""Read a multipart upload into memory with hard caps; nothing is ever spooled to disk.

Starlette's ``UploadFile`` spools large parts to temporary files and reads the whole body before the
route runs; this reader instead counts bytes as they stream in and stops at the limit, so an
oversized upload is refused after at most ``limit`` bytes (or at once, from its Content-Length).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from captioner.errors import one_line
from service.errors import ApiError
from service.upload_budget import Upload

MAX_PARTS = 32  # a caption request has one file and ten options
MAX_FIELD_BYTES = 1024  # an option's value
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and option fields around the file


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    """The parts of a multipart body: text fields and files (both held in memory)."""

    fields: dict[str, str]
    files: dict[str, bytearray]  # as received: no second copy of an upload


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


async def _timed_body(request: Request, upload: Upload) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, under ``upload``'s time rules (408 or 503 when one is broken).

    Reads the ASGI ``receive`` itself rather than ``request.stream()``: a receive cancelled by a deadline
    can simply be awaited again, which an async generator cannot."""
    while True:
        message = None
        with anyio.move_on_after(max(0.0, upload.next_deadline() - time.monotonic())):
            message = await request.receive()
        if message is None:
            upload.deadline_passed()  # raises, or the upload now holds a slow slot and waits on
            continue
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            upload.arrived()
            return


async def read_form(request: Request, *, max_file_bytes: int, upload: Upload) -> Form:
    """Parse ``multipart/form-data`` from ``request``, refusing more than ``max_file_bytes`` per file; the body's
    bytes and timing count against ``upload`` (see service.upload_budget)."""
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    too_large = ApiError(413, "payload_too_large", f"upload exceeds the limit of {_human(max_file_bytes)} per image")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header: {length!r}")
        if int(length) > max_body:
            raise too_large
    content_type = request.headers.get("content-type")
    if not content_type:
        if length == "0" or (length is None and "transfer-encoding" not in request.headers):
            raise ApiError(400, "empty_body", "empty request: send multipart/form-data with the image in field 'image'")
        raise ApiError(415, "unsupported_media_type", "missing Content-Type: send multipart/form-data")
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected multipart/form-data with the image in field 'image', got {media_type.decode('latin-1')!r}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary parameter")

    parts: list[_Part] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise ApiError(400, "bad_request", f"too many form parts (the limit is {MAX_PARTS})")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        part = parts[-1]
        _, disposition = parse_options_header(part.headers.get("content-disposition", ""))
        name, filename = disposition.get(b"name"), disposition.get(b"filename")
        part.name = name.decode("utf-8", "replace") if name is not None else None
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data.extend(data[start:end])
        if part.filename is None and part.name != "image" and len(part.data) > MAX_FIELD_BYTES:
            raise ApiError(400, "bad_request", f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
        if len(part.data) > max_file_bytes:
            raise too_large

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    received = 0
    try:
        async for chunk in _timed_body(request, upload):
            received += len(chunk)
            if received > max_body:
                raise too_large
            upload.hold(len(chunk))
            parser.write(chunk)
        if received == 0:
            raise ApiError(400, "empty_body", "empty request: send multipart/form-data with the image in field 'image'")
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {one_line(exc)}") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client disconnected before the upload finished") from None

    fields: dict[str, str] = {}
    files: dict[str, bytearray] = {}
    for part in parts:
        if part.name is None:
            raise ApiError(400, "bad_request", "a form part has no name (Content-Disposition: form-data; name=...)")
        if part.filename is not None or part.name == "image":
            files[part.name] = part.data
        else:
            try:
                fields[part.name] = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "bad_request", f"form field {part.name!r} is not UTF-8 text") from None
    return Form(fields, files)
