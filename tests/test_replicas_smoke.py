"""Replicas behind nginx: the config scripts/replicas-smoke.sh writes, and the smoke run itself (a replica
SIGKILLed under load, every request still answered through the balancer)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
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
