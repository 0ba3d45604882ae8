"""Prometheus metrics, one registry per app (so several apps in one process never share counters)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.upload_budget import UploadBudget

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "captioner_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "captioner_request_latency_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "captioner_batch_size", "requests per model micro-batch", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "captioner_batch_seconds",
            "encoder + decoder time per micro-batch",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.refused = Counter(
            "captioner_refused",
            "requests refused before reaching the model, by reason (over_budget, queue_full, draining, fault)",
            ["reason"],
            registry=self.registry,
        )
        self.queue_timeouts = Counter(
            "captioner_queue_timeouts",
            "requests answered 504 after waiting too long for the model",
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "captioner_requests_in_progress",
            "caption requests uploading, decoding, queued or running",
            registry=self.registry,
        )
        self.uploads = Gauge(
            "captioner_uploads_in_progress", "caption requests whose body is still arriving", registry=self.registry
        )
        self.slow_uploads = Gauge(
            "captioner_slow_uploads",
            "uploads arriving for longer than CAPTIONER_SLOW_UPLOAD_AFTER_S (each holds a slow slot)",
            registry=self.registry,
        )
        self.upload_bytes = Gauge(
            "captioner_upload_bytes_held",
            "bytes of request bodies held in memory (limit: CAPTIONER_MAX_UPLOAD_MEMORY_MB)",
            registry=self.registry,
        )
        self.estimated_wait = Gauge(
            "captioner_estimated_wait_seconds",
            "estimated wait of a new caption request for the model",
            registry=self.registry,
        )
        self.model_seconds_per_request = Gauge(
            "captioner_model_seconds_per_request",
            "recent model time per request (exponentially weighted over micro-batches)",
            registry=self.registry,
        )

    def watch_uploads(self, budget: UploadBudget) -> None:
        """The upload gauges read ``budget`` when scraped."""
        self.uploads.set_function(lambda: budget.uploads)
        self.slow_uploads.set_function(lambda: budget.slow)
        self.upload_bytes.set_function(lambda: budget.bytes_held)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP response by status and times it, labelled by route template."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            # The route's template (/caption), never the raw path, so unknown URLs cannot blow up label counts.
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.latency.labels(scope["method"], label).observe(time.perf_counter() - started)
