"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from captioner.transforms import ImageError, ImageErrorCode
from service.schemas import OPTION_NAMES, option_range

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An expected failure with its HTTP status, a stable machine-readable code and a one-line message."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


# The status and API code of each reason the library gives for refusing an image: by its code, never its
# wording, so rewording a message cannot change a status.
IMAGE_ERRORS: dict[ImageErrorCode, tuple[int, str]] = {
    ImageErrorCode.UNSUPPORTED_FORMAT: (415, "unsupported_image_format"),
    ImageErrorCode.TOO_LARGE: (413, "image_too_large"),
    ImageErrorCode.EMPTY_FILE: (400, "empty_file"),
    ImageErrorCode.NO_SUCH_FILE: (400, "invalid_image"),
    ImageErrorCode.INVALID_IMAGE: (400, "invalid_image"),
}


def image_error(exc: ImageError) -> ApiError:
    """The library's image error as the API's: unsupported format 415, too large 413, else 400."""
    status, code = IMAGE_ERRORS[exc.code]
    return ApiError(status, code, str(exc))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_option",
    503: "not_ready",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_option", describe_validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {exc.__class__.__name__}")


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic errors -> one line; the option's valid range comes first so clients can fix the request."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "body")]
        name = loc[-1] if loc else "request"
        valid = option_range(name)
        given = err.get("input")
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown option {name!r}; expected one of {', '.join(OPTION_NAMES)}")
        elif valid:
            parts.append(f"{name} must be {valid}, got {given!r}")
        else:
            parts.append(f"{name}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts)
