"""Export a :class:`~captioner.model.Captioner` to ONNX: three graphs, one metadata file and their manifest.

An export folder holds::

    encoder.onnx        pixels (B, 3, S, S) -> grid (B, C, h, w) [, class_logits (B, 1000)]; the encoder fused
                        for inference, with its ImageNet-1k head's logits when it has one
    decoder_init.onnx   grid -> the state before <start>: h [, c] (B, L, H) [, memory (B, N, E), keys (B, N, A)]
    decoder_step.onnx   tokens (B,) + state -> logits (B, V), next_h [, next_c] [, alpha (B, N)]
    captioner.json      vocabulary, preprocessing, model config, the source checkpoint's sha256, opset,
                        versions, the names of every graph input and output, and the export's own check
    manifest.json       {"sha256": {file name: sha256}} of the four files above, checked on every load
                        (:mod:`captioner.export_integrity`)

The batch dimension is dynamic in every graph. Decoding stays in Python (``captioner.decoding``): the
two decoder graphs are exactly ``CaptionDecoder.init_state`` and ``CaptionDecoder.step``, so greedy,
sampling and beam search run unchanged on either backend. ``--quantize int8-decoder`` stores the
decoder's weights in int8, ``--quantize int8`` the encoder too (see :mod:`captioner.onnx_quantize`).

The export checks itself (:func:`check_export`) and refuses to finish when the graphs disagree with
the PyTorch model beyond :data:`FEATURE_ATOL` / :data:`LOGIT_ATOL`. Nobody but the export's owner may
write into it: the folder and its files lose their group and other write bits whatever the umask, since
the export cache refuses an entry that others could have changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from captioner.checkpoint import to_jsonable
from captioner.decoder import CaptionDecoder, DecoderState
from captioner.digests import file_sha256
from captioner.encoders import ImageEncoder
from captioner.errors import CaptionerError, one_line
from captioner.export_format import (
    DIGESTED_FILES,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    GRAPH_FILES,
    MANIFEST_FILE,
    METADATA_FILE,
    NOT_WRITABLE_BY_OTHERS,
    QUANTIZE_CHOICES,
    encoder_output_names,
    init_output_names,
    state_names,
    step_input_names,
    step_output_names,
)
from captioner.transforms import normalize_crops

if TYPE_CHECKING:
    from captioner.model import Captioner

log = logging.getLogger(__name__)

OPSET = 18  # the dynamo exporter's lowest; ONNX Runtime 1.16+ runs it

# What the self-check accepts between the fp32 graphs and PyTorch (measured on the default model:
# features differ by at most ~3e-5 on values up to 6, step logits by ~4e-6).
FEATURE_ATOL = 1e-3  # largest absolute difference of the encoder's feature grids
LOGIT_ATOL = 1e-3  # largest absolute difference of next-word logits along the same words
CLASS_PROBABILITY_ATOL = 1e-3  # largest absolute difference of the class head's probabilities (fp32 only)
# int8 changes the features on purpose: the check asks only that they stay close in relative terms.
INT8_FEATURE_RTOL = 0.25  # ||int8 - fp32|| / ||fp32|| over the check images
CHECK_IMAGES_FROM_CALIBRATION = 4  # an int8 encoder's check photos, when none are given: its first calibration photos
# An int8 decoder's logits move by rounding; the check bounds them relative to the logits' spread.
INT8_LOGIT_RTOL = 0.05  # ||int8 - fp32|| / ||fp32 - mean|| of each step's logits, along the same words

# The libraries behind torch.onnx.export(dynamo=True): they log every optimisation pass at INFO (over a
# hundred lines for the default model, on any terminal whose root logger shows INFO, as the service's does)
# and warn about internals the export's self-check makes moot.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "onnxruntime.quantization")


class ExportError(CaptionerError, RuntimeError):
    """The export failed or its self-check found the graphs disagreeing with PyTorch."""


class _EncoderGraph(nn.Module):
    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid, class_logits = self.encoder.forward_features_and_logits(pixels)
        return (grid, *((class_logits,) if class_logits is not None else ()))


class _InitGraph(nn.Module):
    def __init__(self, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.decoder.init_state(grid)
        return (*state.hidden, *((state.memory, state.keys) if self.decoder.config.attention else ()))


class _StepGraph(nn.Module):
    def __init__(self, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.n_hidden = len(state_names(decoder.config))

    def forward(self, tokens: torch.Tensor, *state_parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = tuple(state_parts[: self.n_hidden])
        rest = state_parts[self.n_hidden :]
        state = DecoderState(hidden, *rest) if rest else DecoderState(hidden)
        logits, state, alpha = self.decoder.step(tokens, state)
        return (logits, *state.hidden, *((alpha,) if alpha is not None else ()))


@dataclass
class ExportReport:
    out_dir: Path
    files: dict[str, int]  # file name -> bytes
    check: dict[str, Any]


def _require_export_tools() -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):  # the exporter's, and the self-check's runtime
        try:
            __import__(package)
        except ImportError as exc:
            raise ExportError(
                f"ONNX export needs the 'onnx' extra ({package} is not installed): pip install 'captioner[onnx]'"
            ) from exc


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporter's libraries off the terminal for the block: :data:`EXPORTER_LOGGERS` below ERROR,
    warnings ignored, stdout (where the exporter prints its progress) discarded; all restored afterwards.

    Nothing is silenced while this module's logger is enabled for DEBUG: ``--verbose`` on the command
    lines (or ``logging.getLogger("captioner").setLevel(logging.DEBUG)``) shows it all.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Export ``module(*args)`` with a dynamic batch (dimension 0 of every input)."""
    batch = {0: torch.export.Dim("batch", min=1, max=4096)}
    # one entry per positional parameter: the step graph's state arrives as one *args tuple
    dynamic: tuple = (batch,) if len(args) == 1 else (batch, tuple(batch for _ in args[1:]))
    module.eval()  # the graph wrappers are new modules, in training mode until told (what they wrap is in eval)
    program = torch.onnx.export(
        module,
        args,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:
        raise ExportError(f"torch.onnx.export returned nothing for {path.name}")
    program.save(str(path), external_data=False)


def export_onnx(
    model: Captioner,
    out_dir: str | os.PathLike,
    *,
    source: str,
    source_sha256: str,
    quantize: str | None = None,
    calibration_images: list[str] | None = None,
    check_images: list[str] | None = None,
) -> ExportReport:
    """Write ``model`` (a copy, fused for inference) to ``out_dir`` and check the result.

    ``out_dir`` must not exist, be empty, or hold an earlier export (which is replaced); the new export
    is written to a temporary folder beside it and renamed into place only after its check passed, so
    an interrupted or failing export never leaves a half-written folder at ``out_dir``. The exporter's
    own logging, warnings and prints are kept off the terminal (:func:`quiet_exporter`).
    """
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"unknown quantization {quantize!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / METADATA_FILE).is_file())):
        raise ExportError(f"{out} exists and is not an earlier ONNX export; choose an empty or new folder")
    if model.backend != "torch":
        raise ExportError("export needs the PyTorch model; load the checkpoint with backend='torch'")
    _require_export_tools()
    parameters = model.parameter_count()  # before fusing, which folds BatchNorm's parameters away
    if not model.encoder.fused:  # fuse a copy: the caller's model stays as it was
        model = type(model).from_state(model.state_payload(), source=source)
    model = model.to("cpu").optimize_for_inference()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's folder is owner-only; a container's other user must read it, and nobody else write to it
    os.chmod(tmp, 0o777 & ~umask & NOT_WRITABLE_BY_OTHERS)
    try:
        with quiet_exporter():
            report = _write_export(
                model, tmp, source, source_sha256, parameters, quantize, calibration_images, check_images
            )
        for path in tmp.iterdir():
            os.chmod(path, stat.S_IMODE(path.stat().st_mode) & NOT_WRITABLE_BY_OTHERS)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out_dir = out
    return report


def _write_export(
    model: Captioner,
    folder: Path,
    source: str,
    source_sha256: str,
    parameters: int,
    quantize: str | None,
    calibration_images: list[str] | None,
    check_images: list[str] | None,
) -> ExportReport:
    import onnx

    config = model.decoder.config
    crop = model.preprocess_config.crop
    encoder_outputs = encoder_output_names(model.encoder.classifier is not None)
    with torch.no_grad():
        pixels = torch.randn(2, 3, crop, crop)
        grid = model.encoder.forward_features(pixels)
        state = model.decoder.init_state(grid)
        tokens = torch.full((2,), model.vocab.bos_id, dtype=torch.long)
        step_args = (tokens, *state.hidden, *((state.memory, state.keys) if config.attention else ()))
        try:
            encoder_graph = _EncoderGraph(model.encoder)
            _export_graph(encoder_graph, (pixels,), folder / GRAPH_FILES["encoder"], ["pixels"], encoder_outputs)
            init_path = folder / GRAPH_FILES["decoder_init"]
            _export_graph(_InitGraph(model.decoder), (grid,), init_path, ["grid"], init_output_names(config))
            _export_graph(
                _StepGraph(model.decoder),
                step_args,
                folder / GRAPH_FILES["decoder_step"],
                step_input_names(config),
                step_output_names(config),
            )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {exc.__class__.__name__}: {one_line(exc)}") from exc
    quantization = []
    parts = QUANTIZE_CHOICES[quantize] if quantize is not None else ()
    if "encoder" in parts:
        from captioner.onnx_quantize import quantize_encoder

        quantization.append(quantize_encoder(folder / GRAPH_FILES["encoder"], model, calibration_images or []))
    if "decoder" in parts:
        from captioner.onnx_quantize import quantize_decoder

        quantization.append(quantize_decoder(folder))
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "graphs": GRAPH_FILES,
        "io": {
            "encoder": {"inputs": ["pixels"], "outputs": encoder_outputs},
            "decoder_init": {"inputs": ["grid"], "outputs": init_output_names(config)},
            "decoder_step": {"inputs": step_input_names(config), "outputs": step_output_names(config)},
        },
        "config": model.config.to_dict(),
        "vocab": list(model.vocab.tokens),
        "preprocess": model.preprocess_config.to_dict(),
        "encoder": model.encoder.identity(),
        "parameters": parameters,
        "metadata": to_jsonable(model.metadata),
        "caption_rules": model.caption_rules.to_dict() if model.caption_rules is not None else None,
        "confidence_model": model.confidence_model.to_dict() if model.confidence_model is not None else None,
        "vocabulary_extension": model.vocabulary_extension.to_dict() if model.vocabulary_extension else None,
        "source": {"checkpoint": source, "sha256": source_sha256},
        "opset": OPSET,
        "quantization": quantization or None,
        "versions": _versions(onnx.__version__),
    }
    _write_metadata(folder, metadata)  # the check loads the export, through its manifest
    if not check_images and "encoder" in parts:
        # photos like the user's, not synthetic colour fields: an int8 encoder is calibrated for photos, and on the
        # fields the default model's features moved by 0.36 (relative), past the check's limit, against 0.20 on photos
        check_images = (calibration_images or [])[:CHECK_IMAGES_FROM_CALIBRATION]
    check = check_export(model, folder, check_images)
    metadata["check"] = check
    _write_metadata(folder, metadata)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    return ExportReport(folder, files, check)


