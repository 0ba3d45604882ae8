"""A client for a running ``captioner-serve``: caption one image or many over HTTP.

    from captioner.client import CaptionClient, CaptionError

    with CaptionClient("http://localhost:8000", api_key="...") as client:
        reply = client.caption("dog.jpg", method="beam", beam_size=5, num_captions=2)
        print(reply.captions[0].text, reply.captions[0].confidence, [tag.name for tag in reply.tags])

        reply = client.caption("photo.jpg", min_confidence=0.5)  # the model needs a confidence calibration
        if reply.abstained:  # no caption reached 0.5: none is given, the tags still are
            print("not sure; it shows", ", ".join(tag.name for tag in reply.tags))

        for path, result in zip(paths, client.caption_many(paths, concurrency=8)):
            if isinstance(result, CaptionError):  # one bad image never stops the rest
                print(path, "failed:", result.code, result.message)
            else:
                print(path, result.captions[0].text)

:class:`AsyncCaptionClient` has the same methods as coroutines (``async with``, ``await client.caption(...)``).
Options are the library's :class:`~captioner.options.DecodingOptions`, passed as an object or as its fields,
and are checked here first, so a bad option fails at once with the library's own message.

The client retries what may succeed later: 503 and 429 (never sooner than the server's ``Retry-After`` says,
and at least 1 s) and connection failures or timeouts (with exponential backoff). Every wait is random, so many
clients refused together do not come back together; a ``Retry-After`` over ``max_retry_wait`` ends the call at
once, all waits of one call together stay within ``retry_budget``, and a 503/429 that the proxy in front already
retried (``X-Captioner-Upstream-Status`` lists two tries) is not retried again; the rules are
:class:`~captioner.client_retry.RetryPolicy`'s. Every other 4xx is the request's own fault and comes back at once
as :class:`ClientRequestError` with the server's code and message.

The parts, one concept each: :mod:`captioner.client_wire` (what a request and its reply look like),
:mod:`captioner.client_retry` (when to try again), :mod:`captioner.client_uploads` (reading the image) and
:mod:`captioner.client_errors`; this module does the I/O they describe. None imports torch or numpy.

Needs httpx: ``pip install 'captioner[client]'``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

try:
    import httpx
except ImportError as exc:
    raise ImportError("captioner.client needs httpx; install it with: pip install 'captioner[client]'") from exc

from PIL import Image

from captioner.client_errors import (
    CaptionError,
    ClientRequestError,
    ConnectionFailed,
    ImageReadError,
    ServerBusyError,
    ServerError,
)
from captioner.client_retry import RetryPolicy, gave_up
from captioner.client_uploads import ImageInput, Upload, check_image_type, read_upload
from captioner.client_wire import IMAGE_FIELD, CaptionResponse, query_params, read_reply, resolve_options
from captioner.options import DecodingOptions

__all__ = [
    "AsyncCaptionClient",
    "CaptionClient",
    "CaptionError",
    "CaptionResponse",
    "ClientRequestError",
    "ConnectionFailed",
    "ImageReadError",
    "ServerBusyError",
    "ServerError",
]


# -- clients --------------------------------------------------------------------------------------


class _ClientBase:
    """Settings shared by the sync and async clients, which differ only in I/O; both follow one RetryPolicy."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float,
        retries: int,
        max_retry_wait: float,
        retry_budget: float,
        rng: random.Random | None,
    ) -> None:
        if httpx.URL(base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if max_retry_wait < 0:
            raise ValueError(f"max_retry_wait must be >= 0 seconds, got {max_retry_wait}")
        if retry_budget < 0:
            raise ValueError(f"retry_budget must be >= 0 seconds, got {retry_budget}")
        self.base_url = base_url
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.retry_budget = retry_budget
        self._retry = RetryPolicy(retries, max_retry_wait, retry_budget, rng if rng is not None else random.Random())
        self._headers = {"X-API-Key": api_key} if api_key else {}


class CaptionClient(_ClientBase):
    """Caption images with a running ``captioner-serve``; one instance may be shared by many threads.

    ``retries`` counts extra attempts after the first (on 503/429 and connection failures). A wait is never
    longer than ``max_retry_wait`` seconds: a ``Retry-After`` over it is not waited for, the call raises
    :class:`ServerBusyError` at once. The waits of one call add up to at most ``retry_budget`` seconds. ``rng`` is
    the random source of the waits' jitter (a seeded ``random.Random`` repeats them). ``transport`` replaces
    httpx's network transport (tests pass an ``httpx.MockTransport``). The rules are
    :class:`~captioner.client_retry.RetryPolicy`'s.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        retry_budget: float = 60.0,
        rng: random.Random | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            max_retry_wait=max_retry_wait,
            retry_budget=retry_budget,
            rng=rng,
        )
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)

    def __enter__(self) -> CaptionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def caption(
        self,
        image: ImageInput,
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        **option_fields: Any,
    ) -> CaptionResponse:
        """Caption one image (a path, the file's bytes, or a PIL image).

        ``option_fields`` are :class:`DecodingOptions` fields (``method="beam", beam_size=5``), laid over
        ``options`` when both are given. Raises ``ValueError`` for a bad option (before any request) and a
        :class:`CaptionError` subclass when the request fails.
        """
        decoding = resolve_options(options, option_fields)  # before reading the image: no I/O for a bad option
        return self._caption(read_upload(image), decoding, attention)

    def caption_many(
        self,
        images: Iterable[ImageInput],
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        concurrency: int = 4,
        **option_fields: Any,
    ) -> list[CaptionResponse | CaptionError]:
        """Caption many images, ``concurrency`` requests at a time; results in the order of ``images``.

        A failed image does not stop the others: its slot holds the :class:`CaptionError` it raised
        (check with ``isinstance(result, CaptionError)``). Bad options or an argument that is not an image
        raise at once, before any request. Files are read in the worker threads, so at most
        ``concurrency`` of them are in memory at a time.
        """
        decoding = resolve_options(options, option_fields)
        batch = _checked_batch(images, concurrency)

        def caption_one(image: ImageInput) -> CaptionResponse | CaptionError:
            try:
                return self._caption(read_upload(image), decoding, attention)
            except CaptionError as exc:
                return exc

        pool = ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(batch))), thread_name_prefix="caption")
        try:
            return list(pool.map(caption_one, batch))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an unexpected error, send nothing more

    def _caption(self, upload: Upload, options: DecodingOptions, attention: bool) -> CaptionResponse:
        params = query_params(options, attention)
        attempt, waited = 0, 0.0
        while True:
            try:
                response = self._http.post("caption", params=params, files={IMAGE_FIELD: upload})
            except httpx.TransportError as exc:
                decision = self._retry.decide(attempt, waited, error=exc)
                if decision.wait is None:
                    raise _connection_failed(self.base_url, exc, attempt + 1, decision.reason) from exc
            else:
                decision = self._retry.decide(attempt, waited, response=response)
                if decision.wait is None:
                    return read_reply(response, attempt + 1, decision.reason)
            _sleep(decision.wait)
            waited += decision.wait
            attempt += 1


class AsyncCaptionClient(_ClientBase):
    """:class:`CaptionClient` for asyncio: the same arguments and methods, as coroutines."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        retry_budget: float = 60.0,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            max_retry_wait=max_retry_wait,
            retry_budget=retry_budget,
            rng=rng,
        )
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncCaptionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def caption(
        self,
        image: ImageInput,
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        **option_fields: Any,
    ) -> CaptionResponse:
        """See :meth:`CaptionClient.caption`; reading a file or encoding a PIL image runs on a thread."""
        decoding = resolve_options(options, option_fields)
        return await self._caption(await _upload_off_loop(image), decoding, attention)

    async def caption_many(
        self,
        images: Iterable[ImageInput],
        options: DecodingOptions | None = None,
        *,
        attention: bool = False,
        concurrency: int = 4,
        **option_fields: Any,
    ) -> list[CaptionResponse | CaptionError]:
        """See :meth:`CaptionClient.caption_many`: results in input order, a failed image's slot holds its
        :class:`CaptionError`. At most ``concurrency`` requests (and files in memory) at a time."""
        decoding = resolve_options(options, option_fields)
        batch = _checked_batch(images, concurrency)
        results: list[CaptionResponse | CaptionError | None] = [None] * len(batch)
        semaphore = asyncio.Semaphore(concurrency)

        async def caption_one(index: int, image: ImageInput) -> None:
            async with semaphore:
                try:
                    results[index] = await self._caption(await _upload_off_loop(image), decoding, attention)
                except CaptionError as exc:
                    results[index] = exc

        tasks = [asyncio.ensure_future(caption_one(i, image)) for i, image in enumerate(batch)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # an unexpected error (or cancellation): the rest are not wanted any more
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results  # type: ignore[return-value]  # every slot is filled once gather returns

    async def _caption(self, upload: Upload, options: DecodingOptions, attention: bool) -> CaptionResponse:
        params = query_params(options, attention)
        attempt, waited = 0, 0.0
        while True:
            try:
                response = await self._http.post("caption", params=params, files={IMAGE_FIELD: upload})
            except httpx.TransportError as exc:
                decision = self._retry.decide(attempt, waited, error=exc)
                if decision.wait is None:
                    raise _connection_failed(self.base_url, exc, attempt + 1, decision.reason) from exc
            else:
                decision = self._retry.decide(attempt, waited, response=response)
                if decision.wait is None:
                    return read_reply(response, attempt + 1, decision.reason)
            await _async_sleep(decision.wait)
            waited += decision.wait
            attempt += 1


async def _upload_off_loop(image: ImageInput) -> Upload:
    """:func:`~captioner.client_uploads.read_upload` on a thread when it reads a file or encodes, so the event loop
    keeps serving other requests."""
    if isinstance(image, bytes | bytearray | memoryview):
        return read_upload(image)
    return await asyncio.to_thread(read_upload, image)


def _checked_batch(images: Iterable[ImageInput], concurrency: int) -> list[ImageInput]:
    """``images`` as a list, every item checked to be an image argument before the first request goes out."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if isinstance(images, str | os.PathLike | bytes | Image.Image):
        raise TypeError("caption_many takes a list of images; use caption() for one")
    batch = list(images)
    for image in batch:
        check_image_type(image)
    return batch


def _connection_failed(base_url: str, exc: httpx.TransportError, attempts: int, reason: str = "") -> ConnectionFailed:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_failed"
    detail = str(exc) or exc.__class__.__name__
    return ConnectionFailed(None, code, f"no answer from {base_url}: {detail} ({gave_up(attempts, reason)})")


# The clients' only waits, named so tests can see them without waiting.
def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
