"""``captioner-serve`` as a console script: see :mod:`captioner.console`."""

from __future__ import annotations

from captioner.console import run


def serve() -> int:
    return run("captioner-serve", "service.cli:main")
