"""Start the real ``captioner-serve`` process on a free loopback port and stop it again.

Standard library only: bench/serving.py loads this file too, to start the servers it times.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def serve_command() -> list[str]:
    """The installed console script when there is one, else the module (from the project root)."""
    script = shutil.which("captioner-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "service.cli"]


@dataclass
class Server:
    process: subprocess.Popen
    url: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The server's URL once uvicorn listens; ``RuntimeError`` with its output if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while self.url is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"captioner-serve did not start:\n{self.log}")
            time.sleep(0.05)
        return self.url


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    # the suite's own settings stay out, but for its temporary export cache (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_") or k == "CAPTIONER_CACHE_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


def launch(args: list[str], env: dict[str, str] | None = None) -> Server:
    """Start ``captioner-serve ARGS`` with its output collected line by line in the background."""
    process = subprocess.Popen(
        [*serve_command(), *args],
        cwd=ROOT,
        env=_clean_env(env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    server = Server(process)

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.append(line)
            match = _LISTENING.search(line)
            if match and server.url is None:
                server.url = match.group(1)

    threading.Thread(target=collect, daemon=True).start()
    return server


@contextmanager
def running_server(checkpoint: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[Server]:
    """``captioner-serve --port 0`` (the OS picks a free port; the URL is read from uvicorn's log)."""
    server = launch(["--host", "127.0.0.1", "--port", "0", "--checkpoint", str(checkpoint)], env)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        stop(server)


def stop(server: Server, timeout: float = 20.0) -> int:
    """Ctrl-C (uvicorn's graceful shutdown), then kill after ``timeout`` seconds; the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
