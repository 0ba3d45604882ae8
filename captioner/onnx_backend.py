"""The ``onnxruntime`` backend: an exported model (:mod:`captioner.onnx_export`) run by ONNX Runtime on CPU.

:class:`OnnxEncoder` and :class:`OnnxDecoder` have the interfaces :class:`~captioner.model.Captioner`
and :mod:`captioner.decoding` use (``forward_features``; ``init_state``/``step`` on
:class:`~captioner.decoder.DecoderState`), so every decoding method, option and the attention maps run
through the one decoding module on either backend. Tensors cross into ONNX Runtime as numpy views of
the torch tensors and come back as torch tensors over ONNX Runtime's output arrays (no copies).

A ``.pt`` checkpoint is exported on first use into a cache keyed by its sha256:
``$CAPTIONER_CACHE_DIR/onnx/v<EXPORT_VERSION>-<sha256[:16]>/``, where ``CAPTIONER_CACHE_DIR``
defaults to ``$XDG_CACHE_HOME/captioner`` (``~/.cache/captioner``). Later loads find it there, and use
it only after the checks of :mod:`captioner.export_integrity` (the threat model is there): an entry that
fails one is exported again, or refused with one line when the cache cannot be written. The graphs are
the only thing taken from the cache; what the model says (vocabulary, caption rules, metadata) comes
from the checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.config import DecoderConfig, ModelConfig
from captioner.decoder import DecoderState
from captioner.encoders import file_sha256
from captioner.errors import CaptionerError, CheckpointError, one_line
from captioner.export_integrity import UntrustedExport, VerifiedExport, read_cache_entry, read_export_folder
from captioner.onnx_export import (
    EXPORT_VERSION,
    GRAPH_FILES,
    METADATA_FILE,
    init_output_names,
    state_names,
    step_input_names,
    step_output_names,
)
from captioner.transforms import Preprocess

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'captioner[onnx]'"


class BackendUnavailable(CaptionerError, RuntimeError):
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


def ensure_exported(checkpoint: str | os.PathLike) -> VerifiedExport:
    """The checked export of ``checkpoint`` in the cache, exporting it first when it is not there yet or an
    entry there fails a check (:mod:`captioner.export_integrity`); a failure to mend it is one line.

    Processes starting together on one cache (replicas sharing a volume) take turns through a lock
    file beside the export: one exports, the others then find its export.
    """
    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint)
    folder = _cache_folder(sha)
    try:
        return read_cache_entry(folder, sha)
    except UntrustedExport as exc:
        refused = exc
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(folder):
            try:
                return read_cache_entry(folder, sha)  # another process exported it while this one waited
            except UntrustedExport as exc:
                refused = exc
            if not refused.absent:
                _set_aside(folder)  # before the warning: when it fails, the error alone says it all, in one line
                log.warning("refused the cached ONNX export %s; exporting it again", refused)
            _remove_abandoned_exports(folder)
            _export_into_cache(checkpoint, sha, folder)
    except OSError as exc:
        raise CheckpointError(_cache_failure(checkpoint, folder, refused, exc)) from exc
    return read_cache_entry(folder, sha)  # the new export, checked as any other


def _cache_failure(checkpoint: Path, folder: Path, refused: UntrustedExport, exc: OSError) -> str:
    """One line for an export into the cache that failed on the file system."""
    if refused.absent:
        what = f"cannot write the ONNX export of {checkpoint} to {folder}"
    else:
        what = f"the cached ONNX export {folder} was refused ({refused.reason}) and cannot be exported again"
    if exc.errno in _UNWRITABLE:
        return (
            f"{what} ({exc.strerror}); set CAPTIONER_CACHE_DIR to a writable folder, or export it beforehand "
            f"with: captioner export {checkpoint} DIR --format onnx"
        )
    return f"{what} ({exc.strerror or exc.__class__.__name__}: {exc.filename or folder})"


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold the lock file beside ``folder``. A symbolic link there (a lock file never is one) is removed, not
    followed; one put back in the meantime makes the lock fail with ELOOP (a one-line error above)."""
    from filelock import FileLock  # a dependency of torch

    lock = folder.parent / f".{folder.name}.lock"
    if lock.is_symlink():
        log.warning("removing %s: a symbolic link where the export cache keeps its lock file", lock)
        lock.unlink()
    with FileLock(str(lock)):
        yield