def _write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    """Write ``captioner.json``, then the manifest of it and the graphs (which are written by then)."""
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    write_manifest(folder)


def write_manifest(folder: Path) -> None:
    """Write ``manifest.json``: the sha256 of every other file of the export in ``folder``, as they are now."""
    digests = {name: file_sha256(folder / name) for name in DIGESTED_FILES}
    (folder / MANIFEST_FILE).write_text(json.dumps({"sha256": digests}, indent=1))


def _versions(onnx_version: str) -> dict[str, str]:
    import onnxruntime

    from captioner import __version__

    return {
        "captioner": __version__,
        "torch": torch.__version__,
        "onnx": onnx_version,
        "onnxruntime": onnxruntime.__version__,
    }


# -- the self-check ---------------------------------------------------------------------------------


def check_images_for(model: Captioner, paths: list[str] | None, count: int = 4) -> torch.Tensor:
    """Pixels for the check: the given images, else ``count`` fixed smooth random pictures."""
    if paths:
        return torch.as_tensor(model.preprocess(paths))
    generator = torch.Generator().manual_seed(0)
    crop = model.preprocess_config.crop
    coarse = torch.rand(count, 3, 8, 8, generator=generator)  # smooth blobs of colour, like a photo's layout
    images = nn.functional.interpolate(coarse, size=(crop, crop), mode="bicubic", align_corners=False)
    crops = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3)
    return torch.from_numpy(normalize_crops(crops, model.preprocess_config))


