"""Ctrl-C a command line as a terminal does, and see what it prints afterwards.

:func:`interrupt` starts a command in its own process group, waits until it is working, sends SIGINT to
the whole group (a terminal's Ctrl-C reaches every process of the foreground job, worker processes
too) and collects the output before and after.

Also runnable, for a command whose slow stage is stood in for by a sleep, so that the test does not
race a fast real one: ``python -m tests.interrupt MODULE:ATTRIBUTE ENTRY_MODULE:FUNCTION ARG...``
replaces ``ATTRIBUTE`` (dotted: ``Captioner.from_checkpoint``) of ``MODULE`` with a function that prints
``working`` on stdout and sleeps, then exits with ``FUNCTION(ARGS)``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKING = "working"  # what a stand-in prints on stdout once the command reached it


@dataclass
class Output:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Interrupted:
    returncode: int
    stdout: list[str]
    before: list[str]  # stderr lines printed before the signal
    after: list[str]  # stderr lines printed after it

    def describe(self) -> str:
        return f"exit {self.returncode}\nstderr before:\n{''.join(self.before)}\nstderr after:\n{''.join(self.after)}"


def script(name: str) -> str:
    """The installed console script ``name`` beside this interpreter."""
    return str(Path(sys.executable).parent / name)


def stand_in_command(target: str, entry: str, *argv: str) -> list[str]:
    """``entry(argv)`` with ``target`` replaced by a sleep that prints :data:`WORKING` (see the module docstring)."""
    return [sys.executable, "-m", "tests.interrupt", target, entry, *argv]


def interrupt(
    command: list[str],
    ready: Callable[[Output], bool],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    settle: float = 0.3,
) -> Interrupted:
    """Run ``command`` until ``ready(output)`` holds, Ctrl-C it, and wait for it to exit."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    output = Output()
    readers = [
        threading.Thread(target=_collect, args=(process.stdout, output.stdout), daemon=True),
        threading.Thread(target=_collect, args=(process.stderr, output.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready(output):
            if process.poll() is not None or time.monotonic() > deadline:
                for reader in readers:
                    reader.join(5)
                raise AssertionError(
                    f"{command[0]} exited ({process.returncode}) or took over {timeout} s before it was ready:\n"
                    + "".join(output.stderr + output.stdout)
                )
            time.sleep(0.05)
        time.sleep(settle)  # lines already printed reach the readers before the signal is counted
        before = len(output.stderr)
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for reader in readers:
        reader.join(10)
    return Interrupted(returncode, output.stdout, output.stderr[:before], output.stderr[before:])


def _collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _stand_in(*args, **kwargs):
    print(WORKING, flush=True)
    time.sleep(600)


def _resolve(spec: str) -> tuple[object, str]:
    module, _, path = spec.partition(":")
    *parents, name = path.split(".")
    owner: object = importlib.import_module(module)
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


if __name__ == "__main__":
    target, entry, *arguments = sys.argv[1:]
    owner, name = _resolve(target)
    setattr(owner, name, _stand_in)
    function_owner, function_name = _resolve(entry)
    sys.exit(getattr(function_owner, function_name)(arguments))
