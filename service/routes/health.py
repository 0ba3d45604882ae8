"""Liveness, readiness and Prometheus metrics; always open, so probes and scrapers need no key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import MetricsDep, fault, not_serving
from service.errors import ApiError
from service.schemas import ErrorResponse, Health, Ready
from service.upload_budget import UploadBudget

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=Health,
    summary="Liveness: the process can serve (503 when the model thread hung or the batcher died: restart it)",
    responses={503: {"model": ErrorResponse, "description": "the batcher died or the model hung"}},
)
async def health(request: Request) -> Health:
    error = fault(request)
    if error is not None:
        raise error
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    summary="Readiness: the model is loaded and new requests are taken",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "loading, shutting down (draining), a fault, or uploads hold all the memory allowed them",
        }
    },
)
async def ready(request: Request) -> Ready:
    error = not_serving(request)
    if error is not None:
        raise error
    uploads: UploadBudget = request.app.state.uploads
    saturation = uploads.saturation
    if uploads.memory_nearly_full:  # most new uploads would be refused: send traffic elsewhere
        raise ApiError(503, "saturated", f"not taking uploads: {saturation}", headers={"Retry-After": "5"})
    return Ready(model_id=request.app.state.loaded.id, uploads_saturated=saturation)


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests by status, latency histograms, micro-batch sizes",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(service_metrics: MetricsDep) -> Response:
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
