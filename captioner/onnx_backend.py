"""The ``onnxruntime`` backend's parts: an exported model's graphs (:mod:`captioner.onnx_export`) run by ONNX
Runtime on CPU, over numpy arrays. No torch: an install without it runs exports.

:class:`OnnxEncoder` and :class:`OnnxDecoder` have the interfaces captioning uses
(``forward_features_and_logits``; ``init_state``/``step`` on :class:`~captioner.decoder_state.DecoderState`, the
:class:`~captioner.decoding.StepDecoder` protocol), so every decoding method, option and the attention maps run
through the one decoding module on either backend (:class:`captioner.onnx_model.OnnxCaptioner` puts them
together). Where exports come from and how they are cached: :mod:`captioner.export_cache`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from captioner.arrays import Array, to_numpy
from captioner.config import DecoderConfig
from captioner.decoder_state import DecoderState
from captioner.errors import CaptionerError, CheckpointError, one_line
from captioner.export_format import (
    GRAPH_FILES,
    init_output_names,
    quantized_parts,
    state_names,
    step_input_names,
    step_output_names,
)
from captioner.export_integrity import VerifiedExport
from captioner.transforms import Preprocess

EXTRA_HINT = "pip install 'captioner[onnx]'"


class BackendUnavailable(CaptionerError, RuntimeError):
    """The requested backend's package is not installed."""


