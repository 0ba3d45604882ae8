"""``create_app(settings)``: the FastAPI application; the model loads in the lifespan hook."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from PIL import Image

from captioner import __version__
from captioner.checkpoint import checkpoint_arg
from captioner.decoding import DecodingOptions
from captioner.default_model import default_checkpoint, model_id
from captioner.digests import file_sha256
from captioner.errors import USER_ERRORS, CaptionerError
from captioner.export_format import METADATA_FILE
from captioner.loading import load_captioner
from captioner.pipeline import CaptionPipeline
from captioner.runtime import tune_malloc
from service.access_log import RequestIdMiddleware
from service.admission import AdmissionControl, ModelTimeEstimator
from service.batching import MicroBatcher, ModelThread
from service.deps import LoadedModel
from service.errors import install_error_handlers
from service.http_protocol import HeaderLimits
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.routes import caption, docs, health, model, web
from service.routes.web import STATIC_DIR
from service.security import SecurityHeadersMiddleware
from service.settings import Settings
from service.upload_budget import UploadBudget, UploadRules

log = logging.getLogger(__name__)

DESCRIPTION = """Caption images with a CNN encoder + recurrent decoder.

`POST /caption` takes a multipart upload (field `image`) and decoding options as query parameters or
form fields. Errors are always `{"error": {"code": ..., "message": ...}}`.
"""


class ModelLoadError(CaptionerError, RuntimeError):
    """The checkpoint could not be loaded; the message is one line saying why."""


def load_model(settings: Settings) -> LoadedModel:
    """Load ``settings.checkpoint`` (unset: the bundled default model); raises :class:`ModelLoadError`."""
    checkpoint = checkpoint_arg(settings.checkpoint)
    try:
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        model = load_captioner(path, device=settings.device, backend=settings.backend)
        model = model.optimize_for_inference()
    except USER_ERRORS as exc:
        hint = "" if settings.checkpoint is not None else " (set CAPTIONER_CHECKPOINT or pass --checkpoint)"
        reason = " ".join(str(exc).split())  # one line, whatever the library's message looks like
        raise ModelLoadError(f"cannot load the model: {reason}{hint}") from exc
    model.encoder_chunk_size = settings.encoder_chunk_size
    sha256 = file_sha256(path / METADATA_FILE if path.is_dir() else path)
    return LoadedModel(model, model_id(checkpoint), str(path), sha256)


WARM_UP_BATCH = 8


def _warm_up(model: CaptionPipeline, batch_size: int) -> tuple[int, float]:
    """A batch with the default options, so the first real request does not pay for kernel selection and
    allocations; returns its size and seconds, admission control's first estimate of the model's speed."""
    crop = model.preprocess_config.crop
    noise = np.random.default_rng(0)
    crops = [Image.fromarray(noise.integers(0, 256, (crop, crop, 3), dtype=np.uint8)) for _ in range(batch_size)]
    model.caption(crops[:1], DecodingOptions(method="greedy", max_length=2))
    started = time.perf_counter()
    model.caption(crops, DecodingOptions())
    return batch_size, time.perf_counter() - started


def warn_if_open(settings: Settings) -> None:
    """Say once, at start, that anyone who reaches the port may caption: an API left open by a missing Secret
    or an empty variable should be seen in the log, not discovered on the bill."""
    if not settings.api_keys:
        log.warning(
            "no API keys (CAPTIONER_API_KEYS is empty): /caption and /model are open to anyone who reaches this "
            "server; set CAPTIONER_REQUIRE_API_KEYS=true to refuse to start without keys"
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    warn_if_open(settings)
    if settings.malloc_mmap_threshold_mb:  # before the model's first allocation; see captioner.runtime
        tune_malloc(settings.malloc_mmap_threshold_mb * 1024 * 1024)
    thread = ModelThread()  # loading and warm-up happen on it too: torch never runs on another thread
    try:
        loaded = await thread.run(load_model, settings)
        warm_up = await thread.run(_warm_up, loaded.model, min(WARM_UP_BATCH, settings.max_batch_size))
    except BaseException as exc:
        if isinstance(exc, ModelLoadError):
            app.state.startup_error = str(exc)  # captioner-serve prints this line instead of a traceback
        await thread.close()
        raise
    metrics: ServiceMetrics = app.state.metrics
    admission = AdmissionControl(
        ModelTimeEstimator(), budget_s=settings.admission_budget_s, max_queue=settings.max_queue
    )
    admission.estimator.observe(*warm_up)

    def on_batch(size: int, seconds: float) -> None:
        metrics.observe_batch(size, seconds)
        admission.estimator.observe(size, seconds)

    batcher = MicroBatcher(
        loaded.model,
        thread,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        queue_timeout_s=settings.queue_timeout_s,
        stall_timeout_s=settings.stall_timeout_s,
        on_batch=on_batch,
    )
    await batcher.start()
    metrics.in_progress.set_function(lambda: batcher.outstanding)
    metrics.estimated_wait.set_function(lambda: admission.estimator.wait_s(batcher.work_ahead))
    metrics.model_seconds_per_request.set_function(lambda: admission.estimator.seconds_per_request or 0.0)
    app.state.admission = admission
    app.state.decode_limiter = anyio.CapacityLimiter(settings.decode_threads)
    app.state.batcher = batcher
    app.state.loaded = loaded
    log.info(
        "serving %s from %s on %s with %s", loaded.id, loaded.checkpoint, loaded.model.device, loaded.model.backend
    )
    try:
        yield
    finally:
        app.state.loaded = None
        await batcher.stop()
        await thread.close(wait=batcher.fault is None)  # a hung model thread is left behind
        app.state.batcher = None


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; ``settings`` default to the ``CAPTIONER_*`` environment."""
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="captioner",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # service.routes.docs serves /docs and /redoc with their assets, not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.loaded = None
    app.state.batcher = None
    app.state.admission = None
    app.state.draining = False  # set on SIGTERM (captioner-serve): refuse new work, finish what is in progress
    app.state.startup_error = None
    app.state.metrics = ServiceMetrics()
    app.state.uploads = UploadBudget(
        max_bytes=settings.max_upload_memory_mb * 2**20,
        max_slow=settings.max_slow_uploads,
        rules=UploadRules(
            idle_timeout_s=settings.upload_idle_timeout_s,
            min_bytes_per_s=settings.min_upload_bytes_per_s,
            slow_after_s=settings.slow_upload_after_s,
        ),
    )
    app.state.metrics.watch_uploads(app.state.uploads)
    install_error_handlers(app)
    app.add_middleware(HeaderLimits, max_count=settings.max_header_count, max_bytes=settings.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(SecurityHeadersMiddleware)  # errors and 404s get the headers too
    app.add_middleware(RequestIdMiddleware, json_log=settings.access_log == "json")  # outermost: times everything
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.include_router(health.router)
    app.include_router(model.router)
    app.include_router(caption.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
