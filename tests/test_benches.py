"""The benches run end to end on a tiny model (their figures are for the real one: docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import re
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


DATA = ROOT.parent / "shared" / "data"


@pytest.mark.slow  # the bundled model on 8 photos of each set, three decodings of each: ~20 s
@pytest.mark.skipif(
    not all((DATA / name).is_dir() for name in ("flickr8k", "coco-mini", "coco-caption-text")),
    reason="needs ../shared/data (Flickr8k, coco-mini, coco-caption-text)",
)
def test_novel_objects_bench_reports_guidance_beside_its_ceilings(tmp_path, capsys) -> None:
    argv = ["--limit", "8", "--rounds", "1", "--no-java", "--examples", "2", "--cache", str(tmp_path)]
    _bench("novel_objects").main(argv)
    out = capsys.readouterr().out
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    assert ["set", "measure", "plain", "guided", "guided, no confidence gate"] in rows
    for name in ("coco-mini", "flickr8k-dev", "flickr8k-test"):
        measures = {row[1]: row[2:] for row in rows if row[0] == name and len(row) > 2}
        for measure in ("CIDEr-D", "BLEU-4", "names a reference object", "dangling endings"):
            assert len(measures[measure]) == 3, (name, measure, measures.get(measure))
        shares = [float(cell.rstrip("%")) for cell in measures["names a reference object"]]
        assert all(0.0 <= share <= 100.0 for share in shares)
        (ceiling,) = measures["a tag names a reference object"]
        assert ceiling.endswith("% (ceiling)")
    assert "coco-mini examples" in out