@torch.inference_mode()
def check_export(model: Captioner, folder: Path, image_paths: list[str] | None = None) -> dict[str, Any]:
    """Compare the export in ``folder`` with ``model`` (PyTorch, fused); raise :class:`ExportError` on a mismatch.

    1. Encoder: the feature grids of the check images (fp32: largest absolute difference at most
       :data:`FEATURE_ATOL`; int8: relative error at most :data:`INT8_FEATURE_RTOL`), and the class head's
       probabilities: present in both or neither, within :data:`CLASS_PROBABILITY_ATOL` in fp32 (int8:
       reported only).
    2. Decoder: both decoders get PyTorch's features and are fed the same words (PyTorch's greedy
       caption); the next-word logits must agree within :data:`LOGIT_ATOL` at every step, and so must the
       chosen word wherever PyTorch's best two words are further apart than twice that tolerance (an int8
       decoder: within :data:`INT8_LOGIT_RTOL`, relative).
    3. End to end (reported, not enforced): beam-3 captions of both backends on the check images.
    """
    from captioner.decoding import DecodingOptions
    from captioner.onnx_model import load_export

    onnx_model = load_export(folder)
    quantized = onnx_model.encoder.quantized
    pixels = check_images_for(model, image_paths)
    reference, reference_logits = model.encoder.forward_features_and_logits(pixels)
    onnx_grid, onnx_class_logits = onnx_model.encoder.forward_features_and_logits(pixels.numpy())
    features, onnx_logits = torch.from_numpy(onnx_grid), _tensor(onnx_class_logits)
    feature_diff = float((features - reference).abs().max())
    feature_rel = float((features - reference).norm() / reference.norm().clamp_min(1e-12))
    if quantized:
        if not feature_rel <= INT8_FEATURE_RTOL:
            raise ExportError(
                f"int8 encoder features differ from fp32 by {feature_rel:.3f} (relative); "
                f"the limit is {INT8_FEATURE_RTOL}"
            )
    elif not feature_diff <= FEATURE_ATOL:
        raise ExportError(
            f"encoder features differ from PyTorch by up to {feature_diff:.2e}; the limit is {FEATURE_ATOL:.0e}"
        )
    class_diff = _check_class_head(reference_logits, onnx_logits, enforce=not quantized)

    logit_diff, logit_rel, steps = _check_decoder(model, onnx_model, reference)
    beam = DecodingOptions(method="beam", beam_size=3)
    torch_texts = [r.captions[0].text for r in model.caption_features(reference, beam)]
    onnx_texts = [r.captions[0].text for r in onnx_model.caption_features(features.numpy(), beam)]
    same = sum(a == b for a, b in zip(torch_texts, onnx_texts, strict=True))
    report = {
        "images": int(pixels.shape[0]),
        "image_source": "given images" if image_paths else "synthetic (smooth random colour fields)",
        "feature_max_abs_diff": feature_diff,
        "feature_relative_diff": feature_rel,
        "class_probability_max_abs_diff": class_diff,
        "logit_max_abs_diff": logit_diff,
        "logit_max_relative_diff": logit_rel,
        "decoder_steps_compared": steps,
        "beam3_captions_identical": f"{same}/{len(torch_texts)}",
        "tolerances": {
            "feature_atol": FEATURE_ATOL,
            "logit_atol": LOGIT_ATOL,
            "int8_feature_rtol": INT8_FEATURE_RTOL,
            "int8_logit_rtol": INT8_LOGIT_RTOL,
            "class_probability_atol": CLASS_PROBABILITY_ATOL,
        },
    }
    log.debug("ONNX export check passed: %s", report)
    return report


