"""The HTTP side of :mod:`captioner.client`: the errors, the reply, how an upload and its options are
encoded, how the server's answers and ``Retry-After`` are read, and the retry policy. No I/O happens here."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import mimetypes
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

try:
    import httpx
except ImportError as exc:
    raise ImportError("captioner.client needs httpx; install it with: pip install 'captioner[client]'") from exc

from PIL import Image

from captioner.decoding import DecodingOptions, check_options_apply
from captioner.model import Caption
from captioner.tags import Tag
from captioner.transforms import ImageError, load_image

ImageInput = str | os.PathLike | bytes | Image.Image


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DecodingOptions))
# Options sent only when set off their default, which is every server's: a server from before one was added
# refuses it as an unknown parameter, even at the default value that changes nothing.
SENT_WHEN_SET = {
    "min_confidence": DecodingOptions().min_confidence,
    "guided_by_tags": DecodingOptions().guided_by_tags,
}
RETRY_STATUSES = frozenset((429, 503))  # "come back later": the server said so, the request itself was fine
BACKOFF_START = 0.5  # seconds: the first backoff window, doubled at every attempt
RETRY_AFTER_FLOOR = 1.0  # seconds: the shortest wait after a 503/429, whatever its Retry-After says
# Set by the proxy in front (deploy/nginx/captioner.conf): the status of every upstream try, in order ("503, 503").
UPSTREAM_STATUS_HEADER = "X-Captioner-Upstream-Status"
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
    """503 or 429 not tried again (no retries or retry budget left, a ``Retry-After`` over ``max_retry_wait``,
    or the proxy in front already retried it; the message says which): the server is shedding load."""


class ServerError(CaptionError):
    """Any other failure on the server's side (500, a proxy's 502/504, a body that is not a caption response)."""


class ConnectionFailed(CaptionError):
    """No answer at all (refused, reset, timed out) after the retries allowed; ``status`` is None."""


class ImageReadError(CaptionError):
    """The image could not be read or encoded here (a missing file, a broken PIL image); nothing was sent."""


# -- responses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionResponse:
    """What ``POST /caption`` answered; ``raw`` is the whole JSON body (image size, attention region, ...).

    A server from before confidence and tags sends neither: its captions' ``confidence`` is None (as a model
    without a confidence model answers), ``tags`` is empty and ``abstained`` False.
    """

    captions: list[Caption]  # best first; the library's own Caption (with its confidence), so code works with either
    options: dict[str, Any]  # the decoding options the server applied, defaults filled in
    model_id: str
    timing: dict[str, Any]  # total_ms, decode_ms, queue_ms, model_ms, batch_size
    attention_shape: tuple[int, int] | None = None  # (h, w) grid the attention weights cover; attention=True only
    tags: list[Tag] = field(default_factory=list)  # what the image shows, strongest first (empty: no class head)
    abstained: bool = False  # no caption reached min_confidence: captions is empty, the tags are still there
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
                confidence=_optional_number(c.get("confidence"), "a caption's confidence"),
            )
            for c in body["captions"]
        ]
        tags = body.get("tags") or []
        abstained = body.get("abstained", False)
        if not isinstance(tags, list):
            raise TypeError(f"tags is a list, got {type(tags).__name__}")
        if not isinstance(abstained, bool):
            raise TypeError(f"abstained is true or false, got {abstained!r}")
        shape = body.get("attention_shape")
        return cls(
            captions=captions,
            options=dict(body["options"]),
            model_id=str(body["model_id"]),
            timing=dict(body["timing"]),
            attention_shape=(int(shape[0]), int(shape[1])) if shape else None,
            tags=[Tag.from_dict(tag) for tag in tags],
            abstained=abstained,
            raw=dict(body),
        )


def _optional_number(value: object, what: str) -> float | None:
    """A JSON number or null as float or None; ``TypeError`` for anything else (``"0.5"`` and ``true`` too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is a number or null, got {value!r}")
    return float(value)


# -- requests: options, images, answers -----------------------------------------------------------


def _resolve_options(options: DecodingOptions | None, fields: Mapping[str, Any]) -> DecodingOptions:
    """``options`` with ``fields`` (DecodingOptions field names) laid over it, checked by the library itself.

    Building the :class:`DecodingOptions` here means a bad option raises the library's ``ValueError`` before
    any request is made, with the same message the CLI and the library give; so does a field the method
    does not use, even at its default value (``method="sample", beam_size=3``), as the server refuses it.
    """
    unknown = [name for name in fields if name not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; expected one of {', '.join(OPTION_NAMES)}")
    if options is None:
        resolved = DecodingOptions(**fields)
    elif not isinstance(options, DecodingOptions):
        raise TypeError(f"options must be a captioner.DecodingOptions or None, got {type(options).__name__}")
    else:
        resolved = dataclasses.replace(options, **fields) if fields else options
    check_options_apply(resolved.method, fields)
    return resolved


def _query(options: DecodingOptions, attention: bool) -> dict[str, Any]:
    """The options the method uses (``to_dict``), so the server runs exactly what was checked here; ``seed``
    only when set (None: random), and :data:`SENT_WHEN_SET` only off their default."""
    params = {
        name: value
        for name, value in options.to_dict().items()
        if value is not None and not (name in SENT_WHEN_SET and value == SENT_WHEN_SET[name])
    }
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


def _read_reply(response: httpx.Response, attempts: int, reason: str = "") -> CaptionResponse:
    """A 2xx body as a :class:`CaptionResponse`; anything else as the matching :class:`CaptionError`."""
    if not response.is_success:
        raise _error_for(response, attempts, reason)
    try:
        return CaptionResponse.from_json(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        message = f"not a caption response ({exc.__class__.__name__}: {exc}): {response.text[:200]!r}"
        raise ServerError(response.status_code, "invalid_response", message) from None


def _error_for(response: httpx.Response, attempts: int, reason: str) -> CaptionError:
    status = response.status_code
    code, message = _error_body(response)
    if status in RETRY_STATUSES:
        return ServerBusyError(status, code, f"{message} ({_gave_up(attempts, reason)})")
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


def _connection_failed(base_url: str, exc: httpx.TransportError, attempts: int, reason: str = "") -> ConnectionFailed:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_failed"
    detail = str(exc) or exc.__class__.__name__
    return ConnectionFailed(None, code, f"no answer from {base_url}: {detail} ({_gave_up(attempts, reason)})")


def _gave_up(attempts: int, reason: str = "") -> str:
    return f"gave up after {attempts} attempt{'' if attempts == 1 else 's'}" + (f": {reason}" if reason else "")


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


def _upstream_tries(response: httpx.Response) -> int:
    """How many upstreams the proxy in front sent this request to: the statuses it lists in
    :data:`UPSTREAM_STATUS_HEADER` (nginx separates tries with ", " and internal redirects with " : "); 0 without it."""
    return sum(1 for part in re.split(r"[,:]", response.headers.get(UPSTREAM_STATUS_HEADER, "")) if part.strip())


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:g}"  # a far HTTP date: 2299950000, not 2.29995e+09


def _backoff(attempt: int) -> float:
    return BACKOFF_START * 2 ** min(attempt, 30)


# -- retrying -------------------------------------------------------------------------------------


class Decision(NamedTuple):
    """What to do after an attempt: wait ``wait`` seconds and try again, or (``wait`` None) end the call."""

    wait: float | None
    reason: str = ""  # why a failure that could succeed later is not tried again; "" when no retries are left


_FINAL = Decision(None)  # an answer that is the call's result: a success, or a failure that would repeat


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is tried again and how long the client waits first; the one rule for the sync and
    async clients, which only carry it out.

    Every wait is drawn at random, so that clients refused at the same moment do not all come back at the same
    moment (a fixed wait keeps them in lockstep however long it is):

    - no answer (refused, reset, timed out): "full jitter", uniform in ``[0, min(max_retry_wait, 0.5 s * 2**attempt)]``;
    - 503 or 429: never sooner than the server asked, uniform in ``[R, 2R]`` (at most ``max_retry_wait``), where R
      is its ``Retry-After`` raised to :data:`RETRY_AFTER_FLOOR` (so ``0``, a negative number, a past date or text
      that is no number all mean the floor), or the doubling backoff, floored, when it sent none. Clients told the
      same R come back spread over R seconds: the spread grows with R, as a longer R means more work queued. A
      ``Retry-After`` over ``max_retry_wait`` is not waited for at all: the call ends at once with the server's error;
    - a 503 or 429 that the proxy in front already sent to more than one upstream (it lists every try's status in
      :data:`UPSTREAM_STATUS_HEADER`) is not tried again: the proxy's retry was its retry, and another round would
      multiply the load on replicas that are all shedding it.

    The waits of one call add up to at most ``retry_budget`` seconds: a wait drawn longer than what is left of it
    is not taken, and the call ends with the last error.
    """

    retries: int  # extra attempts after the first
    max_retry_wait: float  # seconds: the longest single wait, and the longest Retry-After the client will honour
    retry_budget: float  # seconds: the most one call waits between its attempts, all waits together
    rng: random.Random = field(compare=False, repr=False)  # the jitter's random source (seeded in tests)

    def decide(
        self, attempt: int, waited: float, *, response: httpx.Response | None = None, error: Exception | None = None
    ) -> Decision:
        """After attempt number ``attempt`` (from 0) got ``response`` or raised ``error``, with ``waited`` seconds
        already spent waiting in this call: how long to wait before the next attempt, or why there is none."""
        if error is not None:
            if not isinstance(error, _TRANSIENT):
                return _FINAL
        else:
            assert response is not None
            if response.status_code not in RETRY_STATUSES:
                return _FINAL
        if attempt >= self.retries:
            return Decision(None)
        if response is None:
            low, high = 0.0, min(self.max_retry_wait, _backoff(attempt))
        else:
            tries = _upstream_tries(response)
            if tries > 1:
                return Decision(None, f"the proxy in front already tried {tries} upstreams")
            asked = _retry_after(response.headers.get("Retry-After"))
            if asked is None:
                low = max(RETRY_AFTER_FLOOR, min(self.max_retry_wait, _backoff(attempt)))
            else:
                low = max(RETRY_AFTER_FLOOR, asked)
            if low > self.max_retry_wait:
                if asked is not None and asked > self.max_retry_wait:
                    over = f"Retry-After {_seconds(asked)} s"
                else:
                    over = f"the {RETRY_AFTER_FLOOR:g} s floor of a 503/429 wait"
                return Decision(None, f"{over} is over max_retry_wait {self.max_retry_wait:g} s")
            high = min(self.max_retry_wait, 2 * low)
        wait = self.rng.uniform(low, high)
        if waited + wait > self.retry_budget:
            return Decision(None, f"waiting {wait:.2f} s more would pass the retry budget of {self.retry_budget:g} s")
        return Decision(wait)


# Indirections so tests can see the waits without waiting.
def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
