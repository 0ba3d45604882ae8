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

Within a batch, every crop goes through the tensor conversion and the encoder together (with the encoder's
ImageNet head, when it has one: the tags and the caption confidences come from that same pass); the decoder
then runs once per group of requests with identical :class:`DecodingOptions`. Sampling with a seed is the
exception: each such request is decoded on its own, so a seeded request gives the same captions
whether or not it shared a batch (one random generator per request, not one per group).

Memory: a full-size image lives only while its upload thread crops it; a queued request holds its
crop (crop x crop RGB, ~200 KB). Upload bytes are held while being read; admission control
(:mod:`service.admission`) bounds how many requests are in progress at once.

Failures: a batch that raises is run again in halves, down to single requests, so one bad request fails
alone; an out-of-memory error at one request becomes :class:`OutOfMemory` (the service answers 503).
A request that waits longer than ``queue_timeout_s`` for its batch fails with :class:`QueueTimeout`
(504) and never reaches the model. If the batcher task dies, or a batch runs longer than
``stall_timeout_s`` (a hung model thread cannot be interrupted), the batcher records a :attr:`fault`,
fails every pending request at once with :class:`BatcherStopped` and refuses new ones: the service
then answers 503 on ``/ready`` and ``/health``, and the orchestrator's liveness probe restarts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from captioner.arrays import take_rows
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.pipeline import CaptionPipeline
from captioner.results import CaptionResult

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelThread:
    """The service's one thread for torch work; :meth:`run` awaits a call made on it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self, wait: bool = True) -> None:
        """Wait for the running call (if any) to finish, without blocking the event loop; with ``wait=False``
        (the thread is hung) only stop it from taking more work."""
        if not wait:
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


@dataclass(frozen=True)
class BatchInfo:
    size: int  # requests in the micro-batch
    queue_ms: float  # this request's wait from submission to the batch starting
    model_ms: float  # tensor conversion + encoder + decoder time of the whole batch


@dataclass(eq=False)  # hashed by identity: kept in a set until answered
class _Job:
    image: Image.Image  # the encoder's RGB crop (transforms.resize_crop of the upright image)
    options: DecodingOptions
    future: asyncio.Future
    submitted: float  # time.perf_counter() at submission
    started: bool = False  # its batch is running: past the queue deadline, it is still answered


class BatcherStopped(CaptionerError, RuntimeError):
    """The batcher shut down, or failed, before the request ran."""


class QueueTimeout(CaptionerError, RuntimeError):
    """The request waited longer than the queue deadline; it never reached the model."""


class OutOfMemory(CaptionerError, RuntimeError):
    """The model ran out of memory on this request alone (its batch was already split down to it)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure, by its type (never its message): Python's ``MemoryError`` (also what
    pybind11 makes of a C++ ``std::bad_alloc``) and torch's ``OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is
    the same class). ONNX Runtime has no type of its own for it: its arena reports a failed allocation as ``Fail``,
    the type of every other failure too, so an ONNX Runtime allocation failure is not recognised here."""
    if isinstance(exc, MemoryError):
        return True
    loaded = sys.modules.get("torch")  # only a torch already loaded can have raised its error: no import for the check
    return loaded is not None and isinstance(exc, loaded.OutOfMemoryError)


def _release_cached_gpu_memory() -> None:
    """Hand torch's cached CUDA blocks back, so the halves of a batch that ran out of memory start from a clean
    allocator; nothing to do without torch, or without CUDA."""
    loaded = sys.modules.get("torch")
    if loaded is not None and loaded.cuda.is_available():
        loaded.cuda.empty_cache()


class MicroBatcher:
    """Gathers concurrent caption requests into batches and runs them on the :class:`ModelThread`."""

    def __init__(
        self,
        model: CaptionPipeline,
        thread: ModelThread,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_timeout_s: float = float("inf"),
        stall_timeout_s: float = float("inf"),
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.thread = thread
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_timeout_s = queue_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._incoming = 0  # inside expecting(): uploading or decoding
        self._decoding = 0  # inside decoding(): uploaded, being decoded
        self._running: list[_Job] = []
        self._pending: set[_Job] = set()  # submitted and not answered yet, wherever they are
        self._batch_started: float | None = None  # perf_counter() when the running batch started
        self.fault: str | None = None  # why the batcher can no longer serve; set once, never cleared

    @property
    def outstanding(self) -> int:
        """Requests in progress: arriving (uploading, decoding), queued, or in the running batch."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return self._incoming + queued + len(self._running)

    @property
    def work_ahead(self) -> int:
        """Requests whose upload is complete (decoding, queued or running): what a new request waits behind.
        Uploads still arriving are not counted: a slow client costs the model nothing until it is done."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return self._decoding + queued + len(self._running)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name="captioner-batcher")
        self._task.add_done_callback(self._on_serve_done)
        if math.isfinite(self.stall_timeout_s):
            self._watchdog = asyncio.create_task(self._watch(), name="captioner-batcher-watchdog")

    async def stop(self) -> None:
        """Stop taking batches; requests still waiting fail with :class:`BatcherStopped`."""
        for task in (self._watchdog, self._task):
            if task is not None and not task.done():  # a task that died already left its fault
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._watchdog = None
        self._fail_pending(BatcherStopped("the service is shutting down"))

    def _fail_pending(self, exc: Exception) -> None:
        """Answer every unanswered request with ``exc``: queued, being gathered, or running (its results dropped)."""
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait()
        for job in list(self._pending):
            if not job.future.done():
                job.future.set_exception(exc)

    def _set_fault(self, reason: str) -> None:
        if self.fault is not None:
            return
        self.fault = reason
        log.error("the batcher can no longer serve: %s", reason)
        self._fail_pending(BatcherStopped(reason))
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _on_serve_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        reason = f"{exc.__class__.__name__}: {exc}" if exc is not None else "it returned"
        self._set_fault(f"the batcher stopped ({reason})")

    async def _watch(self) -> None:
        """Declare a fault when one batch has run longer than ``stall_timeout_s``."""
        interval = min(1.0, self.stall_timeout_s / 4)
        while self.fault is None:
            await asyncio.sleep(interval)
            started = self._batch_started
            if started is not None and time.perf_counter() - started > self.stall_timeout_s:
                self._set_fault(
                    f"the model has made no progress for {time.perf_counter() - started:.0f} s "
                    f"(a batch of {len(self._running)}; the limit is {self.stall_timeout_s:g} s)"
                )

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Within :meth:`expecting`: mark a request whose upload is complete (it counts in :attr:`work_ahead`)."""
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1

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
        if self.fault is not None:
            raise BatcherStopped(self.fault)
        if self._queue is None or self._task is None:
            raise BatcherStopped("the batcher is not running")
        job = _Job(image, options, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.add(job)
        job.future.add_done_callback(lambda _: self._pending.discard(job))
        self._queue.put_nowait(job)
        self._notify()
        if not math.isfinite(self.queue_timeout_s):
            return await job.future
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.queue_timeout_s)
        except asyncio.TimeoutError:
            if job.started:  # its batch is already running: the answer is on its way
                return await job.future
            job.future.cancel()  # the batcher skips it
            raise QueueTimeout(
                f"the request waited {self.queue_timeout_s:g} s for the model without being served; retry later"
            ) from None
        except asyncio.CancelledError:  # the client went away: the batcher skips it, unless already running
            job.future.cancel()
            raise

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._gather(await self._queue.get())
            # Drop requests whose clients gave up or that timed out in the queue (their futures are done).
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            for job in batch:
                job.started = True
            started = time.perf_counter()
            self._running, self._batch_started = batch, started
            try:
                # Never raises Exception: a failing request's exception is its result. Anything that does
                # escape means the model thread itself is unusable, and ends this task (a fault).
                results = await self.thread.run(self._run_split_on_failure, batch)
            except asyncio.CancelledError:  # stopping: the batch finishes on its thread, unanswered
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(BatcherStopped(self.fault or "the service is shutting down"))
                raise
            finally:
                self._running, self._batch_started = [], None
            model_ms = (time.perf_counter() - started) * 1000.0
            if self._on_batch is not None:
                self._on_batch(len(batch), model_ms / 1000.0)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
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

    def _run_split_on_failure(self, batch: list[_Job]) -> list[CaptionResult | Exception]:
        """On the model thread: :meth:`_run`, and when it raises, each half again, down to single requests."""
        try:
            return list(self._run(batch))
        except Exception as exc:
            out_of_memory = is_out_of_memory(exc)
            if out_of_memory:
                _release_cached_gpu_memory()
            if len(batch) == 1:
                if out_of_memory:
                    log.warning("out of memory on a single request: %s", exc)
                    return [OutOfMemory("the server ran out of memory for this request; retry later")]
                log.exception("a request failed in the model")
                return [exc]
            log.warning("micro-batch of %d failed (%s: %s); retrying it in halves", len(batch), type(exc).__name__, exc)
            half = len(batch) // 2
            return self._run_split_on_failure(batch[:half]) + self._run_split_on_failure(batch[half:])

    def _run(self, batch: list[_Job]) -> list[CaptionResult]:
        """On the model thread: one tensor conversion + encoder pass for the batch, a decoder pass per options group."""
        # Decoded, resized and cropped on the upload threads: only the tensor conversion is left.
        pixels = self.model.crops_to_pixels([job.image for job in batch])  # (B, 3, S, S)
        # The ImageNet head's logits come from the same pass: each result's tags and its captions' confidence.
        grid, class_logits = self.model.encode_with_class_logits(pixels)  # (B, C, h, w), (B, 1000) or None
        results: list[CaptionResult | None] = [None] * len(batch)
        for rows, options in _group_by_options(batch):
            logits = take_rows(class_logits, rows) if class_logits is not None else None
            group = self.model.caption_features(take_rows(grid, rows), options, class_logits=logits)
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
