"""Service settings, read from ``CAPTIONER_*`` environment variables (or passed in by tests/the CLI)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captioner.runtime import DEFAULT_MMAP_THRESHOLD
from captioner.transforms import DEFAULT_MAX_PIXELS


class Settings(BaseSettings):
    """Everything the service can be told; e.g. ``CAPTIONER_CHECKPOINT=/models/best.pt``."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", frozen=True)

    checkpoint: Path | None = Field(
        None,
        description="checkpoint file, an ONNX export folder (backend onnxruntime), or unset / 'default': the "
        "model bundled with captioner",
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what runs the model: onnxruntime (CPU; the checkpoint is exported to ONNX on first use and "
        "cached in CAPTIONER_CACHE_DIR) or torch; auto: onnxruntime on CPU when it is installed, else torch",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest accepted width x height")
    max_batch_size: int = Field(16, ge=1, le=1024, description="most requests run through the model together")
    max_wait_ms: float = Field(
        5.0, ge=0.0, le=10_000.0, description="how long a batch waits for requests that are already arriving"
    )
    admission_budget_s: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="refuse a request (503 + Retry-After) when its estimated wait for the model is longer: "
        "requests in progress x measured model seconds per request",
    )
    max_queue: int = Field(
        256,
        ge=1,
        le=100_000,
        description="most requests with their upload complete (decoding, queued or running) at once; uploads "
        "still arriving are bounded by the upload limits below instead",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="most open HTTP connections; one more is answered 503 and closed at once",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="a connection must send a request's line and headers within this long (from connecting, or "
        "from the previous response): else it is answered 408 and closed",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="largest request line plus headers; more is answered 431 and the connection closed",
    )
    max_header_count: int = Field(100, ge=8, le=10_000, description="most header fields in a request (431)")
    upload_idle_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="an upload that sends nothing for this long is answered 408; it is also the grace before "
        "the minimum rate applies",
    )
    min_upload_bytes_per_s: int = Field(
        32 * 1024,
        ge=0,
        le=1024**3,
        description="after the idle timeout's grace, an upload must have averaged at least this rate (else 408): "
        "a 10 MiB image gets 10 s + 320 s at the default; 0 turns the rule off",
    )
    max_upload_memory_mb: int = Field(
        256,
        ge=1,
        le=1024**2,
        description="most bytes of request bodies held in memory by all uploads still arriving; a chunk that "
        "would go over is refused (503 + Retry-After) and its upload dropped",
    )
    slow_upload_after_s: float = Field(
        2.0,
        gt=0.0,
        le=3600.0,
        description="an upload still arriving after this long is slow: it needs one of CAPTIONER_MAX_SLOW_UPLOADS "
        "slots, so slow clients cannot crowd out fast ones",
    )
    max_slow_uploads: int = Field(
        32,
        ge=0,
        le=100_000,
        description="most slow uploads at once; one more is refused (503 + Retry-After, connection closed)",
    )
    queue_timeout_s: float = Field(
        8.0,
        gt=0.0,
        le=3600.0,
        description="a decoded request that has waited this long for the model is answered 504 and never run",
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0.0,
        le=86_400.0,
        description="a batch running longer than this means the model is hung: pending requests fail with 503, "
        "/ready and /health answer 503 so the orchestrator restarts the process",
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0.0,
        le=3600.0,
        description="after SIGTERM: /ready answers 503, new requests 503, requests in progress get this long "
        "to finish before the process exits",
    )
    access_log: Literal["text", "json", "off"] = Field(
        "text",
        description="a line per request: uvicorn's text line, one JSON object (method, path, status, duration, "
        "request id, client), or none",
    )
    encoder_chunk_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="most images per encoder pass within a batch; unset: 8 on CPU (faster per image than big "
        "batches), the whole batch on GPU",
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding uploads (PIL; torch has its own)")
    malloc_mmap_threshold_mb: int = Field(
        DEFAULT_MMAP_THRESHOLD // 2**20,
        ge=0,
        le=1024,
        description="keep freed tensor memory below this size for reuse instead of returning it to the kernel "
        "(glibc; see captioner.runtime); 0 leaves malloc as it is",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; when set, /caption and /model need one of them"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS ('*' for any)"
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated IP addresses or networks (CIDR) of the proxies in front of the server: only a "
        "request from one of them has its X-Forwarded-For and X-Forwarded-Proto believed (the client address in "
        "the access log); empty: those headers are ignored and the client is the connection's peer",
    )
    require_api_keys: bool = Field(
        False,
        description="refuse to start when CAPTIONER_API_KEYS is empty; false: start with an open API and log a warning",
    )

    @field_validator("api_keys", "cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        # uvicorn takes an entry it cannot parse as a literal host name that never matches, so a typo would
        # silently trust nobody (or, with "*", let every client choose the address that is logged): refuse both.
        for entry in value:
            if entry == "*":
                raise ValueError("'*' would let every client choose the address that is logged; list the proxies")
            try:
                ipaddress.ip_network(entry)  # strict: 10.0.0.1/8 (host bits set) is refused, not widened
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or network (CIDR, e.g. 10.0.0.0/8): {exc}") from None
        return value

    @field_validator("require_api_keys")
    @classmethod
    def _keys_when_required(cls, required: bool, info: ValidationInfo) -> bool:
        if required and not info.data.get("api_keys"):
            raise ValueError(
                "CAPTIONER_API_KEYS is empty; set it (comma-separated keys), or CAPTIONER_REQUIRE_API_KEYS=false "
                "to serve an open API on purpose"
            )
        return required
