"""The benches run end to end on a tiny model (their figures are for the real one: docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_captioner

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two exports of the tiny model, then every stage of four calls on three backends: ~20 s
def test_latency_bench_times_every_stage_on_every_backend(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "model.pt"
    tiny_captioner(attention=True).save(checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    argv = ["--checkpoint", str(checkpoint), "--images", str(photos), "--rounds", "1", "--calls", "1"]
    assert _bench("latency").main(argv) == 0
    out = capsys.readouterr().out
    assert "| call | stage | torch | onnxruntime | int8 decoder | torch / onnxruntime | torch / int8 decoder |" in out
    for call in ("batch 1, beam 3", "batch 1, greedy", "batch 8, beam 3", "batch 8, greedy"):
        for stage in ("load + preprocess", "encoder", "decode", "caption()", "decoder steps / decode"):
            assert f"| {call} | {stage} |" in out
    assert "goal: caption() batch 1 beam 3 on onnxruntime <= 30 ms" in out
    assert "goal: caption() batch 1 beam 3 on int8 decoder <= 30 ms" in out


def test_latency_bench_needs_eight_photos(tmp_path, capsys) -> None:
    (tmp_path / "one.jpg").write_bytes(b"")
    assert _bench("latency").main(["--images", str(tmp_path)]) == 2
    assert "need 8 photos" in capsys.readouterr().err
