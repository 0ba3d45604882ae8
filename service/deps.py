"""What routes receive through ``Depends``: settings, the loaded model, the batcher, the API-key check.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency on its thread pool, and a
thread hop per dependency per request is measurable latency for work that is one attribute look-up.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from captioner.pipeline import CaptionPipeline
from service.batching import MicroBatcher
from service.errors import ApiError
from service.metrics import ServiceMetrics
from service.settings import Settings


@dataclass(frozen=True)
class LoadedModel:
    """The model the lifespan hook loaded, with what identifies it."""

    model: CaptionPipeline
    id: str  # "<checkpoint stem>-<first 12 hex of its sha256>"
    checkpoint: str
    checkpoint_sha256: str


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_loaded(request: Request) -> LoadedModel:
    loaded = getattr(request.app.state, "loaded", None)
    if loaded is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet; retry when GET /ready returns 200")
    return loaded


def fault(request: Request) -> ApiError | None:
    """503 when the batcher can no longer serve (it died, or the model hung): liveness fails."""
    batcher: MicroBatcher | None = request.app.state.batcher
    if batcher is not None and batcher.fault is not None:
        return ApiError(503, "unhealthy", f"the server cannot serve: {batcher.fault}")
    return None


def not_serving(request: Request) -> ApiError | None:
    """Why the service takes no new work now (a 503 to answer), or None: loading, draining, or a fault."""
    if getattr(request.app.state, "loaded", None) is None:
        return ApiError(503, "not_ready", "the model is not loaded yet; retry when GET /ready returns 200")
    if request.app.state.draining:
        return ApiError(
            503, "draining", "the server is shutting down; retry (on another replica)", headers={"Retry-After": "1"}
        )
    return fault(request)


async def get_batcher(request: Request, loaded: Annotated[LoadedModel, Depends(get_loaded)]) -> MicroBatcher:
    return request.app.state.batcher


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of CAPTIONER_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of CAPTIONER_API_KEYS>")


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """With keys configured, refuse (401) before the route reads the body or touches the model."""
    if not settings.api_keys:
        return
    given = api_key or (bearer.credentials if bearer is not None else None)
    if given is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send it in the X-API-Key header (or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Compare against every key in constant time so the response time does not reveal a prefix match.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in settings.api_keys]
    if not any(matches):
        raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Settings, Depends(get_settings)]
LoadedDep = Annotated[LoadedModel, Depends(get_loaded)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ApiKeyDep = Depends(require_api_key)