def _set_aside(folder: Path) -> None:
    """Move a refused entry out of the export's way, under a name :func:`_remove_abandoned_exports` clears
    (a rename moves a symbolic link itself, never what it points to)."""
    os.rename(folder, folder.parent / f".{folder.name}.{secrets.token_hex(4)}.tmp")


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
    as ``captioner-serve`` does on Ctrl-C while the model loads), and entries set aside as refused. Called
    under the cache lock: no export into ``folder`` is running. Links are removed, never followed."""
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):  # export_onnx's temporary folders, _set_aside's
        if tmp.is_symlink():
            tmp.unlink(missing_ok=True)
        elif tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


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


def _session(export: VerifiedExport, part: str, threads: int | None):
    """A session over the checked bytes of ``part``'s graph (never the file again: it could have changed)."""
    ort = require_onnxruntime()
    try:
        options = session_options(threads or torch.get_num_threads())
        return ort.InferenceSession(export.graphs[part], options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise CheckpointError(
            f"{export.folder / GRAPH_FILES[part]}: ONNX Runtime cannot load it: {one_line(exc)}"
        ) from exc


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

    def __init__(self, export: VerifiedExport, model: Mapping[str, Any], threads: int | None = None) -> None:
        """``model``: the description of the model (a checkpoint, or the export's own ``captioner.json``)."""
        self.session = _session(export, "encoder", threads)
        identity = model["encoder"]
        self.name: str = identity["name"]
        self.weights = identity.get("weights")
        self.weights_sha256 = identity.get("weights_sha256")
        self.preprocess = Preprocess.from_dict(model["preprocess"])
        self.feature_dim: int = model["config"]["decoder"]["feature_dim"]
        self.quantized = export.meta.get("quantization") is not None
        self.graph_sha256 = export.sha256[GRAPH_FILES["encoder"]]  # what the feature cache keys these features by
        # The graph itself says whether it computes the class head (never the metadata: see export_integrity).
        self.has_class_head = "class_logits" in {output.name for output in self.session.get_outputs()}

    def forward_features(self, images: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, C, h, w)``, at most ``chunk_size`` images per run (all when None)."""
        return self._run(images, chunk_size, ["grid"])[0]

    def forward_features_and_logits(
        self, images: torch.Tensor, *, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grids and, from the same run, the ImageNet-1k logits ``(B, 1000)`` (None when the graph has no head)."""
        if not self.has_class_head:
            return self.forward_features(images, chunk_size=chunk_size), None
        grid, class_logits = self._run(images, chunk_size, ["grid", "class_logits"])
        return grid, class_logits

    def _run(self, images: torch.Tensor, chunk_size: int | None, outputs: list[str]) -> list[torch.Tensor]:
        """``outputs`` of the encoder graph for ``images``, at most ``chunk_size`` images per run."""
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        images = images.float().cpu()
        parts = images.split(chunk_size) if chunk_size else (images,)
        runs = [self.session.run(outputs, {"pixels": _numpy(p)}) for p in parts]
        if len(runs) == 1:
            return [torch.from_numpy(array) for array in runs[0]]
        return [torch.cat([torch.from_numpy(run[i]) for run in runs]) for i in range(len(outputs))]

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

    def __init__(self, export: VerifiedExport, config: DecoderConfig, threads: int | None = None) -> None:
        self.config = config
        self.init_session = _session(export, "decoder_init", threads)
        self.step_session = _session(export, "decoder_step", threads)
        self._init_outputs = init_output_names(config)  # the names the export gave them (captioner.onnx_export)
        self._step_inputs = step_input_names(config)
        self._step_outputs = step_output_names(config)
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
    (exported into the cache on first use) or ``None`` (the bundled default model).

    For a checkpoint, only the graphs come from the cache; the vocabulary, caption rules, config,
    preprocessing and metadata come from the checkpoint, so no edit to the cache changes what the model says.
    """
    from captioner.caption_rules import CaptionRules
    from captioner.checkpoint import load_checkpoint
    from captioner.model import Captioner, confidence_model_from, default_checkpoint, vocabulary_extension_from
    from captioner.vocab import Vocabulary

    require_onnxruntime()
    path = Path(default_checkpoint() if path is None else path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        export = read_export_folder(path)
        described: Mapping[str, Any] = export.meta
    else:
        described = load_checkpoint(path)
        export = ensure_exported(path)
    try:
        config = ModelConfig.from_dict(described["config"])
        if config.decoder is None:
            raise ValueError("its config has no decoder")
        encoder = OnnxEncoder(export, described, threads)
        decoder = OnnxDecoder(export, config.decoder, threads)
        vocab = Vocabulary(described["vocab"])
        rules = CaptionRules.from_dict(described["caption_rules"]) if described.get("caption_rules") else None
        source = f"{path}'s {METADATA_FILE}" if path.is_dir() else str(path)
        confidence = confidence_model_from(dict(described), source, config.decoder.feature_dim)
        model = Captioner(
            encoder,  # type: ignore[arg-type]
            decoder,  # type: ignore[arg-type]
            vocab,
            metadata=described.get("metadata") or {},
            caption_rules=rules,
            confidence_model=confidence,
            vocabulary_extension=vocabulary_extension_from(dict(described), source, vocab),
        )
    except (KeyError, TypeError, ValueError) as exc:
        source = f"{path}'s {METADATA_FILE}" if path.is_dir() else str(path)
        raise CheckpointError(f"{source} does not describe a model this captioner can run: {exc}") from exc
    model.backend = "onnxruntime"
    model.export_dir = export.folder
    model.export_parameters = int(export.meta.get("parameters") or 0)
    return model
