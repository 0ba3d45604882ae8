"""Replicas behind nginx: the config scripts/replicas-smoke.sh writes, nginx's own limits and JSON errors (against a
stand-in replica, so in seconds), and the smoke run itself (the limits, then a replica SIGKILLed under load, every
request still answered through the balancer)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "replicas-smoke.sh"
TEMPLATE = ROOT / "deploy" / "nginx" / "captioner.conf"
PHOTO_DIRS = [ROOT.parent / "shared/data/flickr8k/images", ROOT.parent / "shared/data/coco-mini/train2017"]


def _helper():
    spec = importlib.util.spec_from_file_location("replicas_load", ROOT / "scripts" / "replicas_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("replicas_load", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def test_nginx_conf_replaces_ports_and_keeps_the_rest() -> None:
    template = TEMPLATE.read_text()
    text = _helper().nginx_conf(template, 9100, [9101, 9102, 9103], user=("alice", "staff"))
    servers = re.findall(r"^\s*server 127\.0\.0\.1:(\d+) (.*);$", text, re.MULTILINE)
    primary, backup = "max_fails=3 fail_timeout=5s", "backup max_fails=0"
    assert servers == [(p, primary) for p in ("9101", "9102", "9103")] + [(p, backup) for p in ("9101", "9102", "9103")]
    assert re.findall(r"^\s*listen (\S+);$", text, re.MULTILINE) == ["127.0.0.1:9100"]
    assert re.search(r"^user alice staff;$", text, re.MULTILINE)
    directives = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "8001" not in directives and "8002" not in directives and "8080" not in directives
    for directive in ("proxy_next_upstream error timeout http_502 http_503 non_idempotent;", "keepalive 32;"):
        assert directive in text
    # nothing else changed: the same lines apart from the servers, listen and user
    changed = set(text.splitlines()) ^ set(template.splitlines())
    assert all(re.search(r"\b(server|listen|user) ", line) for line in changed), changed


def test_shipped_config_is_valid_nginx(tmp_path: Path) -> None:
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    # -t reads the file and creates the temp folders under the prefix; it binds no port
    result = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-e", str(tmp_path / "error.log"), "-c", str(TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_limits_are_read_from_the_config_once_each() -> None:
    helper = _helper()
    template = TEMPLATE.read_text()
    limits = helper.read_limits(template)
    assert limits.burst >= limits.rate > 0 and limits.connections > 0
    assert limits.header_line >= 1024 and limits.body > 10 * 2**20  # the service's own 413 covers 10 MiB
    without = re.sub(r"^\s*limit_conn \S+ \d+;$", "    # limit_conn off;", template, flags=re.MULTILINE)
    assert without != template
    with pytest.raises(ValueError, match="limit_conn"):
        helper.read_limits(without)


class _StandIn(BaseHTTPRequestHandler):
    """A replica that answers 200 to everything at once: no limits of its own, and no body read."""

    def _answer(self) -> None:
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@contextlib.contextmanager
def _stand_in() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _check_limits(url: str, limits) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = _helper().check_limits(url, limits)
    return rc, out.getvalue()


def test_the_limits_check_fails_where_nothing_limits() -> None:
    """Straight to a server without nginx's limits: every check but the first must fail, or it proves nothing."""
    helper = _helper()
    limits = helper.NginxLimits(rate=20, burst=4, connections=3, header_line=1024, body=1000)
    with _stand_in() as port:
        rc, out = _check_limits(f"http://127.0.0.1:{port}", limits)
    lines = out.splitlines()
    assert rc == 1 and lines[-1] == "limits: 6 failed", out
    assert re.fullmatch(r"  a \d+-byte header +200", lines[0]) and all("FAILED: " in line for line in lines[1:-1]), out


def test_the_shipped_limits_hold_in_nginx(tmp_path: Path) -> None:
    """deploy/nginx/captioner.conf as replicas-smoke.sh runs it, in front of a stand-in replica."""
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    helper = _helper()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (listen,) = helper.free_ports(1)
    with _stand_in() as replica:
        user = ("root", "root") if os.geteuid() == 0 else None
        conf = helper.nginx_conf(TEMPLATE.read_text(), listen, [replica], user=user)
        (prefix / "nginx.conf").write_text(conf)
        args = [nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")]
        process = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{listen}"
            deadline = time.monotonic() + 20
            while not (prefix / "nginx.pid").exists() or process.poll() is not None:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.05)
            rc, out = _check_limits(url, helper.read_limits(conf))
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert rc == 0, out
    assert re.search(
        r"^  a burst from one address +\d+ passed, then 429 JSON, Retry-After: 1; after the wait: 200$", out, re.M
    )
    assert out.splitlines()[-1] == "limits: ok"


@pytest.mark.slow
def test_replicas_smoke_survives_a_killed_replica() -> None:
    photos = next((d for d in PHOTO_DIRS if d.is_dir()), None)
    if photos is None:
        pytest.skip("no photos (../shared/data/flickr8k/images or coco-mini/train2017)")
    if _nginx() is None and not (os.geteuid() == 0 and shutil.which("apt-get")):
        pytest.skip("nginx is not installed and cannot be installed (not root, or no apt-get)")
    if not (ROOT / ".venv" / "bin" / "captioner-serve").exists():
        pytest.skip("no .venv/bin/captioner-serve")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--duration", "8", "--photos", str(photos), "--client-retries", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # nginx's own limits held (each check is a line; scripts/replicas_load.py check_limits)
    assert re.search(r"^limits: ok$", out, re.MULTILINE), out
    assert re.search(r"^  a \d+-byte header +431 JSON$", out, re.MULTILINE), out
    assert re.search(r"^  a burst from one address +\d+ passed, then 429 JSON", out, re.MULTILINE), out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"requests=(\d+) ok=(\d+) failed=(\d+)", last)
    assert m, last
    requests, ok, failed = map(int, m.groups())
    assert requests > 0 and ok == requests and failed == 0, last
    killed = re.search(r"^killed replica on port (\d+) \(pid \d+\) at t=[\d.]+s$", out, re.MULTILINE)
    assert killed, out
    # nginx passed the client's X-Request-ID to the replicas, which echoed it
    assert re.search(r"^  X-Request-ID echoed +all$", out, re.MULTILINE), out
    # after the kill, nothing was answered by the killed replica
    share = re.search(rf"answered by 127\.0\.0\.1:{killed.group(1)} .*?(\d+) after$", out, re.MULTILINE)
    assert share is None or share.group(1) == "0", out
    # the replicas logged the load's own addresses (X-Forwarded-For from nginx, a trusted proxy), not nginx's
    clients = re.search(
        r"^  clients in the replicas' logs +(\d+) of the load's (\d+) addresses \(\d+ requests\)$", out, re.M
    )
    assert clients and int(clients.group(1)) > 0, out
