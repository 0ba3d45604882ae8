"""The errors of :mod:`captioner.client`: one base, :class:`CaptionError`, and a subclass per kind of failure, so a
caller catches one type and tells what to do from the class (fix the request, come back later, ...).

Standard library only (so is :mod:`captioner.errors`, whose base they share with the library's errors): the reply's
reader (:mod:`captioner.client_wire`), the upload reader (:mod:`captioner.client_uploads`) and the clients all raise
them.
"""

from __future__ import annotations

from captioner.errors import CaptionerError


class CaptionError(CaptionerError):
    """A request that gave no captions: the HTTP ``status`` (None when no answer came), a stable ``code``
    (the server's, e.g. ``unsupported_image_format``) and a one-line ``message``."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[CaptionError], tuple[int | None, str, str]]:
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