def _check_decoder(model: Captioner, onnx_model: Any, features: torch.Tensor) -> tuple[float, float, int]:
    """Feed both decoders PyTorch's greedy captions of ``features``; the largest absolute and relative differences
    of their next-word logits and the steps compared, or :class:`ExportError` (see :func:`check_export`)."""
    from captioner.decoding import DecodingOptions, decode, next_word_logits

    quantized = onnx_model.decoder.quantized
    greedy = decode(model.decoder, features, DecodingOptions(method="greedy"))
    logit_diff, logit_rel, steps = 0.0, 0.0, 0
    for row, hyps in enumerate(greedy):
        words = [model.vocab.bos_id, *hyps[0].tokens]
        torch_state = model.decoder.init_state(features[row : row + 1])
        onnx_state = onnx_model.decoder.init_state(features[row : row + 1].numpy())
        for t, word in enumerate(words):
            token = torch.tensor([word])
            torch_logits, torch_state, _ = next_word_logits(model.decoder, token, torch_state)
            onnx_step, onnx_state, _ = next_word_logits(onnx_model.decoder, token.numpy(), onnx_state)
            finite = torch.isfinite(torch_logits)
            expected, got = torch_logits[finite], torch.from_numpy(onnx_step)[finite]
            diff = float((expected - got).abs().max())
            rel = float((expected - got).norm() / (expected - expected.mean()).norm().clamp_min(1e-12))
            logit_diff, logit_rel, steps = max(logit_diff, diff), max(logit_rel, rel), steps + 1
            where = f"at word {t} of check image {row}"
            if quantized:
                if not rel <= INT8_LOGIT_RTOL:
                    raise ExportError(
                        f"int8 decoder logits differ from fp32 by {rel:.3f} (relative) {where}; "
                        f"the limit is {INT8_LOGIT_RTOL}"
                    )
                continue
            if not diff <= LOGIT_ATOL:
                raise ExportError(
                    f"decoder logits differ from PyTorch by {diff:.2e} {where}; the limit is {LOGIT_ATOL:.0e}"
                )
            top2 = torch_logits[0].topk(2).values
            if float(top2[0] - top2[1]) > 2 * LOGIT_ATOL and int(onnx_step.argmax()) != int(torch_logits.argmax()):
                raise ExportError(f"the decoders choose different words {where}")
    return logit_diff, logit_rel, steps


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return torch.from_numpy(array) if array is not None else None


def _check_class_head(reference: torch.Tensor | None, exported: torch.Tensor | None, *, enforce: bool) -> float | None:
    """The largest absolute difference of the class probabilities (None without a head); :class:`ExportError` when
    only one side has a head or, with ``enforce``, the difference is over :data:`CLASS_PROBABILITY_ATOL`."""
    if (reference is None) != (exported is None):
        raise ExportError(
            f"the PyTorch encoder {'has' if reference is not None else 'has no'} class head but the exported one "
            f"{'has' if exported is not None else 'has none'}"
        )
    if reference is None or exported is None:
        return None
    diff = float((torch.softmax(exported.float(), -1) - torch.softmax(reference.float(), -1)).abs().max())
    if enforce and not diff <= CLASS_PROBABILITY_ATOL:
        raise ExportError(
            f"class probabilities differ from PyTorch by up to {diff:.2e}; the limit is {CLASS_PROBABILITY_ATOL:.0e}"
        )
    return diff
