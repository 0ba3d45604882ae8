"""The ``onnxruntime`` backend: an exported model (:mod:`captioner.onnx_export`) run by ONNX Runtime on CPU.

:class:`OnnxEncoder` and :class:`OnnxDecoder` have the interfaces :class:`~captioner.model.Captioner`
and :mod:`captioner.decoding` use (``forward_features``; ``init_state``/``step`` on
:class:`~captioner.decoder.DecoderState`), so every decoding method, option and the attention maps run
through the one decoding module on either backend. Tensors cross into ONNX Runtime as numpy views of
the torch tensors and come back as torch tensors over ONNX Runtime's output arrays (no copies).

A ``.pt`` checkpoint is exported on first use into a cache keyed by its sha256:
``$CAPTIONER_CACHE_DIR/onnx/v<EXPORT_VERSION>-<sha256[:16]>/``, where ``CAPTIONER_CACHE_DIR``
defaults to ``$XDG_CACHE_HOME/captioner`` (``~/.cache/captioner``). Later loads find it there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.checkpoint import CheckpointError
from captioner.config import DecoderConfig, ModelConfig
from captioner.decoder import DecoderState
from captioner.encoders import file_sha256
from captioner.onnx_export import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    GRAPH_FILES,
    METADATA_FILE,
    state_names,
)
from captioner.transforms import Preprocess

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'captioner[onnx]'"


class BackendUnavailable(RuntimeError):
    """The requested backend's package is not installed."""


def require_onnxruntime():
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


def cache_dir() -> Path:
    """Where exports made on first use live: ``$CAPTIONER_CACHE_DIR``, else ``$XDG_CACHE_HOME/captioner``."""
    explicit = os.environ.get("CAPTIONER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def cached_export_dir(checkpoint: str | os.PathLike) -> Path:
    """The cache folder for ``checkpoint``'s export, whether or not it exists yet."""
    return _cache_folder(file_sha256(checkpoint))


def _cache_folder(sha256: str) -> Path:
    return cache_dir() / "onnx" / f"v{EXPORT_VERSION}-{sha256[:16]}"


# The cache folder cannot be written: permissions, or a read-only file system (a container's root).
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def ensure_exported(checkpoint: str | os.PathLike) -> Path:
    """The export of ``checkpoint`` in the cache, exporting it first when it is not there yet.

    Processes starting together on one cache (replicas sharing a volume) take turns through a lock
    file beside the export: one exports, the others then find its export.
    """
    from filelock import FileLock  # a dependency of torch

    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint)
    folder = _cache_folder(sha)
    if _valid_export(folder, sha):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            if not _valid_export(folder, sha):
                _remove_abandoned_exports(folder)
                _export_into_cache(checkpoint, sha, folder)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        raise CheckpointError(
            f"cannot write the ONNX export of {checkpoint} to {folder} ({exc.strerror}); set CAPTIONER_CACHE_DIR "
            f"to a writable folder, or export it beforehand with: captioner export {checkpoint} DIR --format onnx"
        ) from exc
    return folder


def _export_into_cache(checkpoint: Path, sha: str, folder: Path) -> None:
    from captioner.checkpoint import load_checkpoint
    from captioner.model import Captioner
    from captioner.onnx_export import export_onnx

    model = Captioner.from_state(load_checkpoint(checkpoint), source=str(checkpoint))
    log.info(
        "exporting %s to ONNX for onnxruntime (first use only; cached in %s, set CAPTIONER_CACHE_DIR to move it) ...",
        checkpoint.name,
        folder,
    )
    started = time.perf_counter()
    export_onnx(model, folder, source=str(checkpoint), source_sha256=sha)
    log.info("exported in %.0f s; later runs load it from the cache", time.perf_counter() - started)


