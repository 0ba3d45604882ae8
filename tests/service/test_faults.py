"""The batcher under faults: failing batches split in halves, out-of-memory, queue deadlines, a dead
batcher task and a hung model thread."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import torch

from service.batching import BatcherStopped, OutOfMemory, QueueTimeout, is_out_of_memory
from tests.service.test_batching import GREEDY, _GatedModel, _pixels, _start, _stop

BAD = 13  # the "image" value a failing model cannot handle


class _FlakyModel(_GatedModel):
    """Fails any batch holding the value BAD; runs out of memory on batches larger than ``memory``."""

    def __init__(self, memory: int = 1024, oom: type[BaseException] = torch.cuda.OutOfMemoryError) -> None:
        super().__init__()
        self.memory = memory
        self.oom = oom

    def encode_with_class_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid, class_logits = super().encode_with_class_logits(pixels)
        if pixels.shape[0] > self.memory:
            raise self.oom(f"CUDA out of memory. Tried to allocate {pixels.shape[0]} GiB")
        if (grid == BAD).any():
            raise ValueError("this image breaks the model")
        return grid, class_logits


async def _submit_all(batcher, values: list[int], model: _GatedModel) -> list:
    """Submit every value while the model is held, so they form one batch; return each outcome."""
    model.gate.clear()
    jobs = [asyncio.ensure_future(batcher.submit(_pixels(v), GREEDY)) for v in values]
    await asyncio.sleep(0.02)
    model.gate.set()
    return await asyncio.gather(*jobs, return_exceptions=True)


def test_a_bad_request_fails_alone_and_its_neighbours_are_answered() -> None:
    async def scenario() -> None:
        model = _FlakyModel()
        batcher = await _start(model)
        outcomes = await _submit_all(batcher, [1, 2, BAD, 4, 5, 6, 7], model)
        await _stop(batcher)
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert failed == [2]
        assert isinstance(outcomes[2], ValueError)
        assert [o[0].captions[0].text for i, o in enumerate(outcomes) if i != 2] == ["1", "2", "4", "5", "6", "7"]
        assert model.encoded[0] == 7  # the whole batch first, then halves of it
        assert len(model.encoded) > 1 and max(model.encoded[1:]) < 7

    asyncio.run(scenario())


def test_out_of_memory_splits_the_batch_until_it_fits() -> None:
    async def scenario() -> None:
        model = _FlakyModel(memory=2)
        batcher = await _start(model)
        outcomes = await _submit_all(batcher, [1, 2, 3, 4, 5, 6, 7, 8], model)
        await _stop(batcher)
        assert [o[0].captions[0].text for o in outcomes] == [str(v) for v in range(1, 9)]
        assert model.encoded == [8, 4, 2, 2, 4, 2, 2]  # halves until they fit (failed passes counted too)

    asyncio.run(scenario())


@pytest.mark.parametrize("oom", [torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_on_a_single_request_is_out_of_memory(oom: type[BaseException]) -> None:
    async def scenario() -> None:
        model = _FlakyModel(memory=0, oom=oom)
        batcher = await _start(model)
        outcomes = await _submit_all(batcher, [1, 2], model)
        await _stop(batcher)
        assert all(isinstance(o, OutOfMemory) for o in outcomes), outcomes

    asyncio.run(scenario())


def test_is_out_of_memory_goes_by_the_type_never_the_message() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("no words about memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("failed to allocate memory for the shape"))


def test_is_out_of_memory_needs_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch-free server (the ONNX runtime) asks too: without torch loaded, nothing is imported for the check."""
    oom = torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.delitem(sys.modules, "torch")
    assert is_out_of_memory(MemoryError("host"))
    assert not is_out_of_memory(oom)  # no torch loaded: no torch error can have been raised in this process
    assert "torch" not in sys.modules


def test_a_request_past_its_queue_deadline_gets_queue_timeout_and_never_reaches_the_model() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model, max_batch_size=1, queue_timeout_s=0.2)
        running = asyncio.ensure_future(batcher.submit(_pixels(1), GREEDY))
        while not model.running.is_set():
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        with pytest.raises(QueueTimeout, match="waited 0.2 s"):
            await batcher.submit(_pixels(2), GREEDY)
        assert time.perf_counter() - started < 2.0  # answered at the deadline, not when the model frees up
        await asyncio.sleep(0.3)  # the running request is past its deadline too, but already in the model
        model.gate.set()
        result, _ = await running
        assert result.captions[0].text == "1"
        await asyncio.sleep(0.05)
        assert model.encoded == [1]  # the timed-out request never ran
        await _stop(batcher)

    asyncio.run(scenario())


def test_a_dead_batcher_task_fails_pending_requests_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()
        batcher = await _start(model, max_batch_size=1)

        async def broken_gather(first):
            raise RuntimeError("a bug in the batcher")

        running = asyncio.ensure_future(batcher.submit(_pixels(1), GREEDY))
        while not model.running.is_set():
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(batcher.submit(_pixels(2), GREEDY))
        batcher._gather = broken_gather  # the next batch kills the task
        await asyncio.sleep(0.01)
        model.gate.set()
        await running
        with pytest.raises(BatcherStopped, match="a bug in the batcher"):
            await asyncio.wait_for(waiting, 5)
        assert batcher.fault is not None and "RuntimeError" in batcher.fault
        with pytest.raises(BatcherStopped):
            await batcher.submit(_pixels(3), GREEDY)
        await _stop(batcher)

    asyncio.run(scenario())


def test_a_hung_model_thread_is_a_fault_within_the_stall_timeout() -> None:
    async def scenario() -> None:
        model = _GatedModel()
        model.gate.clear()  # the model never finishes until the test lets it
        batcher = await _start(model, max_batch_size=1, stall_timeout_s=0.3)
        running = asyncio.ensure_future(batcher.submit(_pixels(1), GREEDY))
        queued = asyncio.ensure_future(batcher.submit(_pixels(2), GREEDY))
        started = time.perf_counter()
        for job in (running, queued):
            with pytest.raises(BatcherStopped, match="no progress"):
                await asyncio.wait_for(job, 10)
        assert time.perf_counter() - started < 5.0
        assert batcher.fault is not None and "no progress" in batcher.fault
        model.gate.set()  # let the thread go, so the test can shut it down
        await _stop(batcher)

    asyncio.run(scenario())
