"""Liveness, readiness and Prometheus metrics; always open, so probes and scrapers need no key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import LoadedDep, MetricsDep
from service.schemas import ErrorResponse, Health, Ready

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="The process is alive")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    summary="The model is loaded and requests can be served",
    responses={503: {"model": ErrorResponse, "description": "the model is not loaded"}},
)
async def ready(loaded: LoadedDep) -> Ready:
    return Ready(model_id=loaded.id)


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests by status, latency histograms, micro-batch sizes",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(service_metrics: MetricsDep) -> Response:
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
