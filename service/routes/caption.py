"""``POST /caption``: one uploaded image in, its captions out, through the micro-batcher."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import ValidationError

from captioner.decoding import DecodingOptions
from captioner.results import CaptionResult
from captioner.transforms import ImageError, Preprocess, load_crop
from service.admission import AdmissionControl
from service.batching import BatcherStopped, MicroBatcher, OutOfMemory, QueueTimeout
from service.deps import ApiKeyDep, BatcherDep, LoadedDep, LoadedModel, SettingsDep, fault, not_serving
from service.errors import ApiError, describe_validation_errors, image_error
from service.schemas import (
    CONFIDENCE_DECIMALS,
    AppliedOptions,
    AttentionRegion,
    CaptionOptions,
    CaptionOut,
    CaptionResponse,
    ErrorResponse,
    ImageInfo,
    TagOut,
    Timing,
)
from service.upload_budget import UploadBudget
from service.uploads import Form, read_form

log = logging.getLogger(__name__)

router = APIRouter(tags=["caption"], dependencies=[ApiKeyDep])

IMAGE_FIELD = "image"


def _openapi_extra() -> dict[str, Any]:
    """The multipart body and query parameters, read by hand (never spooled to disk), documented here."""
    properties = CaptionOptions.model_json_schema()["properties"]
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": prop.get("description", ""),
            "schema": {k: v for k, v in prop.items() if k not in ("title", "description")},
        }
        for name, prop in properties.items()
    ]
    form_properties = {
        IMAGE_FIELD: {
            "type": "string",
            "format": "binary",
            "description": "the image (JPEG, PNG, GIF, WebP, BMP or TIFF); never written to disk",
        },
        **properties,
    }
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "description": "multipart/form-data: the image in field `image`; options may also be form fields "
            "(a form field overrides the query parameter of the same name)",
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [IMAGE_FIELD], "properties": form_properties}
                }
            },
        },
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty body, missing `image` field, unreadable or corrupt image"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key (when keys are configured)"},
    408: {
        "model": ErrorResponse,
        "description": "the headers or the body did not arrive in time (idle timeout, or below the minimum rate)",
    },
    413: {"model": ErrorResponse, "description": "upload over the byte limit, or image over the pixel limit"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data, or not a supported image format"},
    431: {"model": ErrorResponse, "description": "headers over the size or field-count limit"},
    422: {
        "model": ErrorResponse,
        "description": "an option outside its valid range, or one the method does not use (the message names it); "
        "`confidence_unavailable`: min_confidence above 0 on a model without a confidence calibration",
    },
    503: {
        "model": ErrorResponse,
        "description": "overloaded (estimated wait over the budget, too many requests in progress, too many slow "
        "uploads, or uploads hold all the memory allowed them), shutting down, not loaded, or out of memory; retry "
        "after the `Retry-After` header's seconds (another replica)",
    },
    504: {"model": ErrorResponse, "description": "waited longer than the queue deadline; never reached the model"},
}


@router.post(
    "/caption",
    response_model=CaptionResponse,
    summary="Caption an uploaded image",
    responses=_ERRORS,
    openapi_extra=_openapi_extra(),
)
async def caption(request: Request, loaded: LoadedDep, batcher: BatcherDep, settings: SettingsDep) -> CaptionResponse:
    started = time.perf_counter()
    _admit(request, batcher)
    uploads: UploadBudget = request.app.state.uploads
    with batcher.expecting(), uploads.upload() as upload:  # the upload's bytes are held until after decoding
        form = await read_form(request, max_file_bytes=settings.max_upload_bytes, upload=upload)
        params = _parse_options(request.query_params, form.fields)
        try:
            options = params.decoding_options()
        except ValueError as exc:
            raise ApiError(422, "invalid_option", str(exc)) from None
        _check_model_supports(loaded, options)
        data = _image_bytes(form)
        del form  # from here on only the decoded image is kept
        _admit(request, batcher, uploaded=True)
        decode_started = time.perf_counter()
        with batcher.decoding():
            image, (width, height) = await anyio.to_thread.run_sync(
                _decode, data, settings.max_image_pixels, loaded.model.preprocess_config,
                limiter=request.app.state.decode_limiter,
            )  # fmt: skip
        decode_ms = (time.perf_counter() - decode_started) * 1000.0
        del data
    try:
        result, batch = await batcher.submit(image, options)
    except BatcherStopped as exc:
        raise ApiError(503, "not_ready", str(exc)) from None
    except QueueTimeout as exc:
        request.app.state.metrics.queue_timeouts.inc()
        raise ApiError(504, "queue_timeout", str(exc)) from None
    except OutOfMemory as exc:
        raise ApiError(503, "out_of_memory", str(exc), headers={"Retry-After": "1"}) from None

    shape = result.attention_shape if params.attention else None  # None: not asked for, or a model without attention
    with_attention = shape is not None
    return CaptionResponse(
        captions=_captions(result, with_attention),
        abstained=result.abstained,
        tags=[TagOut(name=t.name, confidence=_rounded(t.confidence), parents=list(t.parents)) for t in result.tags],
        options=AppliedOptions(**options.to_dict(), attention=params.attention),
        model_id=loaded.id,
        image=ImageInfo(width=width, height=height),
        attention_shape=list(shape) if shape is not None else None,
        attention_region=_crop_region(width, height, loaded.model.preprocess_config) if with_attention else None,
        timing=Timing(
            total_ms=round((time.perf_counter() - started) * 1000.0, 3),
            decode_ms=round(decode_ms, 3),
            queue_ms=round(batch.queue_ms, 3),
            model_ms=round(batch.model_ms, 3),
            batch_size=batch.size,
        ),
    )


def _admit(request: Request, batcher: MicroBatcher, *, uploaded: bool = False) -> None:
    """Refuse at once (503) when draining, faulty, or over the admission budget: from the headers, before
    the body is read, and again with ``uploaded`` when the upload is complete (see service.admission)."""
    metrics = request.app.state.metrics
    error = fault(request) if uploaded else not_serving(request)  # draining refuses new requests only
    if error is not None:
        metrics.refused.labels("draining" if error.code == "draining" else "fault").inc()
        raise error
    admission: AdmissionControl = request.app.state.admission
    refusal = admission.refuse(batcher.work_ahead, check_cap=not uploaded)
    if refusal is not None:
        metrics.refused.labels(refusal.reason).inc()
        raise ApiError(503, "overloaded", refusal.message, headers={"Retry-After": str(refusal.retry_after_s)})


def _parse_options(query: Mapping[str, str], fields: Mapping[str, str]) -> CaptionOptions:
    try:
        return CaptionOptions.model_validate({**query, **fields})
    except ValidationError as exc:
        raise ApiError(422, "invalid_option", describe_validation_errors(exc.errors())) from None


def _check_model_supports(loaded: LoadedModel, options: DecodingOptions) -> None:
    """Refuse (422) what the served model cannot do before any work is queued: abstaining needs confidences,
    and a model without a confidence calibration has none (the library would raise ConfidenceUnavailableError)."""
    if options.min_confidence > 0 and loaded.model.confidence_model is None:
        raise ApiError(
            422,
            "confidence_unavailable",
            f"min_confidence needs a model with a confidence calibration, and the served model {loaded.id} has "
            "none (GET /model: confidence is null; add one with `captioner calibrate`): leave min_confidence at 0",
        )


def _rounded(confidence: float) -> float:
    return round(float(confidence), CONFIDENCE_DECIMALS)


def _image_bytes(form: Form) -> bytearray:
    if IMAGE_FIELD in form.files:
        return form.files[IMAGE_FIELD]
    if form.files:
        got = ", ".join(repr(name) for name in form.files)
        message = f"no file in field {IMAGE_FIELD!r} (got file field {got}); send the image as field {IMAGE_FIELD!r}"
    else:
        message = f"no image: send the image file in multipart field {IMAGE_FIELD!r}"
    raise ApiError(400, "missing_image", message)


def _decode(data: bytearray, max_pixels: int, preprocess: Preprocess) -> tuple[Image.Image, tuple[int, int]]:
    """On a decode thread: the upload's bytes (in memory) to the encoder's RGB crop, and the upright image size.

    Decoding, resizing and cropping are the library's own steps (PIL, no torch), done here so the model
    thread only converts the small crop to a tensor; the full-size image is dropped at once.
    """
    try:
        crop = load_crop(data, preprocess, max_pixels=max_pixels)
        return crop, crop.info["original_size"]
    except ImageError as exc:
        raise image_error(exc) from None
    except Exception as exc:  # image decoders fail in many ways on hostile input; a bad upload is never a 500
        log.warning("image decoder raised %s: %s", exc.__class__.__name__, exc)
        raise ApiError(400, "invalid_image", f"cannot decode image: {exc.__class__.__name__}: {exc}") from None


def _captions(result: CaptionResult, with_attention: bool) -> list[CaptionOut]:
    return [
        CaptionOut(
            text=c.text,
            tokens=c.tokens,
            log_prob=c.log_prob,
            score=c.score,
            confidence=_rounded(c.confidence) if c.confidence is not None else None,
            attention=[[round(w, 5) for w in row] for row in c.attention] if with_attention and c.attention else None,
        )
        for c in result.captions
    ]


def _crop_region(width: int, height: int, preprocess: Preprocess) -> AttentionRegion:
    """Where the encoder's centre crop (which the attention grid covers) lies in the upright image."""
    resized_w, resized_h, _, _ = preprocess.crop_geometry(width, height)
    x0, y0, x1, y1 = preprocess.crop_box(width, height)
    return AttentionRegion(
        left=x0 / resized_w, top=y0 / resized_h, width=(x1 - x0) / resized_w, height=(y1 - y0) / resized_h
    )
