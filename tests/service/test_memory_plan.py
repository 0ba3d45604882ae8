"""The memory arithmetic the README states: its table is service.memory_plan's, and its measured
per-pixel cost of decoding holds for every kind of image an upload can be."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.transforms import DECODE_BYTES_PER_PIXEL, WEBP_DECODE_BYTES_PER_PIXEL
from service.memory_plan import markdown_table, worst_case
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 3000, 2000  # 6 MP: big enough that the image dwarfs the allocator's noise
SLACK_MIB = 24


def test_the_readme_states_the_worst_case_of_the_default_settings() -> None:
    assert markdown_table(worst_case(Settings())) in (ROOT / "README.md").read_text()


def _image_file(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (HEIGHT // 10, WIDTH // 10, 4), dtype=np.uint8)
    image = Image.fromarray(small, "RGBA").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if kind == "RGBA PNG":
        image.save(buffer, "PNG", compress_level=1)
    elif kind == "RGB PNG":
        image.convert("RGB").save(buffer, "PNG", compress_level=1)
    elif kind == "16-bit PNG":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(buffer, "PNG", compress_level=1)
    elif kind == "CMYK JPEG":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif kind == "RGB JPEG":
        image.convert("RGB").save(buffer, "JPEG", quality=90)
    elif kind == "RGB TIFF":
        image.convert("RGB").save(buffer, "TIFF")
    elif kind == "palette GIF":
        image.convert("RGB").convert("P").save(buffer, "GIF")
    elif kind == "RGBA WebP":
        image.save(buffer, "WEBP", lossless=True, method=0)
    return buffer.getvalue()


# Runs in a fresh process: the peak (VmHWM, reset first) of the decode alone, on a worker thread as in the server.
_MEASURE = """
import ctypes, re, sys, threading
from pathlib import Path
from captioner.transforms import Preprocess, load_crop
data = sys.stdin.buffer.read()
def rss(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
ctypes.CDLL(None).malloc_trim(0)
Path("/proc/self/clear_refs").write_text("5")
before = rss("VmRSS")
thread = threading.Thread(target=load_crop, args=(data, Preprocess(resize=292, crop=260)))
thread.start()
thread.join()
print(rss("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak memory")
@pytest.mark.parametrize(
    "kind",
    ["RGBA PNG", "RGB PNG", "16-bit PNG", "CMYK JPEG", "RGB JPEG", "RGB TIFF", "palette GIF", "RGBA WebP"],
)
def test_decoding_an_image_stays_within_the_planned_bytes_per_pixel(kind: str) -> None:
    """At most DECODE_BYTES_PER_PIXEL (WebP: its own figure, and a pixel limit lowered to match)."""
    data = _image_file(kind)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE], input=data, capture_output=True, cwd=ROOT, timeout=120, check=True
    )
    peak = int(result.stdout)
    per_pixel = WEBP_DECODE_BYTES_PER_PIXEL if "WebP" in kind else DECODE_BYTES_PER_PIXEL
    planned = WIDTH * HEIGHT * per_pixel
    report = json.dumps({"kind": kind, "peak_mib": round(peak / 2**20), "planned_mib": round(planned / 2**20)})
    assert peak <= planned + SLACK_MIB * 2**20, report


def test_webp_has_a_pixel_limit_that_keeps_its_decode_within_the_plan() -> None:
    from captioner.transforms import ImageError, ImageErrorCode, load_image

    data = _image_file("RGBA WebP")  # 6 MP
    limit = 10_000_000  # WebP: 10 MP x 8 / 20 = 4 MP
    with pytest.raises(ImageError) as caught:
        load_image(data, max_pixels=limit)
    assert caught.value.code is ImageErrorCode.TOO_LARGE and "the limit for WebP is 4,000,000" in str(caught.value)
    assert load_image(data, max_pixels=limit * WEBP_DECODE_BYTES_PER_PIXEL // DECODE_BYTES_PER_PIXEL).size == (
        WIDTH,
        HEIGHT,
    )