def require_onnxruntime() -> Any:
    """Import ``onnxruntime``, or raise :class:`BackendUnavailable` naming the extra that provides it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            f"the onnxruntime backend needs the 'onnx' extra (onnxruntime is not installed): {EXTRA_HINT}"
        ) from exc
    return onnxruntime


def onnxruntime_available() -> bool:
    try:
        require_onnxruntime()
    except BackendUnavailable:
        return False
    return True


def default_threads() -> int:
    """ONNX Runtime's intra-op threads when none are asked for: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int) -> Any:
    """Options for one session: ``threads`` intra-op threads, graph optimisations on, errors-only logging.

    The pool's threads do not spin-wait for work: spinning threads keep the cores busy after a run, and
    the Python work that follows on the same cores (beam search's bookkeeping between decoder steps)
    slowed down. Measured on the 2-core VM, beam 3, decoding only: one photo 22 ms without spinning,
    73 ms with; a batch of 8, 76 against 230 ms. One thread instead of two: 24 and 89 ms. The encoder
    runs at about the same speed either way.
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every initializer it folds
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(export: VerifiedExport, part: str, threads: int | None) -> Any:
    """A session over the checked bytes of ``part``'s graph (never the file again: it could have changed)."""
    ort = require_onnxruntime()
    try:
        options = session_options(threads or default_threads())
        return ort.InferenceSession(export.graphs[part], options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise CheckpointError(
            f"{export.folder / GRAPH_FILES[part]}: ONNX Runtime cannot load it: {one_line(exc)}"
        ) from exc


def _contiguous(array: Array, dtype: type = np.float32) -> np.ndarray:
    """A C-contiguous numpy array of ``array`` (no copy when it already is one; a torch tensor is accepted, so
    training's feature caches can feed an export).

    The copy a strided array needs is numpy's, on this thread: torch's would wake its OpenMP threads, whose
    spinning afterwards took a core from ONNX Runtime's pool (the encoder at batch 1 ran 16 instead of 13 ms on
    the 2-core VM).
    """
    return np.ascontiguousarray(to_numpy(array), dtype=dtype)


class OnnxEncoder:
    """``encoder.onnx`` behind the encoder interface captioning uses, numpy in and out."""

    trainable = False
    fused = True  # exported from the fused encoder; nothing left to fold
    from_package = False

    def __init__(self, export: VerifiedExport, model: Mapping[str, Any], threads: int | None = None) -> None:
        """``model``: the description of the model (a checkpoint, or the export's own ``captioner.json``)."""
        self.session = _session(export, "encoder", threads)
        identity = model["encoder"]
        self.name: str = identity["name"]
        self.weights = identity.get("weights")
        self.weights_sha256 = identity.get("weights_sha256")
        self.preprocess = Preprocess.from_dict(model["preprocess"])
        self.feature_dim: int = model["config"]["decoder"]["feature_dim"]
        self.quantized = "encoder" in quantized_parts(export.meta.get("quantization"))
        self.graph_sha256 = export.sha256[GRAPH_FILES["encoder"]]  # what the feature cache keys these features by
        # The graph itself says whether it computes the class head (never the metadata: see export_integrity).
        self.has_class_head = "class_logits" in {output.name for output in self.session.get_outputs()}

    def forward_features(self, images: Array, *, chunk_size: int | None = None) -> np.ndarray:
        """``(B, 3, S, S)`` -> ``(B, C, h, w)``, at most ``chunk_size`` images per run (all when None)."""
        return self._run(images, chunk_size, ["grid"])[0]

    def forward_features_and_logits(
        self, images: Array, *, chunk_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The grids and, from the same run, the ImageNet-1k logits ``(B, 1000)`` (None when the graph has no head)."""
        if not self.has_class_head:
            return self.forward_features(images, chunk_size=chunk_size), None
        grid, class_logits = self._run(images, chunk_size, ["grid", "class_logits"])
        return grid, class_logits

    def _run(self, images: Array, chunk_size: int | None, outputs: list[str]) -> list[np.ndarray]:
        """``outputs`` of the encoder graph for ``images``, at most ``chunk_size`` images per run."""
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        pixels = to_numpy(images)
        step = chunk_size or max(len(pixels), 1)
        starts = range(0, len(pixels), step) or range(1)  # an empty batch runs once, empty
        runs = [self.session.run(outputs, {"pixels": _contiguous(pixels[i : i + step])}) for i in starts]
        if len(runs) == 1:
            return list(runs[0])
        return [np.concatenate([run[i] for run in runs]) for i in range(len(outputs))]

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256}

    def set_trainable(self, trainable: bool) -> None:
        if trainable:
            raise RuntimeError("an ONNX Runtime encoder cannot be trained: load the checkpoint with backend='torch'")

    def fuse_for_inference(self) -> OnnxEncoder:
        return self

    def to(self, device: Any) -> OnnxEncoder:
        if str(device).split(":")[0] != "cpu":
            raise ValueError("the onnxruntime backend runs on CPU; use backend 'torch' for CUDA")
        return self

    def eval(self) -> OnnxEncoder:
        return self


class OnnxDecoder:
    """``decoder_init.onnx`` + ``decoder_step.onnx`` behind the :class:`~captioner.decoding.StepDecoder` protocol,
    numpy in and out."""

    training = False

    def __init__(self, export: VerifiedExport, config: DecoderConfig, threads: int | None = None) -> None:
        self.config = config
        self.quantized = "decoder" in quantized_parts(export.meta.get("quantization"))  # int8 weights
        self.init_session = _session(export, "decoder_init", threads)
        self.step_session = _session(export, "decoder_step", threads)
        self._init_outputs = init_output_names(config)  # the names the export gave them (captioner.export_format)
        self._step_inputs = step_input_names(config)
        self._step_outputs = step_output_names(config)
        self._n_hidden = len(state_names(self.config))

    def init_state(self, grid: Array) -> DecoderState:
        outputs = self.init_session.run(self._init_outputs, {"grid": _contiguous(grid)})
        hidden = tuple(outputs[: self._n_hidden])
        if self.config.attention:
            return DecoderState(hidden, outputs[self._n_hidden], outputs[self._n_hidden + 1])
        return DecoderState(hidden)

    def step(self, tokens: Array, state: DecoderState) -> tuple[np.ndarray, DecoderState, np.ndarray | None]:
        parts = [_contiguous(tokens, np.int64), *(_contiguous(h) for h in state.hidden)]
        if self.config.attention:
            assert state.memory is not None and state.keys is not None  # init_state returns both with attention
            parts += [_contiguous(state.memory), _contiguous(state.keys)]
        outputs = self.step_session.run(self._step_outputs, dict(zip(self._step_inputs, parts, strict=True)))
        hidden = tuple(outputs[1 : 1 + self._n_hidden])
        alpha = outputs[1 + self._n_hidden] if self.config.attention else None
        return outputs[0], DecoderState(hidden, state.memory, state.keys), alpha
