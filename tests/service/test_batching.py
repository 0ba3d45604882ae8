"""Micro-batching: concurrent requests share batches, each still gets its own correct answer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
import torch

from captioner.decoding import DecodingOptions
from captioner.model import Caption, CaptionResult
from captioner.tags import Tag
from service.app import create_app
from service.batching import BatcherStopped, MicroBatcher, ModelThread, _group_by_options, _Job
from service.settings import Settings
from tests.service import images


class _GatedModel:
    """Stands in for a Captioner: "images" are tensors, each caption is its value; the encoder can be held. Its
    "class logits" are the image's value too, so a result shows which row of them reached it."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.encoded: list[int] = []  # batch sizes seen by the encoder
        self.thread_names: list[str] = []

    def crops_to_pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images)

    def encode_with_class_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.thread_names.append(threading.current_thread().name)
        self.running.set()
        assert self.gate.wait(timeout=30), "test never opened the gate"
        self.encoded.append(pixels.shape[0])
        return pixels[:, :1, :1, :1], pixels[:, 0, 0, :1]  # (B, 1, 1, 1), (B, 1)

    def caption_features(
        self, grid: torch.Tensor, options: DecodingOptions, *, class_logits: torch.Tensor | None = None
    ) -> list[CaptionResult]:
        assert class_logits is not None and class_logits.shape[0] == grid.shape[0]
        return [
            CaptionResult([Caption(str(int(v)), [str(int(v))], 0.0, 0.0)], tags=[Tag(f"logit {int(c)}", 1.0, ())])
            for v, c in zip(grid.flatten().tolist(), class_logits.flatten().tolist(), strict=True)
        ]


def _pixels(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(value))


GREEDY = DecodingOptions(method="greedy")


def test_group_by_options() -> None:
    def job(options: DecodingOptions) -> _Job:
        return _Job(_pixels(0), options, None, 0.0)  # type: ignore[arg-type]

    beam = DecodingOptions(method="beam", beam_size=2)
    seeded = DecodingOptions(method="sample", seed=1)
    unseeded = DecodingOptions(method="sample")
    batch = [job(GREEDY), job(beam), job(GREEDY), job(seeded), job(seeded), job(unseeded), job(unseeded)]
    groups = [(rows, options) for rows, options in _group_by_options(batch)]
    assert groups == [([0, 2], GREEDY), ([1], beam), ([3], seeded), ([4], seeded), ([5, 6], unseeded)]


async def _start(model: _GatedModel, **kwargs) -> MicroBatcher:
    settings = {"max_batch_size": 8, "max_wait_ms": 0.0, **kwargs}
    batcher = MicroBatcher(model, ModelThread(), **settings)  # type: ignore[arg-type]
    await batcher.start()
    return batcher


async def _stop(batcher: MicroBatcher) -> None:
    await batcher.stop()
    await batcher.thread.close()


def test_model_work_runs_off_the_event_loop() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model)
        job = asyncio.ensure_future(batcher.submit(_pixels(5), GREEDY))
        while not model.running.is_set():
            await asyncio.sleep(0.001)
        # The model is busy (blocked) right now, yet the loop keeps running other coroutines.
        await asyncio.sleep(0.01)
        assert not job.done()
        model.gate.set()
        result, info = await job
        assert result.captions[0].text == "5" and info.size == 1
        assert model.thread_names == ["captioner-model_0"]
        await _stop(batcher)

    asyncio.run(scenario())


def test_requests_queued_while_the_model_is_busy_run_as_one_batch() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model)
        first = asyncio.ensure_future(batcher.submit(_pixels(100), GREEDY))
        while not model.running.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(_pixels(i), GREEDY)) for i in range(5)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert model.encoded == [1, 5]
        assert [r.captions[0].text for r, _ in results] == ["100", "0", "1", "2", "3", "4"]
        assert [info.size for _, info in results] == [1, 5, 5, 5, 5, 5]
        await _stop(batcher)

    asyncio.run(scenario())


def test_each_options_group_gets_its_own_rows_of_class_logits() -> None:
    """Requests with different options interleaved in one batch: each result's tags come from its own image's
    row of the encoder's class logits, not its group's position in the batch."""

    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model)
        beam = DecodingOptions(method="beam", beam_size=2)
        jobs = [asyncio.ensure_future(batcher.submit(_pixels(i), beam if i % 2 else GREEDY)) for i in range(6)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(*jobs)
        assert sum(model.encoded) == 6 and len(model.encoded) <= 2  # one pass for all, or the first alone
        assert [(r.captions[0].text, r.tags[0].name) for r, _ in results] == [(str(i), f"logit {i}") for i in range(6)]
        await _stop(batcher)

    asyncio.run(scenario())


def test_max_batch_size_splits_batches() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model, max_batch_size=3)
        jobs = [asyncio.ensure_future(batcher.submit(_pixels(i), GREEDY)) for i in range(7)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(*jobs)
        assert model.encoded == [1, 3, 3] or model.encoded == [3, 3, 1]
        assert [r.captions[0].text for r, _ in results] == [str(i) for i in range(7)]
        await _stop(batcher)

    asyncio.run(scenario())


def test_a_lone_request_does_not_wait_for_a_batch() -> None:
    async def scenario() -> None:
        batcher = await _start(_GatedModel(), max_wait_ms=60_000)  # a minute: nobody else is coming
        result, info = await asyncio.wait_for(batcher.submit(_pixels(3), GREEDY), timeout=20)
        assert result.captions[0].text == "3" and info.size == 1
        await _stop(batcher)

    asyncio.run(scenario())


def test_a_batch_waits_for_requests_already_arriving() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        batcher = await _start(model, max_wait_ms=60_000)

        async def arriving(value: int, delay: float):
            with batcher.expecting():  # uploading / preprocessing
                await asyncio.sleep(delay)
            return await batcher.submit(_pixels(value), GREEDY)

        results = await asyncio.wait_for(
            asyncio.gather(arriving(1, 0.0), arriving(2, 0.05), arriving(3, 0.1)), timeout=20
        )
        assert model.encoded == [3]
        assert [r.captions[0].text for r, _ in results] == ["1", "2", "3"]
        await _stop(batcher)

    asyncio.run(scenario())


def test_stop_fails_waiting_requests() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model, max_batch_size=1)
        first = asyncio.ensure_future(batcher.submit(_pixels(1), GREEDY))
        while not model.running.is_set():
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(batcher.submit(_pixels(2), GREEDY))
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(_stop(batcher))
        await asyncio.sleep(0.01)
        model.gate.set()
        await stopping
        for job in (first, waiting):
            with pytest.raises(BatcherStopped):
                await job

    asyncio.run(scenario())


