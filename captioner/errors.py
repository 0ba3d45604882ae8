"""The errors the project raises on purpose: one base, :class:`CaptionerError`, and :func:`one_line` to report them.

Every error the library (and the ``training`` and ``service`` apps built on it) raises for a reason it can name
derives from :class:`CaptionerError`, as openai-python's errors derive from ``OpenAIError``: a front end catches one
type and maps it to an exit status or an HTTP status by class, never by message text. Each subclass stays in the
module that raises it (``captioner.checkpoint.CheckpointError`` is the exception: both runtimes raise it, so it
lives here, below them) and keeps the standard base its callers catch (``ValueError`` for a bad value,
``RuntimeError`` for a failed operation).

Standard library only: the HTTP client and a torch-free runtime import this module too.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base of every error the project raises on purpose; its message says what went wrong in words."""


class CheckpointError(CaptionerError, RuntimeError):
    """A checkpoint file that is missing, unreadable, of another format, or of another version."""


# What a command line (captioner, captioner-train, captioner-eval) or the service's model loading reports as one line
# (exit status 2, or a start-up error) instead of a traceback. Besides the project's own errors: ValueError, which
# argument validation raises across Python (DecodingOptions and the command lines' own checks included), and
# OSError, a file that cannot be read or written. Anything else is a bug, and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (CaptionerError, ValueError, OSError)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (stripped), or its class name when the message is empty:
    what a one-line error report says about an exception whose message may span lines (tracebacks of
    other libraries, ONNX Runtime's status reports)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return exc.__class__.__name__
