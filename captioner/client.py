"""A client for a running ``captioner-serve``: caption one image or many over HTTP.

    from captioner.client import CaptionClient, CaptionError

    with CaptionClient("http://localhost:8000", api_key="...") as client:
        reply = client.caption("dog.jpg", method="beam", beam_size=5, num_captions=2)
        print(reply.captions[0].text, reply.options["method"])

        for path, result in zip(paths, client.caption_many(paths, concurrency=8)):
            if isinstance(result, CaptionError):  # one bad image never stops the rest
                print(path, "failed:", result.code, result.message)
            else:
                print(path, result.captions[0].text)

:class:`AsyncCaptionClient` has the same methods as coroutines (``async with``, ``await client.caption(...)``).
Options are the library's :class:`~captioner.decoding.DecodingOptions`, passed as an object or as its fields,
and are checked here first, so a bad option fails at once with the library's own message.

The client retries what may succeed later: 503 and 429 (waiting as the server's ``Retry-After`` says) and
connection failures or timeouts (with exponential backoff). Every other 4xx is the request's own fault and
comes back at once as :class:`ClientRequestError` with the server's code and message.

Needs httpx: ``pip install 'captioner[client]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import mimetypes
import os
import random
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError as exc:
    raise ImportError("captioner.client needs httpx; install it with: pip install 'captioner[client]'") from exc

from PIL import Image

from captioner.decoding import DecodingOptions
from captioner.model import Caption
from captioner.transforms import ImageError, load_image

__all__ = [
    "AsyncCaptionClient",
    "CaptionClient",
    "CaptionError",
    "CaptionResponse",
    "ClientRequestError",
    "ConnectionFailed",
    "ImageReadError",
    "ServerBusyError",
    "ServerError",
]

ImageInput = str | os.PathLike | bytes | Image.Image

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DecodingOptions))
RETRY_STATUSES = frozenset((429, 503))  # "come back later": the server said so, the request itself was fine
BACKOFF_START = 0.5  # seconds before the first retry when the server gave no Retry-After
IMAGE_FIELD = "image"


# -- errors ---------------------------------------------------------------------------------------


class CaptionError(Exception):
    """A request that gave no captions: the HTTP ``status`` (None when no answer came), a stable ``code``
    (the server's, e.g. ``unsupported_image_format``) and a one-line ``message``."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # the default reduce passes only the formatted text back to __init__; this keeps errors picklable
        return (self.__class__, (self.status, self.code, self.message))


class ClientRequestError(CaptionError):
    """4xx: the request itself is wrong (bad image, too large, bad key, bad option). Never retried."""


class ServerBusyError(CaptionError):
    """503 or 429 still answered after every retry: the server is shedding load; try later or more slowly."""


class ServerError(CaptionError):
    """Any other failure on the server's side (500, a proxy's 502/504, a body that is not a caption response)."""


class ConnectionFailed(CaptionError):
    """No answer at all (refused, reset, timed out) after every retry; ``status`` is None."""


class ImageReadError(CaptionError):
    """The image could not be read or encoded here (a missing file, a broken PIL image); nothing was sent."""


# -- responses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionResponse:
    """What ``POST /caption`` answered; ``raw`` is the whole JSON body (image size, attention region, ...)."""

    captions: list[Caption]  # best first; the library's own Caption, so code works against either
    options: dict[str, Any]  # the decoding options the server applied, defaults filled in
    model_id: str
    timing: dict[str, Any]  # total_ms, decode_ms, queue_ms, model_ms, batch_size
    attention_shape: tuple[int, int] | None = None  # (h, w) grid the attention weights cover; attention=True only
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CaptionResponse:
        """Parse a ``POST /caption`` body; raises KeyError/TypeError/ValueError when it is not one."""
        captions = [
            Caption(
                text=str(c["text"]),
                tokens=[str(t) for t in c["tokens"]],
                log_prob=float(c["log_prob"]),
                score=float(c["score"]),
                attention=c.get("attention"),
            )
            for c in body["captions"]
        ]
        shape = body.get("attention_shape")
        return cls(
            captions=captions,
            options=dict(body["options"]),
            model_id=str(body["model_id"]),
            timing=dict(body["timing"]),
            attention_shape=(int(shape[0]), int(shape[1])) if shape else None,
            raw=dict(body),
        )


# -- requests: options, images, answers -----------------------------------------------------------


def _resolve_options(options: DecodingOptions | None, fields: Mapping[str, Any]) -> DecodingOptions:
    """``options`` with ``fields`` (DecodingOptions field names) laid over it, checked by the library itself.

    Building the :class:`DecodingOptions` here means a bad option raises the library's ``ValueError`` before
    any request is made, with the same message the CLI and the library give.
    """
    unknown = [name for name in fields if name not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; expected one of {', '.join(OPTION_NAMES)}")
    if options is None:
        return DecodingOptions(**fields)
    if not isinstance(options, DecodingOptions):
        raise TypeError(f"options must be a captioner.DecodingOptions or None, got {type(options).__name__}")
    return dataclasses.replace(options, **fields) if fields else options


def _query(options: DecodingOptions, attention: bool) -> dict[str, Any]:
    """The options the method uses (``to_dict``), so the server runs exactly what was checked here; ``seed``
    only when set (None: random)."""
    params = {name: value for name, value in options.to_dict().items() if value is not None}
    if attention:
        params["attention"] = "true"
    return params


def _check_image_type(image: object) -> None:
    if not isinstance(image, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        raise TypeError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")


def _upload(image: ImageInput) -> tuple[str, bytes, str]:
    """The multipart file part ``(filename, bytes, content type)`` for ``image``.

    Files and bytes go as they are: the server sniffs the format and applies EXIF orientation, and a JPEG
    stays small. A PIL image goes as lossless PNG of the upright RGB pixels the library itself would
    caption, so the server's caption equals ``Captioner.caption`` on the same image.
    """
    _check_image_type(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return IMAGE_FIELD, bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return "image.png", _encode_png(image), "image/png"
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(None, "unreadable_file", f"cannot read {path}: {exc.strerror or exc}") from exc
    return path.name, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _encode_png(image: Image.Image) -> bytes:
    try:
        upright = load_image(image, max_pixels=None)  # the server enforces its own pixel limit
    except ImageError as exc:
        raise ImageReadError(None, "invalid_image", str(exc)) from exc
    buffer = io.BytesIO()
    upright.save(buffer, "PNG", compress_level=1)  # size matters less than time on the way to a local server
    return buffer.getvalue()


def _read_reply(response: httpx.Response, attempts: int) -> CaptionResponse:
    """A 2xx body as a :class:`CaptionResponse`; anything else as the matching :class:`CaptionError`."""
    if not response.is_success:
        raise _error_for(response, attempts)
    try:
        return CaptionResponse.from_json(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        message = f"not a caption response ({exc.__class__.__name__}: {exc}): {response.text[:200]!r}"
        raise ServerError(response.status_code, "invalid_response", message) from None


def _error_for(response: httpx.Response, attempts: int) -> CaptionError:
    status = response.status_code
    code, message = _error_body(response)
    if status in RETRY_STATUSES:
        return ServerBusyError(status, code, f"{message} ({_gave_up(attempts)})")
    if 400 <= status < 500:
        return ClientRequestError(status, code, message)
    return ServerError(status, code, message)


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """The service's ``{"error": {"code", "message"}}``, or the status line and text from a proxy in front."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())[:200]
        return "http_error", f"{response.reason_phrase or 'HTTP ' + str(response.status_code)}: {text}".rstrip(": ")


def _connection_failed(base_url: str, exc: httpx.TransportError, attempts: int) -> ConnectionFailed:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_failed"
    detail = str(exc) or exc.__class__.__name__
    return ConnectionFailed(None, code, f"no answer from {base_url}: {detail} ({_gave_up(attempts)})")


def _gave_up(attempts: int) -> str:
    return f"gave up after {attempts} attempt{'' if attempts == 1 else 's'}"


# Failures worth another try: the request may never have reached the server, or it restarted mid-way.
# UnsupportedProtocol and LocalProtocolError are this side's mistakes and would fail the same way again.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable too


# Indirections so tests can see the waits without waiting.
def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


# -- clients --------------------------------------------------------------------------------------


class _ClientBase:
    """Settings and retry decisions shared by the sync and async clients (which differ only in I/O)."""

    def __init__(
        self, base_url: str, *, api_key: str | None, timeout: float, retries: int, max_retry_wait: float
    ) -> None:
        if httpx.URL(base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if max_retry_wait < 0:
            raise ValueError(f"max_retry_wait must be >= 0 seconds, got {max_retry_wait}")
        self.base_url = base_url
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self._headers = {"X-API-Key": api_key} if api_key else {}

    def _wait_before_retry(
        self, attempt: int, response: httpx.Response | None = None, error: Exception | None = None
    ) -> float | None:
        """Seconds to wait before trying again after attempt number ``attempt`` (from 0), or None to stop:
        a final answer, a failure that would repeat, or no retries left."""
        if attempt >= self.retries:
            return None
        if error is not None:
            return self._backoff(attempt) if isinstance(error, _TRANSIENT) else None
        assert response is not None
        if response.status_code not in RETRY_STATUSES:
            return None
        after = _retry_after(response.headers.get("Retry-After"))
        return min(after, self.max_retry_wait) if after is not None else self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        # jitter spreads out the retries of many clients (or caption_many's workers) refused at the same moment
        return min(self.max_retry_wait, BACKOFF_START * 2 ** min(attempt, 30) * random.uniform(1.0, 1.5))


class CaptionClient(_ClientBase):
    """Caption images with a running ``captioner-serve``; one instance may be shared by many threads.

    ``retries`` counts extra attempts after the first (on 503/429 and connection failures); a wait is never
    longer than ``max_retry_wait`` seconds, whatever ``Retry-After`` says. ``transport`` replaces httpx's
    network transport (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=max_retry_wait)
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)

    def __enter__(self) -> CaptionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def caption(
        self,
        image: ImageInput,
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        **option_fields: Any,
    ) -> CaptionResponse:
        """Caption one image (a path, the file's bytes, or a PIL image).

        ``option_fields`` are :class:`DecodingOptions` fields (``method="beam", beam_size=5``), laid over
        ``options`` when both are given. Raises ``ValueError`` for a bad option (before any request) and a
        :class:`CaptionError` subclass when the request fails.
        """
        decoding = _resolve_options(options, option_fields)  # before reading the image: no I/O for a bad option
        return self._caption(_upload(image), decoding, attention)

    def caption_many(
        self,
        images: Iterable[ImageInput],
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        concurrency: int = 4,
        **option_fields: Any,
    ) -> list[CaptionResponse | CaptionError]:
        """Caption many images, ``concurrency`` requests at a time; results in the order of ``images``.

        A failed image does not stop the others: its slot holds the :class:`CaptionError` it raised
        (check with ``isinstance(result, CaptionError)``). Bad options or an argument that is not an image
        raise at once, before any request. Files are read in the worker threads, so at most
        ``concurrency`` of them are in memory at a time.
        """
        decoding = _resolve_options(options, option_fields)
        batch = _checked_batch(images, concurrency)

        def caption_one(image: ImageInput) -> CaptionResponse | CaptionError:
            try:
                return self._caption(_upload(image), decoding, attention)
            except CaptionError as exc:
                return exc

        pool = ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(batch))), thread_name_prefix="caption")
        try:
            return list(pool.map(caption_one, batch))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an unexpected error, send nothing more

    def _caption(self, upload: tuple[str, bytes, str], options: DecodingOptions, attention: bool) -> CaptionResponse:
        params = _query(options, attention)
        attempt = 0
        while True:
            try:
                response = self._http.post("caption", params=params, files={IMAGE_FIELD: upload})
            except httpx.TransportError as exc:
                wait = self._wait_before_retry(attempt, error=exc)
                if wait is None:
                    raise _connection_failed(self.base_url, exc, attempt + 1) from exc
            else:
                wait = self._wait_before_retry(attempt, response=response)
                if wait is None:
                    return _read_reply(response, attempt + 1)
            _sleep(wait)
            attempt += 1


class AsyncCaptionClient(_ClientBase):
    """:class:`CaptionClient` for asyncio: the same arguments and methods, as coroutines."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=max_retry_wait)
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncCaptionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def caption(
        self,
        image: ImageInput,
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        **option_fields: Any,
    ) -> CaptionResponse:
        """See :meth:`CaptionClient.caption`; reading a file or encoding a PIL image runs on a thread."""
        decoding = _resolve_options(options, option_fields)
        return await self._caption(await _upload_off_loop(image), decoding, attention)

    async def caption_many(
        self,
        images: Iterable[ImageInput],
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        concurrency: int = 4,
        **option_fields: Any,
    ) -> list[CaptionResponse | CaptionError]:
        """See :meth:`CaptionClient.caption_many`: results in input order, a failed image's slot holds its
        :class:`CaptionError`. At most ``concurrency`` requests (and files in memory) at a time."""
        decoding = _resolve_options(options, option_fields)
        batch = _checked_batch(images, concurrency)
        results: list[CaptionResponse | CaptionError | None] = [None] * len(batch)
        semaphore = asyncio.Semaphore(concurrency)

        async def caption_one(index: int, image: ImageInput) -> None:
            async with semaphore:
                try:
                    results[index] = await self._caption(await _upload_off_loop(image), decoding, attention)
                except CaptionError as exc:
                    results[index] = exc

        tasks = [asyncio.ensure_future(caption_one(i, image)) for i, image in enumerate(batch)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # an unexpected error (or cancellation): the rest are not wanted any more
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results  # type: ignore[return-value]  # every slot is filled once gather returns

    async def _caption(
        self, upload: tuple[str, bytes, str], options: DecodingOptions, attention: bool
    ) -> CaptionResponse:
        params = _query(options, attention)
        attempt = 0
        while True:
            try:
                response = await self._http.post("caption", params=params, files={IMAGE_FIELD: upload})
            except httpx.TransportError as exc:
                wait = self._wait_before_retry(attempt, error=exc)
                if wait is None:
                    raise _connection_failed(self.base_url, exc, attempt + 1) from exc
            else:
                wait = self._wait_before_retry(attempt, response=response)
                if wait is None:
                    return _read_reply(response, attempt + 1)
            await _async_sleep(wait)
            attempt += 1


async def _upload_off_loop(image: ImageInput) -> tuple[str, bytes, str]:
    """:func:`_upload` on a thread when it does I/O or encodes, so the event loop keeps serving other requests."""
    if isinstance(image, bytes | bytearray | memoryview):
        return _upload(image)
    return await asyncio.to_thread(_upload, image)


def _checked_batch(images: Iterable[ImageInput], concurrency: int) -> list[ImageInput]:
    """``images`` as a list, every item checked to be an image argument before the first request goes out."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if isinstance(images, str | os.PathLike | bytes | Image.Image):
        raise TypeError("caption_many takes a list of images; use caption() for one")
    batch = list(images)
    for image in batch:
        _check_image_type(image)
    return batch