# --- the real app and model -----------------------------------------------------------------------

MIXED_OPTIONS = [
    {"method": "greedy", "max_length": 5},
    {"method": "greedy", "max_length": 5},
    {"method": "greedy", "max_length": 3},
    {"method": "beam", "beam_size": 3, "max_length": 7},
    {"method": "beam", "beam_size": 2, "num_captions": 2},
    {"method": "sample", "seed": 1, "num_captions": 2},
    {"method": "sample", "seed": 2, "top_k": 3},
    {"method": "sample", "seed": 1, "num_captions": 2},
]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(calibrated_checkpoint: Path) -> None:
    """Eight simultaneous uploads with different images and options: one encoder batch of eight, and
    every response (captions, their confidences, the tags) equals what that image alone with those options gives."""
    app = create_app(Settings(checkpoint=calibrated_checkpoint, max_batch_size=8, max_wait_ms=5_000))
    uploads = [images.png(seed=100 + i) for i in range(len(MIXED_OPTIONS))]

    async def scenario() -> tuple[list[httpx.Response], list[CaptionResult], str]:
        async with app.router.lifespan_context(app):
            # On a loaded machine the eighth request can still be in the HTTP layer when the first seven
            # have been decoded, so the batch would close without it. Holding the batcher until all
            # eight are queued makes the test about what it checks: one batch, eight right answers.
            batcher = app.state.batcher
            gather = batcher._gather

            async def gather_when_all_queued(first):
                while batcher._queue.qsize() < len(MIXED_OPTIONS) - 1:  # the first is already taken
                    await asyncio.sleep(0.005)
                batcher._gather = gather
                return await gather(first)

            batcher._gather = gather_when_all_queued
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                responses = await asyncio.gather(
                    *(
                        client.post("/caption", params=options, files={"image": ("x.png", data, "image/png")})
                        for data, options in zip(uploads, MIXED_OPTIONS, strict=True)
                    )
                )
                metrics = (await client.get("/metrics")).text
            model = app.state.loaded.model
            expected = [
                model.caption([data], DecodingOptions(**options))[0]
                for data, options in zip(uploads, MIXED_OPTIONS, strict=True)
            ]
        return responses, expected, metrics

    responses, expected, metrics = asyncio.run(scenario())
    for response, want, options in zip(responses, expected, MIXED_OPTIONS, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["timing"]["batch_size"] == len(MIXED_OPTIONS), "the requests did not share one batch"
        assert [c["text"] for c in body["captions"]] == [c.text for c in want.captions], options
        got = [(c["log_prob"], c["confidence"]) for c in body["captions"]]
        assert got == [
            (pytest.approx(c.log_prob, abs=1e-4), pytest.approx(c.confidence, abs=1e-4)) for c in want.captions
        ]
        assert [(t["name"], t["confidence"]) for t in body["tags"]] == [
            (t.name, pytest.approx(t.confidence, abs=1e-4)) for t in want.tags
        ], options
        assert body["tags"], "the model has a class head"
        assert body["options"]["method"] == options["method"]
    # Same seed and options, different images: each request sampled with its own generator.
    assert responses[5].json()["captions"] != responses[7].json()["captions"] or uploads[5] == uploads[7]
    assert 'captioner_batch_size_bucket{le="8.0"} 1.0' in metrics
    assert 'captioner_batch_size_bucket{le="6.0"} 0.0' in metrics


def test_torch_work_runs_only_on_the_model_thread(client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor conversion, encoder and decoder all run on the one model thread (one OpenMP team; see batching.py)."""
    model = client.app.state.loaded.model
    seen: list[str] = []

    def spy(name: str):
        real = getattr(model, name)

        def wrapper(*args, **kwargs):
            seen.append(f"{name}@{threading.current_thread().name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(model, name, wrapper)

    for name in ("crops_to_pixels", "encode_with_class_logits", "caption_features"):
        spy(name)
    response = client.post("/caption", params={"method": "greedy"}, files={"image": ("x.png", images.png())})
    assert response.status_code == 200
    assert [s.split("@")[0] for s in seen] == ["crops_to_pixels", "encode_with_class_logits", "caption_features"]
    assert all(s.split("@")[1].startswith("captioner-model") for s in seen), seen
