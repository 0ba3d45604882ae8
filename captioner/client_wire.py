"""What ``POST /caption`` sends and gets back, as :mod:`captioner.client` speaks it: the decoding options checked and
turned into query parameters, the multipart field the image goes in, and the reply read into a
:class:`CaptionResponse` or the :class:`~captioner.client_errors.CaptionError` it means.

Functions of their arguments: nothing here opens a file, touches the network or sleeps (a reply is read from
an ``httpx.Response`` whose body has arrived). The options are the library's own
(:mod:`captioner.options`), so a bad one fails here with the library's message before any request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    import httpx
except ImportError as exc:
    raise ImportError("captioner.client needs httpx; install it with: pip install 'captioner[client]'") from exc

from captioner.client_errors import CaptionError, ClientRequestError, ServerBusyError, ServerError
from captioner.client_retry import RETRY_STATUSES, gave_up
from captioner.options import DecodingOptions, check_options_apply
from captioner.results import Caption, Tag

IMAGE_FIELD = "image"  # the multipart field the image goes in
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DecodingOptions))
# Options sent only when set off their default, which is every server's: a server from before one was added
# refuses it as an unknown parameter, even at the default value that changes nothing.
SENT_WHEN_SET = {
    "min_confidence": DecodingOptions().min_confidence,
    "guided_by_tags": DecodingOptions().guided_by_tags,
}


# -- the request ----------------------------------------------------------------------------------


def resolve_options(options: DecodingOptions | None, fields: Mapping[str, Any]) -> DecodingOptions:
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


def query_params(options: DecodingOptions, attention: bool) -> dict[str, Any]:
    """The query of a request: the options the method uses (``to_dict``), so the server runs exactly what was
    checked here; ``seed`` only when set (None: random), and :data:`SENT_WHEN_SET` only off their default."""
    params = {
        name: value
        for name, value in options.to_dict().items()
        if value is not None and not (name in SENT_WHEN_SET and value == SENT_WHEN_SET[name])
    }
    if attention:
        params["attention"] = "true"
    return params


# -- the reply ------------------------------------------------------------------------------------


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


def read_reply(response: httpx.Response, attempts: int, reason: str = "") -> CaptionResponse:
    """A 2xx body as a :class:`CaptionResponse`; anything else raises the matching
    :class:`~captioner.client_errors.CaptionError`. ``attempts`` and ``reason`` (why a busy server was not tried
    again) go into a :class:`~captioner.client_errors.ServerBusyError`'s message."""
    if not response.is_success:
        raise _error_for(response, attempts, reason)
    try:
        return CaptionResponse.from_json(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        message = f"not a caption response ({exc.__class__.__name__}: {exc}): {response.text[:200]!r}"
        raise ServerError(response.status_code, "invalid_response", message) from None


def _optional_number(value: object, what: str) -> float | None:
    """A JSON number or null as float or None; ``TypeError`` for anything else (``"0.5"`` and ``true`` too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is a number or null, got {value!r}")
    return float(value)


def _error_for(response: httpx.Response, attempts: int, reason: str) -> CaptionError:
    status = response.status_code
    code, message = _error_body(response)
    if status in RETRY_STATUSES:
        return ServerBusyError(status, code, f"{message} ({gave_up(attempts, reason)})")
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
