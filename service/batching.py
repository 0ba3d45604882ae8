"""Micro-batching: concurrent requests share one encoder batch and, per decoding options, one decoder batch.

One thread does all torch work. :class:`ModelThread` is the only thread that ever runs a torch
operation in the service: loading, warm-up, the tensor conversion, encoder and decoder. The event loop
keeps serving (health checks, uploads, other requests) while a batch runs, and the model is never used
by two threads at once. Upload decoding, resizing and cropping (PIL, no torch; PIL releases the GIL)
run on a small thread pool beside it, overlapping the model's work on earlier requests. Keeping
torch on one thread is also a speed matter on CPU: every thread that runs torch ops gets its own
OpenMP team, and once libgomp manages more threads than there are CPUs it stops spin-waiting, which
made the encoder + decoder 15-35 % slower when the resize/normalise ran on the upload threads.

How a batch forms: the batcher takes the first waiting request, then keeps taking requests until the
batch holds ``max_batch_size`` or ``max_wait_ms`` has passed since it started gathering. It only waits
while other requests are already *arriving* (inside :meth:`MicroBatcher.expecting`: uploading or being
decoded), so a lone request never pays the wait, and requests that queue up while a batch runs are
taken together as soon as the model is free.

Within a batch, every crop goes through the tensor conversion and the encoder together; the decoder then runs
once per group of requests with identical :class:`DecodingOptions`. Sampling with a seed is the
exception: each such request is decoded on its own, so a seeded request gives the same captions
whether or not it shared a batch (one random generator per request, not one per group).

Memory: a full-size image lives only while its upload thread crops it; a queued request holds its
crop (crop x crop RGB, ~200 KB). Upload bytes are held while being read, so cap concurrent requests
(``uvicorn --limit-concurrency``) when uploads are huge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image

from captioner.decoding import DecodingOptions
from captioner.model import Captioner, CaptionResult

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelThread:
    """The service's one thread for torch work; :meth:`run` awaits a call made on it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        """Wait for the running call (if any) to finish, without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


@dataclass(frozen=True)
class BatchInfo:
    size: int  # requests in the micro-batch
    queue_ms: float  # this request's wait from submission to the batch starting
    model_ms: float  # tensor conversion + encoder + decoder time of the whole batch


@dataclass
class _Job:
    image: Image.Image  # the encoder's RGB crop (transforms.resize_crop of the upright image)
    options: DecodingOptions
    future: asyncio.Future
    submitted: float  # time.perf_counter() at submission


class BatcherStopped(RuntimeError):
    """The batcher shut down before the request ran."""


class MicroBatcher:
    """Gathers concurrent caption requests into batches and runs them on the :class:`ModelThread`."""

    def __init__(
        self,
        model: Captioner,
        thread: ModelThread,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.thread = thread
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._incoming = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name="captioner-batcher")

    async def stop(self) -> None:
        """Stop taking batches; requests still waiting fail with :class:`BatcherStopped`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(BatcherStopped("the service is shutting down"))

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Mark a request that will :meth:`submit` soon, so a forming batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._notify()

    async def submit(self, image: Image.Image, options: DecodingOptions) -> tuple[CaptionResult, BatchInfo]:
        """Caption one RGB crop (``transforms.resize_crop``); returns its result and the batch it ran in."""
        if self._queue is None or self._task is None:
            raise BatcherStopped("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(image, options, future, time.perf_counter()))
        self._notify()
        return await future

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._gather(await self._queue.get())
            batch = [job for job in batch if not job.future.done()]  # drop requests whose clients gave up
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await self.thread.run(self._run, batch)
            except asyncio.CancelledError:  # stopping: the batch finishes on its thread, unanswered
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(BatcherStopped("the service is shutting down"))
                raise
            except Exception as exc:  # a failing batch fails its own requests, never the server
                log.exception("micro-batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            model_ms = (time.perf_counter() - started) * 1000.0
            if self._on_batch is not None:
                self._on_batch(len(batch), model_ms / 1000.0)
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    info = BatchInfo(len(batch), (started - job.submitted) * 1000.0, model_ms)
                    job.future.set_result((result, info))

    async def _gather(self, first: _Job) -> list[_Job]:
        assert self._queue is not None and self._changed is not None
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if self._incoming == 0 or remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    def _run(self, batch: list[_Job]) -> list[CaptionResult]:
        """On the model thread: one tensor conversion + encoder pass for the batch, a decoder pass per options group."""
        # Decoded, resized and cropped on the upload threads: only the tensor conversion is left.
        pixels = self.model.crops_to_pixels([job.image for job in batch])  # (B, 3, S, S)
        grid = self.model.encode(pixels)  # (B, C, h, w)
        results: list[CaptionResult | None] = [None] * len(batch)
        for rows, options in _group_by_options(batch):
            index = torch.tensor(rows, device=grid.device)
            group = self.model.caption_features(grid.index_select(0, index), options)
            for row, result in zip(rows, group, strict=True):
                results[row] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def _group_by_options(batch: list[_Job]) -> list[tuple[list[int], DecodingOptions]]:
    groups: dict[object, tuple[list[int], DecodingOptions]] = {}
    for row, job in enumerate(batch):
        seeded_sample = job.options.method == "sample" and job.options.seed is not None
        key: object = ("alone", row) if seeded_sample else job.options
        groups.setdefault(key, ([], job.options))[0].append(row)
    return list(groups.values())
