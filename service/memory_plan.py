"""The most memory one replica can hold with everything in flight at once, from its settings.

Every kind of request state the server keeps is bounded by a setting, so the worst case is a sum:

==========================  ==================================================================
model and runtime           the loaded model, its runtime and a full micro-batch's activations:
                            ``MODEL_UNDER_LOAD_MIB``, measured (below)
upload bodies               ``max_upload_memory_mb`` (``service.upload_budget`` counts every byte
                            received until it is dropped)
connection buffers          ``max_connections`` x (the headers' buffer, ``max_header_bytes``, and
                            uvicorn's 64 KiB of body read ahead of the app)
decoding                    ``decode_threads`` x ``max_image_pixels`` x ``DECODE_BYTES_PER_PIXEL``
                            (one full-size image per decode thread; WebP, which costs more per
                            pixel, has a lower pixel limit: ``captioner.transforms``)
queued crops                ``max_queue`` x the encoder's crop (RGB bytes)
==========================  ==================================================================

The README states this sum for the default settings, and ``tests/test_memory_plan.py`` checks it against
the Kubernetes manifests' memory limit (with the ConfigMap's settings), and checks the two measured
constants: decoding each supported kind of image stays within ``DECODE_BYTES_PER_PIXEL``.

``MODEL_UNDER_LOAD_MIB``: the bundled model on the ONNX Runtime backend, peak RSS (VmHWM) of
``captioner-serve`` after 96 requests at concurrency 16 and 96 at 32 (Flickr8k photos, beam search,
16-request micro-batches): 1,054 and 1,076 MiB on the 2-core test VM; rounded up. A bigger checkpoint
needs its own measurement (``bench/upload_pressure.py`` prints the peak RSS).
"""

from __future__ import annotations

from dataclasses import dataclass

from captioner.transforms import DECODE_BYTES_PER_PIXEL
from service.settings import Settings

MODEL_UNDER_LOAD_MIB = 1100
UVICORN_BODY_READ_AHEAD = 64 * 1024  # uvicorn's HIGH_WATER_LIMIT: it stops reading a connection past this
DEFAULT_CROP = 260  # the bundled model's EfficientNet-Lite2 crop


@dataclass(frozen=True)
class MemoryItem:
    name: str
    formula: str
    mib: float


def worst_case(settings: Settings, *, crop: int = DEFAULT_CROP) -> list[MemoryItem]:
    """What each kind of request state can hold at most under ``settings``, in MiB."""
    mib = 2**20
    per_connection = settings.max_header_bytes + UVICORN_BODY_READ_AHEAD
    return [
        MemoryItem("model and runtime under load", "measured", MODEL_UNDER_LOAD_MIB),
        MemoryItem("upload bodies", "CAPTIONER_MAX_UPLOAD_MEMORY_MB", settings.max_upload_memory_mb),
        MemoryItem(
            "connection buffers",
            f"{settings.max_connections} connections x {per_connection // 1024} KiB",
            settings.max_connections * per_connection / mib,
        ),
        MemoryItem(
            "decoding",
            f"{settings.decode_threads} threads x {settings.max_image_pixels / 1e6:g} MP x {DECODE_BYTES_PER_PIXEL} B",
            settings.decode_threads * settings.max_image_pixels * DECODE_BYTES_PER_PIXEL / mib,
        ),
        MemoryItem(
            "queued crops",
            f"{settings.max_queue} x {crop}x{crop}x3 B",
            settings.max_queue * crop * crop * 3 / mib,
        ),
    ]


def total_mib(items: list[MemoryItem]) -> float:
    return sum(item.mib for item in items)


def markdown_table(items: list[MemoryItem]) -> str:
    """The table the README shows (``tests/test_memory_plan.py`` checks that it is this one)."""
    lines = ["| held by | bound | MiB |", "|---|---|---:|"]
    lines += [f"| {item.name} | {item.formula} | {item.mib:,.0f} |" for item in items]
    lines.append(f"| **worst case** | | **{total_mib(items):,.0f}** |")
    return "\n".join(lines)
