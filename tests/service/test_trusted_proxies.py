"""CAPTIONER_TRUSTED_PROXIES: X-Forwarded-For names the client only when a listed proxy sent it.

The process tests start the real ``captioner-serve`` (uvicorn's proxy-headers middleware is configured there, not
in the app) and read the client address from its JSON access log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.service.server import Server, running_server

CLIENT = "203.0.113.7"  # TEST-NET-3: an address the loopback test client cannot have


def test_trusted_proxies_are_read_as_addresses_and_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().trusted_proxies == []
    monkeypatch.setenv("CAPTIONER_TRUSTED_PROXIES", " 127.0.0.1, 10.0.0.0/8 ,::1,fd00::/8")
    assert Settings().trusted_proxies == ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("10.0.0.1/8", "host bits set"),  # uvicorn would take it as a host name that never matches
        ("proxy.internal", "not an IP address or network"),
        ("*", "every client choose the address"),
        ("10.0.0.0/33", "not an IP address or network"),
    ],
)
def test_anything_but_addresses_and_networks_is_refused(entry: str, says: str) -> None:
    with pytest.raises(ValidationError, match="trusted_proxies") as failure:
        Settings(trusted_proxies=f"127.0.0.1,{entry}")
    assert says in str(failure.value) and entry in str(failure.value)


def _logged_clients(server: Server, forwarded_for: list[str | None]) -> list[str]:
    """GET /health once per X-Forwarded-For value (None: no header); the client host of each JSON log line."""
    ids = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for index, value in enumerate(forwarded_for):
            headers = {"X-Request-ID": f"xff-{index}"}
            if value is not None:
                headers["X-Forwarded-For"] = value
            assert client.get("/health", headers=headers).status_code == 200
            ids.append(f"xff-{index}")
    # a line is logged once its response is sent, so the last one may come just after the client has its answer
    deadline = time.monotonic() + 10
    while True:
        records = {r["request_id"]: r for r in map(json.loads, (x for x in list(server.lines) if x.startswith("{")))}
        if set(ids) <= records.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert set(ids) <= records.keys(), server.log
    return [records[request_id]["client"].rsplit(":", 1)[0] for request_id in ids]


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        # (CAPTIONER_TRUSTED_PROXIES, the logged client for: no header, CLIENT, "spoofed, CLIENT", "CLIENT, 127.0.0.9")
        pytest.param(None, ["127.0.0.1"] * 4, id="default"),  # the header is ignored
        pytest.param("127.0.0.1", ["127.0.0.1", CLIENT, CLIENT, "127.0.0.9"], id="loopback-address"),
        # a server start each (~5 s): the network forms run with the slow tests
        pytest.param("10.0.0.0/8", ["127.0.0.1"] * 4, id="other-network", marks=pytest.mark.slow),
        pytest.param(  # 127.0.0.9 is in a trusted network too: a proxy, not the client
            "10.0.0.0/8,127.0.0.0/8",
            ["127.0.0.1", CLIENT, CLIENT, CLIENT],
            id="loopback-network",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tiny_checkpoint: Path, trusted: str | None, expected: list[str]
) -> None:
    env = {"CAPTIONER_ACCESS_LOG": "json"}
    if trusted is not None:
        env["CAPTIONER_TRUSTED_PROXIES"] = trusted
    with running_server(tiny_checkpoint, env) as server:
        # a client that prepends an address of its choice does not get it logged: each proxy appends the peer
        # it saw, and the client is the last address that is not a trusted proxy
        assert _logged_clients(server, [None, CLIENT, f"198.51.100.1, {CLIENT}", f"{CLIENT}, 127.0.0.9"]) == expected
