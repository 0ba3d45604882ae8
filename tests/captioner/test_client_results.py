"""captioner.client against a fake server: reading confidence, tags and abstention from the server's JSON (and a
server from before them), and sending min_confidence. No server process: httpx's MockTransport answers."""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import httpx
import pytest

from captioner.client import AsyncCaptionClient, CaptionClient, ClientRequestError, ServerError
from captioner.decoding import DecodingOptions
from captioner.options import SEED_MAX, VALID_VALUES
from captioner.tags import Tag

CAPTION = {"text": "a dog", "tokens": ["a", "dog"], "log_prob": -1.5, "score": -1.5, "attention": None}
# what a server from before confidence and tags answers
OLD_BODY: dict[str, Any] = {
    "captions": [CAPTION],
    "options": {**DecodingOptions().to_dict(), "attention": False},
    "model_id": "fake-000000000000",
    "image": {"width": 8, "height": 8},
    "attention_shape": None,
    "timing": {"total_ms": 1.0, "decode_ms": 0.1, "queue_ms": 0.1, "model_ms": 0.5, "batch_size": 1},
}
TAGS = [
    {"name": "dog", "confidence": 0.61, "parents": ["mammal", "animal"]},
    {"name": "frisbee", "confidence": 0.12, "parents": ["toy"]},
]
BODY = {
    **OLD_BODY,
    "captions": [{**CAPTION, "confidence": 0.83}, {**CAPTION, "text": "a cat", "confidence": 0.07}],
    "tags": TAGS,
    "abstained": False,
}
ABSTAINED = {**BODY, "captions": [], "abstained": True, "options": {**BODY["options"], "min_confidence": 0.9}}


class FakeServer:
    """Answers every request with ``status`` and ``body``, recording the requests."""

    def __init__(self, body: dict[str, Any], status: int = 200) -> None:
        self.body, self.status = body, status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)

    def client(self) -> CaptionClient:
        return CaptionClient("http://fake", transport=httpx.MockTransport(self), retries=0, rng=random.Random(0))


def test_confidence_and_tags_are_read_into_the_result() -> None:
    with FakeServer(BODY).client() as client:
        reply = client.caption(b"image")
    assert [(c.text, c.confidence) for c in reply.captions] == [("a dog", 0.83), ("a cat", 0.07)]
    assert reply.tags == [Tag("dog", 0.61, ("mammal", "animal")), Tag("frisbee", 0.12, ("toy",))]
    assert reply.abstained is False


def test_an_abstention_has_no_captions_and_keeps_the_tags() -> None:
    with FakeServer(ABSTAINED).client() as client:
        reply = client.caption(b"image", min_confidence=0.9)
    assert reply.captions == [] and reply.abstained is True
    assert [tag.name for tag in reply.tags] == ["dog", "frisbee"] and reply.options["min_confidence"] == 0.9


def test_a_server_from_before_confidence_gives_none_no_tags_and_no_abstention() -> None:
    null_confidence = {**OLD_BODY, "captions": [{**CAPTION, "confidence": None}], "tags": [], "abstained": False}
    for body in (OLD_BODY, null_confidence):  # the fields left out, or a model without a confidence model
        with FakeServer(body).client() as client:
            reply = client.caption(b"image")
        assert reply.captions[0].text == "a dog" and reply.captions[0].confidence is None
        assert reply.tags == [] and reply.abstained is False


@pytest.mark.parametrize(
    "body",
    [
        {**BODY, "abstained": "no"},
        {**BODY, "tags": {"dog": 0.6}},
        {**BODY, "tags": [{"name": "dog", "confidence": "high"}]},
        {**BODY, "captions": [{**CAPTION, "confidence": "0.8"}]},
    ],
)
def test_fields_of_the_wrong_kind_are_an_invalid_response(body: dict[str, Any]) -> None:
    with FakeServer(body).client() as client, pytest.raises(ServerError) as caught:
        client.caption(b"image")
    assert caught.value.code == "invalid_response"


def test_min_confidence_is_sent_when_set_and_checked_here_first() -> None:
    fake = FakeServer(BODY)
    with fake.client() as client:
        client.caption(b"image", min_confidence=0.5)
        client.caption(b"image", DecodingOptions(method="greedy", min_confidence=0.25))
        client.caption(b"image")  # at its default: not sent, so a server from before the option still answers
        with pytest.raises(ValueError) as caught:
            client.caption(b"image", min_confidence=1.5)
        with pytest.raises(ValueError) as library:
            DecodingOptions(min_confidence=1.5)
        assert str(caught.value) == str(library.value)  # the library's own message, before any request
    beam, greedy, default = (dict(request.url.params) for request in fake.requests)
    assert beam["min_confidence"] == "0.5" and greedy["min_confidence"] == "0.25" and greedy["method"] == "greedy"
    assert "min_confidence" not in default and len(fake.requests) == 3


def test_a_server_refusing_min_confidence_is_a_client_request_error() -> None:
    error = {"error": {"code": "invalid_option", "message": "min_confidence needs a model with a confidence model"}}
    fake = FakeServer(error, status=422)
    with fake.client() as client, pytest.raises(ClientRequestError) as caught:
        client.caption(b"image", min_confidence=0.5)
    assert caught.value.status == 422 and "min_confidence" in caught.value.message and len(fake.requests) == 1


def test_the_async_client_reads_the_same_fields() -> None:
    async def scenario() -> list:
        transport = httpx.MockTransport(FakeServer(ABSTAINED))
        async with AsyncCaptionClient("http://fake", transport=transport) as client:
            return await client.caption_many([b"a", b"b"], min_confidence=0.9)

    for reply in asyncio.run(scenario()):
        assert (
            reply.abstained is True and reply.captions == [] and reply.tags[0] == Tag("dog", 0.61, ("mammal", "animal"))
        )


def test_the_seed_limit_is_checked_here_with_the_librarys_message() -> None:
    server = FakeServer(BODY)
    with server.client() as client:
        for seed in (-1, SEED_MAX + 1):
            with pytest.raises(ValueError, match=rf"^seed must be {re.escape(VALID_VALUES['seed'])}, got {seed}$"):
                client.caption(b"image", method="sample", seed=seed)
        assert server.requests == []  # refused before any request
        client.caption(b"image", method="sample", seed=SEED_MAX)
    assert dict(server.requests[0].url.params)["seed"] == str(SEED_MAX)
