"""captioner.client: against the real ``captioner-serve`` process, and its retry rules against a fake server."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import pickle
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from captioner import client as client_module
from captioner.client import (
    AsyncCaptionClient,
    CaptionClient,
    CaptionError,
    CaptionResponse,
    ClientRequestError,
    ConnectionFailed,
    ImageReadError,
    ServerBusyError,
    ServerError,
)
from captioner.decoding import DecodingOptions
from captioner.model import Caption
from tests.service import images
from tests.service.server import Server, running_server

# -- against the real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Server]:
    # the client is under test, not the backends: torch skips the ONNX export at start
    with running_server(tiny_checkpoint, {"CAPTIONER_BACKEND": "torch"}) as running:
        yield running


def _direct(server: Server, data: bytes, **params: object) -> httpx.Response:
    """The same request made by hand, for what the server itself answers."""
    return httpx.post(f"{server.url}/caption", params=params, files={"image": ("x.png", data)}, timeout=60)


def _assert_same_captions(reply: CaptionResponse, body: dict) -> None:
    assert all(isinstance(c, Caption) for c in reply.captions)
    assert [c.text for c in reply.captions] == [c["text"] for c in body["captions"]]
    assert [c.tokens for c in reply.captions] == [c["tokens"] for c in body["captions"]]
    assert [c.log_prob for c in reply.captions] == pytest.approx([c["log_prob"] for c in body["captions"]], abs=1e-4)
    assert reply.model_id == body["model_id"]


@pytest.fixture
def picture(tmp_path: Path) -> tuple[bytes, Path, object]:
    """One image three ways: PNG bytes, a file, and the PIL image they encode."""
    image = images.pattern(80, 56, seed=7)
    data = images.encode(image)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    return data, path, image


@pytest.mark.slow
def test_caption_gives_what_the_server_gives(server: Server, picture: tuple) -> None:
    data, path, image = picture
    expected = _direct(server, data).json()
    with CaptionClient(server.url) as client:
        for source in (data, path, str(path), image):
            reply = client.caption(source)
            _assert_same_captions(reply, expected)
            assert reply.raw["image"] == {"width": 80, "height": 56}
            assert reply.options == expected["options"] and reply.timing["batch_size"] >= 1


@pytest.mark.slow
def test_async_caption_gives_what_the_server_gives(server: Server, picture: tuple) -> None:
    data, path, image = picture
    expected = _direct(server, data).json()

    async def scenario() -> list[CaptionResponse]:
        async with AsyncCaptionClient(server.url) as client:
            return [await client.caption(source) for source in (data, path, image)]

    for reply in asyncio.run(scenario()):
        _assert_same_captions(reply, expected)


@pytest.mark.slow
def test_options_round_trip(server: Server, picture: tuple) -> None:
    data = picture[0]
    expected = _direct(server, data, method="beam", beam_size=2, num_captions=2).json()
    with CaptionClient(server.url) as client:
        by_fields = client.caption(data, method="beam", beam_size=2, num_captions=2)
        by_object = client.caption(data, DecodingOptions(method="beam", beam_size=2), num_captions=2)
        with_attention = client.caption(data, method="greedy", attention=True)
    for reply in (by_fields, by_object):
        assert len(reply.captions) == 2
        assert reply.options["method"] == "beam" and reply.options["beam_size"] == 2
        _assert_same_captions(reply, expected)
    assert with_attention.options["attention"] is True and with_attention.attention_shape is not None
    h, w = with_attention.attention_shape
    assert len(with_attention.captions[0].attention[0]) == h * w


def _batch(tmp_path: Path) -> tuple[list, list[int]]:
    """Images of different widths (the server reports each one's size, so order shows), a text file third."""
    widths = [40, 48, 0, 56, 64]
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    batch = [text if w == 0 else images.png(seed=w, width=w, height=32) for w in widths]
    return batch, widths


def _check_batch_results(server: Server, results: list, widths: list[int]) -> None:
    refused = _direct(server, b"not an image at all\n")
    assert len(results) == len(widths)
    for result, width in zip(results, widths, strict=True):
        if width == 0:
            assert isinstance(result, ClientRequestError)
            assert result.status == refused.status_code == 415
            assert (
                result.code == refused.json()["error"]["code"] and result.message == refused.json()["error"]["message"]
            )
        else:
            assert isinstance(result, CaptionResponse), result
            assert result.raw["image"]["width"] == width


@pytest.mark.slow
def test_caption_many_keeps_order_and_isolates_failures(server: Server, tmp_path: Path) -> None:
    batch, widths = _batch(tmp_path)
    with CaptionClient(server.url) as client:
        results = client.caption_many(batch, method="greedy", concurrency=3)
        missing = client.caption_many([tmp_path / "nowhere.png", images.png()], method="greedy")
    _check_batch_results(server, results, widths)
    assert isinstance(missing[0], ImageReadError) and missing[0].status is None and "nowhere.png" in missing[0].message
    assert isinstance(missing[1], CaptionResponse)


@pytest.mark.slow
def test_async_caption_many_keeps_order_and_isolates_failures(server: Server, tmp_path: Path) -> None:
    batch, widths = _batch(tmp_path)

    async def scenario() -> list:
        async with AsyncCaptionClient(server.url) as client:
            return await client.caption_many(batch, method="greedy", concurrency=3)

    _check_batch_results(server, asyncio.run(scenario()), widths)


# -- against a fake server ------------------------------------------------------------------------


OK_BODY = {
    "captions": [{"text": "a dog", "tokens": ["a", "dog"], "log_prob": -1.5, "score": -1.5, "attention": None}],
    "options": {**DecodingOptions().to_dict(), "attention": False},
    "model_id": "fake-000000000000",
    "image": {"width": 8, "height": 8},
    "attention_shape": None,
    "attention_region": None,
    "timing": {"total_ms": 1.0, "decode_ms": 0.1, "queue_ms": 0.1, "model_ms": 0.5, "batch_size": 1},
}


def _ok() -> httpx.Response:
    return httpx.Response(200, json=OK_BODY)


def _error(
    status: int, code: str = "not_ready", retry_after: str | None = None, upstreams: str | None = None
) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    if upstreams is not None:  # what nginx in front adds: every upstream try's status
        headers["X-Captioner-Upstream-Status"] = upstreams
    return httpx.Response(status, headers=headers, json={"error": {"code": code, "message": f"{code} here"}})


class FakeServer:
    """Answers with ``replies`` in turn (the last one for ever), recording every request it gets; each answer is a
    fresh copy, as from a real server (an httpx client binds the response it gets to its own I/O)."""

    def __init__(self, *replies: httpx.Response | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    def client(self, **kwargs: Any) -> CaptionClient:
        kwargs.setdefault("rng", random.Random(0))  # the jitter, repeatable
        return CaptionClient("http://fake", transport=httpx.MockTransport(self), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncCaptionClient:
        kwargs.setdefault("rng", random.Random(0))
        return AsyncCaptionClient("http://fake", transport=httpx.MockTransport(self), **kwargs)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds the client would have slept, sync or async; nothing really sleeps."""
    slept: list[float] = []

    async def async_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", slept.append)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    return slept


def test_503_with_retry_after_is_retried_until_it_succeeds(waits: list[float]) -> None:
    fake = FakeServer(_error(503, retry_after="2"), _error(429, "rate_limited", retry_after="3"), _ok())
    with fake.client(retries=3) as client:
        reply = client.caption(b"image")
    assert reply.captions[0].text == "a dog" and reply.model_id == "fake-000000000000"
    # never sooner than asked, and at most twice that: the jitter that keeps clients apart
    assert len(fake.requests) == 3 and 2.0 <= waits[0] <= 4.0 and 3.0 <= waits[1] <= 6.0


def test_503_for_ever_gives_server_busy_after_every_retry(waits: list[float]) -> None:
    fake = FakeServer(_error(503, "overloaded", retry_after="1"))
    with fake.client(retries=2) as client, pytest.raises(ServerBusyError) as caught:
        client.caption(b"image")
    assert len(fake.requests) == 3 and len(waits) == 2 and all(1.0 <= w <= 2.0 for w in waits)
    assert caught.value.status == 503 and caught.value.code == "overloaded"
    assert caught.value.message == "overloaded here (gave up after 3 attempts)"


def _first_waits(waits: list[float], replies: list[httpx.Response | Exception], clients: int = 50) -> list[float]:
    """The first wait of each of ``clients`` clients (each with its own random source, as separate processes
    have) that all got ``replies`` at the same moment: sync ones, then as many async ones at once."""
    for seed in range(clients):
        with FakeServer(*replies, _ok()).client(rng=random.Random(seed)) as client:
            client.caption(b"image")
    sync = list(waits)
    waits.clear()

    async def scenario() -> None:
        fakes = [FakeServer(*replies, _ok()) for _ in range(clients)]
        async with contextlib.AsyncExitStack() as stack:
            pool = [
                await stack.enter_async_context(fake.async_client(rng=random.Random(seed)))
                for seed, fake in enumerate(fakes)
            ]
            await asyncio.gather(*(client.caption(b"image") for client in pool))

    asyncio.run(scenario())
    assert sorted(waits) == sorted(sync)  # the async clients wait exactly as the sync ones
    return sync


def test_clients_told_the_same_retry_after_come_back_spread_out(waits: list[float]) -> None:
    spread = _first_waits(waits, [_error(503, "overloaded", retry_after="4")])
    assert len(spread) == 50 and len(set(spread)) == 50  # no two clients in lockstep
    assert all(4.0 <= w <= 8.0 for w in spread)  # never sooner than asked, within the [R, 2R] window
    assert max(spread) - min(spread) >= 2.0  # over at least half of it


def test_clients_that_lost_the_connection_come_back_spread_out(waits: list[float]) -> None:
    spread = _first_waits(waits, [httpx.ConnectError("connection refused")])
    assert len(set(spread)) == 50 and all(0.0 <= w <= 0.5 for w in spread)  # full jitter: [0, 0.5 s]
    assert max(spread) - min(spread) >= 0.25


@pytest.mark.parametrize(
    "retry_after", ["0", "-5", "soon", "", "nan", "-inf", "Wed, 21 Oct 2015 07:28:00 GMT", "Tue, 99 Foo 2099 7:00"]
)
def test_retry_after_that_says_now_or_nothing_still_waits_the_floor(waits: list[float], retry_after: str) -> None:
    fake = FakeServer(_error(503, retry_after=retry_after), _ok())
    with fake.client() as client:
        client.caption(b"image")
    assert len(fake.requests) == 2 and len(waits) == 1 and 1.0 <= waits[0] <= 2.0  # floor 1 s


def test_retry_after_as_a_future_date_is_waited_for(waits: list[float]) -> None:
    when = email.utils.formatdate(time.time() + 10, usegmt=True)  # whole seconds: 9 to 10 s from now
    fake = FakeServer(_error(503, retry_after=when), _ok())
    with fake.client() as client:
        client.caption(b"image")
    assert len(waits) == 1 and 5.0 <= waits[0] <= 20.0


@pytest.mark.parametrize("retry_after", ["7200", "1e9", "inf", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_retry_after_over_max_retry_wait_gives_up_at_once(waits: list[float], retry_after: str) -> None:
    fake = FakeServer(_error(503, "overloaded", retry_after=retry_after), _ok())
    with fake.client(max_retry_wait=30) as client, pytest.raises(ServerBusyError) as caught:
        client.caption(b"image")
    assert len(fake.requests) == 1 and waits == []  # no sleeping for hours, nor a retry before it is due
    assert caught.value.status == 503 and caught.value.code == "overloaded"
    assert caught.value.message.startswith("overloaded here (gave up after 1 attempt: Retry-After ")
    assert caught.value.message.endswith(" s is over max_retry_wait 30 s)")


def test_retry_after_at_max_retry_wait_is_waited_for_exactly(waits: list[float]) -> None:
    fake = FakeServer(_error(503, retry_after="1.5"), _ok())
    with fake.client(max_retry_wait=1.5) as client:
        client.caption(b"image")
    assert waits == [1.5]  # the [R, 2R] window is cut to max_retry_wait


def test_max_retry_wait_under_the_floor_retries_no_503(waits: list[float]) -> None:
    fake = FakeServer(_error(503, retry_after="0"), _ok())
    with fake.client(max_retry_wait=0.5) as client, pytest.raises(ServerBusyError) as caught:
        client.caption(b"image")
    assert waits == [] and "the 1 s floor of a 503/429 wait is over max_retry_wait 0.5 s" in caught.value.message


def test_without_retry_after_the_waits_back_off_with_jitter(waits: list[float]) -> None:
    fake = FakeServer(_error(429, "rate_limited"))
    with fake.client(retries=4, max_retry_wait=3.0) as client, pytest.raises(ServerBusyError):
        client.caption(b"image")
    # the doubling backoff (0.5, 1, 2, 4 s) floored at 1 s and cut at max_retry_wait, each up to twice that
    assert len(waits) == 4
    assert 1.0 <= waits[0] <= 2.0 and 1.0 <= waits[1] <= 2.0 and 2.0 <= waits[2] <= 3.0 and waits[3] == 3.0


def test_the_retry_budget_stops_retrying(waits: list[float]) -> None:
    busy = FakeServer(_error(503, "overloaded", retry_after="10"))
    with busy.client(retries=10, retry_budget=25) as client, pytest.raises(ServerBusyError) as caught:
        client.caption(b"image")
    assert 1 <= len(waits) <= 2 and sum(waits) <= 25 and len(busy.requests) == len(waits) + 1
    assert "would pass the retry budget of 25 s)" in caught.value.message

    waits.clear()
    down = FakeServer(httpx.ConnectError("connection refused"))  # full jitter: every wait could be short
    with down.client(retries=100, retry_budget=3) as client, pytest.raises(ConnectionFailed) as caught:
        client.caption(b"image")
    assert sum(waits) <= 3 and len(down.requests) == len(waits) + 1 < 10
    assert "would pass the retry budget of 3 s)" in caught.value.message

    nothing = FakeServer(_error(503, retry_after="1"), _ok())
    with nothing.client(retry_budget=0) as client, pytest.raises(ServerBusyError):
        client.caption(b"image")
    assert len(nothing.requests) == 1


@pytest.mark.parametrize("upstreams", ["503, 503", "502, 502", "502, 503", "503 : 503"])
def test_a_503_the_proxy_already_retried_is_not_retried(waits: list[float], upstreams: str) -> None:
    fake = FakeServer(_error(503, "overloaded", retry_after="1", upstreams=upstreams), _ok())
    with fake.client() as client, pytest.raises(ServerBusyError) as caught:
        client.caption(b"image")
    assert len(fake.requests) == 1 and waits == []
    assert caught.value.message == (
        "overloaded here (gave up after 1 attempt: the proxy in front already tried 2 upstreams)"
    )


def test_a_503_from_the_proxys_only_try_is_retried(waits: list[float]) -> None:
    # one try: nginx found no other replica to send it to (or none is configured), so the client's retry is the only one
    fake = FakeServer(_error(503, retry_after="1", upstreams="503"), _ok())
    with fake.client() as client:
        assert client.caption(b"image").captions[0].text == "a dog"
    assert len(fake.requests) == 2 and len(waits) == 1


SCENARIOS = {
    "busy then ok": [_error(503, retry_after="0"), _error(429, "rate_limited", retry_after="2"), _ok()],
    "busy for ever": [_error(503, "overloaded", retry_after="3")],
    "no retry-after": [_error(429, "rate_limited")],
    "over the cap": [_error(503, retry_after="7200")],
    "proxy retried": [_error(503, retry_after="1", upstreams="503, 503")],
    "connection lost": [httpx.ConnectError("refused"), httpx.ReadTimeout("timed out"), _ok()],
    "down for ever": [httpx.ConnectError("refused")],
    "bad request": [_error(415, "unsupported_image_format")],
}


@pytest.mark.parametrize("replies", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_async_client_retries_the_same_way(waits: list[float], replies: list) -> None:
    def outcome(call: Callable[[], object]) -> tuple:
        try:
            return ("ok", call())
        except CaptionError as exc:
            return (type(exc), exc.status, exc.code, exc.message)

    settings = {"retries": 6, "max_retry_wait": 5.0, "retry_budget": 12.0}
    sync_fake, async_fake = FakeServer(*replies), FakeServer(*replies)
    with sync_fake.client(rng=random.Random(7), **settings) as client:
        sync = outcome(lambda: client.caption(b"image"))
    sync_waits = list(waits)
    waits.clear()

    async def scenario() -> tuple:
        async with async_fake.async_client(rng=random.Random(7), **settings) as client:
            try:
                return ("ok", await client.caption(b"image"))
            except CaptionError as exc:
                return (type(exc), exc.status, exc.code, exc.message)

    assert asyncio.run(scenario()) == sync
    assert waits == sync_waits and len(async_fake.requests) == len(sync_fake.requests)


def test_retry_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="retry_budget must be >= 0 seconds, got -1"):
        CaptionClient("http://fake", retry_budget=-1)
    with pytest.raises(ValueError, match="retry_budget must be >= 0 seconds"):
        AsyncCaptionClient("http://fake", retry_budget=-0.5)


@pytest.mark.parametrize("status", [400, 401, 413, 415, 422])
def test_client_errors_come_back_at_once(waits: list[float], status: int) -> None:
    fake = FakeServer(_error(status, "invalid_option"), _ok())
    with fake.client() as client, pytest.raises(ClientRequestError) as caught:
        client.caption(b"image")
    assert len(fake.requests) == 1 and waits == []
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        status,
        "invalid_option",
        "invalid_option here",
    )


def test_other_server_errors_are_not_retried(waits: list[float]) -> None:
    fake = FakeServer(httpx.Response(502, text="<html>Bad Gateway</html>"), _ok())
    with fake.client() as client, pytest.raises(ServerError) as caught:
        client.caption(b"image")
    assert len(fake.requests) == 1 and caught.value.status == 502 and caught.value.code == "http_error"
    assert "Bad Gateway" in caught.value.message


def test_connection_failures_are_retried_then_reported(waits: list[float]) -> None:
    refused = httpx.ConnectError("connection refused")
    flaky = FakeServer(refused, httpx.ReadTimeout("timed out"), _ok())
    with flaky.client() as client:
        assert client.caption(b"image").captions[0].text == "a dog"
    # full jitter: anywhere from 0 to the doubling backoff (0.5 s, then 1 s)
    assert len(flaky.requests) == 3 and len(waits) == 2 and 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 1.0

    down = FakeServer(refused)
    with down.client(retries=1) as client, pytest.raises(ConnectionFailed) as caught:
        client.caption(b"image")
    assert len(down.requests) == 2 and caught.value.status is None and caught.value.code == "connection_failed"


def test_request_carries_the_image_options_and_api_key() -> None:
    fake = FakeServer(_ok())
    with fake.client(api_key="s3cret") as client:
        client.caption(b"\x89PNG fake", method="sample", num_captions=2, top_k=5, attention=True)
        client.caption(b"\x89PNG fake", method="sample", seed=11)
    first, second = fake.requests
    assert first.headers["X-API-Key"] == "s3cret"
    assert first.url.path == "/caption" and first.headers["content-type"].startswith("multipart/form-data")
    assert b'name="image"' in first.read() and b"\x89PNG fake" in first.read()
    params = dict(first.url.params)
    assert params["method"] == "sample" and params["num_captions"] == "2" and params["top_k"] == "5"
    assert params["attention"] == "true" and "seed" not in params
    # only the options sampling uses (an option another method uses would be refused by the server); min_confidence
    # only when set, so that a server from before it (which refuses unknown options) still answers
    assert set(params) == {*DecodingOptions(method="sample").to_dict(), "attention"} - {"seed", "min_confidence"}
    assert second.url.params["seed"] == "11" and "attention" not in second.url.params

    with FakeServer(_ok()).client() as client:
        anonymous = client._http.build_request("POST", "caption")
    assert "X-API-Key" not in anonymous.headers


def test_bad_options_fail_here_without_a_request() -> None:
    with pytest.raises(ValueError) as library:
        DecodingOptions(beam_size=99)
    fake = FakeServer(_ok())
    with fake.client() as client:
        with pytest.raises(ValueError) as caught:
            client.caption(b"image", beam_size=99)
        assert str(caught.value) == str(library.value)
        with pytest.raises(ValueError, match="num_captions must be <= beam_size"):
            client.caption_many([b"a", b"b"], DecodingOptions(beam_size=2), num_captions=3)
        with pytest.raises(TypeError, match="unknown option 'beams'"):
            client.caption(b"image", beams=2)
        with pytest.raises(TypeError, match="image must be a path, bytes or a PIL image"):
            client.caption_many([b"a", 42])
    assert fake.requests == []


def test_an_option_the_method_does_not_use_fails_here_even_at_its_default() -> None:
    fake = FakeServer(_ok(), _ok(), _ok())
    with fake.client() as client:
        with pytest.raises(ValueError) as caught:
            client.caption(b"image", method="sample", beam_size=3)  # 3 is beam_size's default: given, so refused
        assert str(caught.value) == "method sample does not use beam_size (beam_size is for beam): leave it out"
        with pytest.raises(ValueError, match="method greedy does not use num_captions"):
            client.caption_many([b"a"], DecodingOptions(method="sample"), method="greedy", num_captions=1)
        with pytest.raises(ValueError, match="method beam does not use seed"):
            client.caption(b"image", DecodingOptions(method="beam"), seed=0)
        assert fake.requests == []
        # the options the method uses, the method from an object, and a field laid over another method's object
        client.caption(b"image", method="beam", beam_size=3)
        client.caption(b"image", DecodingOptions(method="sample"), top_k=0, attention=True)
        client.caption(b"image", DecodingOptions(method="beam"), method="greedy", max_length=9)
    beam, sampled, greedy = (dict(request.url.params) for request in fake.requests)
    assert beam["method"] == "beam" and beam["beam_size"] == "3"
    assert sampled["method"] == "sample" and "beam_size" not in sampled
    assert greedy == {"method": "greedy", "max_length": "9"}  # never an option the server would refuse

    async def scenario() -> None:
        async with AsyncCaptionClient("http://test", transport=httpx.MockTransport(lambda r: _ok())) as client:
            await client.caption(b"image", method="sample", length_penalty=0.0)

    with pytest.raises(ValueError, match="method sample does not use length_penalty"):
        asyncio.run(scenario())


def test_errors_survive_pickling() -> None:
    error = ClientRequestError(415, "unsupported_image_format", "not an image")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ClientRequestError and (copy.status, copy.code, copy.message) == (
        415,
        error.code,
        error.message,
    )
    assert isinstance(copy, CaptionError) and str(copy) == str(error)


def test_without_httpx_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` sees when it is not installed
    monkeypatch.delitem(sys.modules, "captioner.client")
    with pytest.raises(ImportError) as caught:
        importlib.import_module("captioner.client")
    message = str(caught.value)
    assert "pip install 'captioner[client]'" in message and "\n" not in message
