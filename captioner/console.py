"""The console scripts' entry points: Ctrl-C at any moment is one line and exit status 130.

Each command's ``main`` catches Ctrl-C itself, but only once it runs: before that, Python spends seconds importing
torch, and a ``KeyboardInterrupt`` there would print a traceback. So every console script starts here (standard
library only), imports its command inside the guard, and runs it. ``training.console`` and ``service.console``
name their own commands.
"""

from __future__ import annotations

import importlib
import sys


def run(prog: str, target: str) -> int:
    """Import ``target`` (``module:function``) and return ``function()``; Ctrl-C anywhere in that: ``prog: interrupted``
    on stderr and 130 (the shell's status for a SIGINT)."""
    module, _, function = target.partition(":")
    try:
        main = getattr(importlib.import_module(module), function)
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def captioner() -> int:
    # The library's commands (captioner.cli) and the two that learn from a data set (rules, calibrate), which training
    # adds: the command line a user knows as ``captioner``. Named, as pyproject.toml names each script's function,
    # never imported here: no module of the library imports training.
    return run("captioner", "training.data_commands:main")