def _remove_abandoned_exports(folder: Path) -> None:
    """Delete the temporary folders of exports into ``folder`` that never finished (a process stopped at once,
    as ``captioner-serve`` does on Ctrl-C while the model loads). Called under the cache lock: no export into
    ``folder`` is running."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):  # export_onnx's temporary folders
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def _valid_export(folder: Path, sha: str) -> bool:
    """Whether ``folder`` holds a complete export of the checkpoint with this sha256."""
    try:
        return read_export_metadata(folder).get("source", {}).get("sha256") == sha
    except CheckpointError:
        return False


def read_export_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``captioner.json`` of an export, validated; failures are one-line :class:`CheckpointError`."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: not an ONNX export (no {METADATA_FILE})") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.__class__.__name__})") from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: not a captioner ONNX export (no '{EXPORT_FORMAT}' marker)")
    if meta.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(
            f"{path}: export format version {meta.get('format_version')!r} is not supported (this captioner reads "
            f"version {EXPORT_VERSION}); export the checkpoint again"
        )
    missing = [name for name in GRAPH_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: the export is incomplete (missing {', '.join(missing)})")
    return meta


def session_options(threads: int):
    """Options for one session: ``threads`` intra-op threads, graph optimisations on, errors-only logging.

    The pool's threads do not spin-wait for work: spinning threads keep the cores busy after a run, and
    the torch work that follows on the same cores (beam search's bookkeeping between decoder steps)
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


def _session(path: Path, threads: int | None):
    ort = require_onnxruntime()
    try:
        options = session_options(threads or torch.get_num_threads())
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it: {first}") from exc


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array over ``tensor`` (a view when it already is one).

    The copy a strided tensor needs (channels-last pixels) is numpy's, on this thread: torch's would
    wake its OpenMP threads, whose spinning afterwards took a core from ONNX Runtime's pool (the
    encoder at batch 1 ran 16 instead of 13 ms on the 2-core VM).
    """
    return np.ascontiguousarray(tensor.detach().numpy())


class OnnxEncoder:
    """``encoder.onnx`` behind :class:`~captioner.encoders.ImageEncoder`'s inference interface."""

    trainable = False
    fused = True  # exported from the fused encoder; nothing left to fold
    from_package = False

    def __init__(self, folder: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        path = folder / meta["graphs"]["encoder"]
        self.session = _session(path, threads)
        identity = meta["encoder"]
        self.name: str = identity["name"]
        self.weights = identity.get("weights")
        self.weights_sha256 = identity.get("weights_sha256")
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.feature_dim: int = meta["config"]["decoder"]["feature_dim"]
        self.quantized = meta.get("quantization") is not None
        self.graph_sha256 = file_sha256(path)  # what the feature cache keys these features by

    def forward_features(self, images: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, C, h, w)``, at most ``chunk_size`` images per run (all when None)."""
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        images = images.float().cpu()
        parts = images.split(chunk_size) if chunk_size else (images,)
        grids = [torch.from_numpy(self.session.run(["grid"], {"pixels": _numpy(p)})[0]) for p in parts]
        return grids[0] if len(grids) == 1 else torch.cat(grids)

    def identity(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256}

    def set_trainable(self, trainable: bool) -> None:
        if trainable:
            raise RuntimeError("an ONNX Runtime encoder cannot be trained: load the checkpoint with backend='torch'")

    def fuse_for_inference(self) -> OnnxEncoder:
        return self

    def to(self, device: torch.device | str) -> OnnxEncoder:
        if torch.device(device).type != "cpu":
            raise ValueError("the onnxruntime backend runs on CPU; use backend 'torch' for CUDA")
        return self

    def eval(self) -> OnnxEncoder:
        return self


class OnnxDecoder:
    """``decoder_init.onnx`` + ``decoder_step.onnx`` behind ``CaptionDecoder.init_state`` / ``step``."""

    training = False

    def __init__(self, folder: Path, meta: dict[str, Any], threads: int | None = None) -> None:
        self.config = DecoderConfig(**meta["config"]["decoder"])
        self.init_session = _session(folder / meta["graphs"]["decoder_init"], threads)
        self.step_session = _session(folder / meta["graphs"]["decoder_step"], threads)
        io = meta["io"]
        self._init_outputs: list[str] = io["decoder_init"]["outputs"]
        self._step_inputs: list[str] = io["decoder_step"]["inputs"]
        self._step_outputs: list[str] = io["decoder_step"]["outputs"]
        self._n_hidden = len(state_names(self.config))

    def init_state(self, grid: torch.Tensor) -> DecoderState:
        outputs = self.init_session.run(self._init_outputs, {"grid": _numpy(grid.float().cpu())})
        tensors = [torch.from_numpy(o) for o in outputs]
        hidden = tuple(tensors[: self._n_hidden])
        if self.config.attention:
            return DecoderState(hidden, tensors[self._n_hidden], tensors[self._n_hidden + 1])
        return DecoderState(hidden)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        parts = [tokens.long(), *state.hidden]
        if self.config.attention:
            assert state.memory is not None and state.keys is not None  # init_state returns both with attention
            parts += [state.memory, state.keys]
        outputs = self.step_session.run(
            self._step_outputs, {name: _numpy(t) for name, t in zip(self._step_inputs, parts, strict=True)}
        )
        tensors = [torch.from_numpy(o) for o in outputs]
        hidden = tuple(tensors[1 : 1 + self._n_hidden])
        alpha = tensors[1 + self._n_hidden] if self.config.attention else None
        return tensors[0], DecoderState(hidden, state.memory, state.keys), alpha


def load_onnx_captioner(path: str | os.PathLike | None, *, threads: int | None = None):
    """A :class:`~captioner.model.Captioner` on ONNX Runtime from an export folder, a ``.pt`` checkpoint
    (exported into the cache on first use) or ``None`` (the bundled default model)."""
    from captioner.caption_rules import CaptionRules
    from captioner.model import Captioner, default_checkpoint
    from captioner.vocab import Vocabulary

    require_onnxruntime()
    path = Path(default_checkpoint() if path is None else path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    folder = path if path.is_dir() else ensure_exported(path)
    meta = read_export_metadata(folder)
    try:
        ModelConfig.from_dict(meta["config"])  # validates the decoder config
        encoder = OnnxEncoder(folder, meta, threads)
        decoder = OnnxDecoder(folder, meta, threads)
        vocab = Vocabulary(meta["vocab"])
        rules = CaptionRules.from_dict(meta["caption_rules"]) if meta.get("caption_rules") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: the export's {METADATA_FILE} does not match this captioner: {exc}") from exc
    model = Captioner(encoder, decoder, vocab, metadata=meta.get("metadata") or {}, caption_rules=rules)  # type: ignore[arg-type]
    model.backend = "onnxruntime"
    model.export_dir = folder
    model.export_parameters = int(meta.get("parameters") or 0)
    return model
