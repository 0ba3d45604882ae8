"""Encode every image once with the frozen encoder and keep the feature grids on disk.

The cache lives at ``<cache_dir>/<fingerprint>/<list-hash>.npy`` (fp16, memory-mapped). The
fingerprint covers the encoder's name, a hash of its weights, the preprocessing and the precision the
features were computed in, so another encoder, other weights, other preprocessing or another precision
never reuse stale features: they get a new folder.
A build writes to a temporary file and renames it when complete, so an interrupted build leaves
nothing that could be mistaken for a finished cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.encoders import ImageEncoder, default_chunk_size
from captioner.progress import progress_bar
from captioner.transforms import ImageError, load_crop, to_tensor

log = logging.getLogger(__name__)
# 2: the precision is fingerprinted, and the cache is computed in fp32 on every device (version 1 used bf16
# autocast on CUDA, so a version-1 cache may hold features serving never computes).
CACHE_VERSION = 2


def encoding_dtype(device: torch.device) -> torch.dtype:
    """The precision the cache's features are computed in on ``device``: fp32 on every device, CUDA too.

    Serving encodes in fp32 (``captioner`` has no autocast), and a decoder must learn from the features it
    will be given: bf16 autocast moves the grids enough to cost caption quality. The encoder runs once per
    photo, so full precision costs training little."""
    return torch.float32


def encoder_fingerprint(encoder: ImageEncoder, *, dtype: torch.dtype = torch.float32) -> str:
    """Hash of what determines the features: encoder name, its weights (all tensors but the class head's, which
    reads the features and never changes them), preprocessing and the precision ``dtype`` they are computed in;
    for an ONNX Runtime encoder (``captioner.onnx_backend.OnnxEncoder``), its graph file instead of the weights."""
    digest = hashlib.sha256()
    recipe = {"v": CACHE_VERSION, "name": encoder.name, "pre": encoder.preprocess.to_dict(), "dtype": str(dtype)}
    digest.update(json.dumps(recipe).encode())
    graph_sha256 = getattr(encoder, "graph_sha256", None)
    if graph_sha256 is not None:
        digest.update(f"onnx:{graph_sha256}".encode())
        return digest.hexdigest()[:16]
    for key, tensor in sorted(encoder.feature_state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ImageFiles(Dataset):
    """Preprocessed images for the encoder; unreadable files give a zero image and ``ok=False``."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            return to_tensor([load_crop(self.paths[index], self.preprocess)], self.preprocess)[0], True, ""
        except ImageError as exc:  # reported by the builder, never raised inside a worker
            return torch.zeros(3, self.preprocess.crop, self.preprocess.crop), False, str(exc)


class FeatureStore:
    """Read-only view of cached feature grids, indexed like the image list it was built from."""

    def __init__(self, path: Path, paths: Sequence[str]) -> None:
        self.path = path
        self.array = np.load(path, mmap_mode="r")  # (N, C, h, w) float16
        self.index = {p: i for i, p in enumerate(paths)}
        meta = json.loads(path.with_suffix(".json").read_text())
        self.failed: dict[str, str] = meta.get("failed", {})

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def get(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows)
        order = np.argsort(rows)  # sorted reads are kinder to the page cache
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.float16)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)


def build_feature_cache(
    encoder: ImageEncoder,
    paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
) -> FeatureStore:
    """Return the cached features for ``paths``, encoding (batched, with workers) only when needed."""
    files = [str(p) for p in paths]  # str: FeatureStore indexes by these
    device = torch.device(device)
    dtype = encoding_dtype(device)
    fingerprint = encoder_fingerprint(encoder, dtype=dtype)
    # keyed by the resolved paths: `data/x` and `/home/me/data/x` share one cache
    list_hash = hashlib.sha256("\n".join(os.path.realpath(p) for p in files).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{encoder.name}-{fingerprint}"
    target = folder / f"{list_hash}.npy"
    if target.is_file() and target.with_suffix(".json").is_file():
        log.info("feature cache hit: %s (%d images)", target, len(files))
        return FeatureStore(target, files)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    with torch.inference_mode():
        probe = encoder.forward_features(
            torch.zeros(1, 3, encoder.preprocess.crop, encoder.preprocess.crop, device=device)
        )
    shape = (len(files), *probe.shape[1:])
    tmp = folder / f".{list_hash}.{os.getpid()}.tmp.npy"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    loader = DataLoader(
        ImageFiles(files, encoder.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Iterating a DataLoader draws a worker seed from its generator; with the global one, a run that
        # built its cache would train differently from the same run finding the cache already there.
        generator=torch.Generator(),
    )
    failed: dict[str, str] = {}
    amp = dtype != torch.float32
    chunk_size = default_chunk_size(device)  # the loader's batches keep the decoding workers busy; see CPU_CHUNK_SIZE
    start, row = time.perf_counter(), 0
    bar = progress_bar(len(files), f"encoding {len(files)} images", progress)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            for pixels, ok, errors in loader:
                grid = encoder.forward_features(pixels.to(device, non_blocking=True), chunk_size=chunk_size)
                grid = torch.as_tensor(grid)  # ONNX Runtime's encoder gives numpy
                array[row : row + len(pixels)] = grid.float().cpu().numpy().astype(np.float16)
                for i in torch.nonzero(~ok).flatten().tolist():
                    failed[files[row + i]] = errors[i]
                row += len(pixels)
                bar.update(len(pixels))
        array.flush()
        del array
        seconds = time.perf_counter() - start
        meta = {"encoder": encoder.identity(), "fingerprint": fingerprint, "dtype": str(dtype), "count": len(files)}
        meta["shape"] = list(shape)
        meta.update(
            failed=failed, seconds=round(seconds, 2), images_per_second=round(len(files) / max(seconds, 1e-9), 1)
        )
        target.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, target)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    if failed:
        first = "; ".join(f"{p}: {e}" for p, e in list(failed.items())[:3])
        log.warning("%d of %d images could not be read and were skipped (first: %s)", len(failed), len(files), first)
    log.info("encoded %d images in %.1fs (%.1f images/s) -> %s", len(files), seconds, len(files) / seconds, target)
    return FeatureStore(target, files)
