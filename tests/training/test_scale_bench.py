"""bench/scale.py's own parts: the simulated COCO data set the training code reads, the exponent, the memory
it samples, its refusals. (The whole bench runs in tests/test_scripts.py, through gpu-check.sh --scale.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from training.data import load_corpus

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


scale = _bench()


def test_the_simulated_data_set_is_coco_2017_as_training_reads_it(tmp_path: Path) -> None:
    """N photos linked again and again under COCO file names, 5 captions each from the pool (every caption once
    before any twice), the val split a tenth of N under 50,000 photos; load_corpus reads it as COCO."""
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"photo{i}.jpg")
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(photos[-1])
    pool = [f"caption number {i}" for i in range(1000)]
    made = scale.build_dataset(tmp_path / "coco", 250, photos, pool)

    corpus = load_corpus(tmp_path / "coco")
    assert corpus.source == "coco" and corpus.split_sizes() == {"train": 225, "val": 25}
    assert (made.train, made.val, made.captions) == (225, 25, 1250)
    records = sorted(corpus.records, key=lambda r: int(r.image_id))
    assert [r.path.name for r in records[:2]] == ["000000000001.jpg", "000000000002.jpg"]
    assert [r.path.resolve() for r in records[:4]] == [p.resolve() for p in [*photos, photos[0]]]
    captions = [c for r in records for c in r.captions]
    assert all(len(r.captions) == 5 for r in records)
    assert sorted(captions[:1000]) == sorted(pool) and captions[1000:] != captions[:250]  # a new order each time


def test_the_val_split_is_cocos_5000_photos_or_a_tenth_of_a_smaller_set() -> None:
    assert [scale.val_photos(n) for n in (500, 2000, 8000, 50_000, 128_000)] == [50, 200, 800, 5000, 5000]


def test_the_exponent_is_the_slope_on_log_log() -> None:
    sizes = [8000, 32000, 128000]
    assert scale.exponent(sizes, [1.0, 4.0, 16.0]) == pytest.approx(1.0)
    assert scale.exponent(sizes, [1.0, 16.0, 256.0]) == pytest.approx(2.0)
    assert scale.exponent(sizes, [3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert scale.exponent([2000], [5.0]) is None


def test_memory_is_counted_for_a_process_and_its_children_once() -> None:
    """A forked child shares its parent's pages: proportional set sizes add up to the memory really used."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(200):  # until the child has its 64 MB
            if scale.tree_memory_mb(child.pid)[0] > 64:
                break
            time.sleep(0.05)
        assert child.pid in scale.descendants(os.getpid())
        alone = scale.tree_memory_mb(child.pid)[0]
        anon, everything = scale.tree_memory_mb(os.getpid())
        assert 64 < alone < anon < everything
    finally:
        child.communicate(b"")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "50"], "every size must be at least 100 photos, got '50'"),
        (["--images", "8k"], "expected comma-separated photo counts, got '8k'"),
        (["--images", "800,800"], "sizes must differ, got '800,800'"),
        (["--scst-fraction", "0"], "must be in (0, 1], got 0.0"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith(message), done.stderr


def test_absent_data_is_refused_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "scale.py"), "--data", str(tmp_path / "absent")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"scale: no Flickr8k at {tmp_path / 'absent'} (captions.txt and images/): pass --data DIR\n"
