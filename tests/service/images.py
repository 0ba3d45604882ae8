"""Image bytes for service tests: odd but valid modes, and every kind of bad upload."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image with no symmetry, so rotations and colour mistakes change what the model sees."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    arr[: height // 3, : width // 2] = (250, 40, 30)  # a red block in one corner only
    return Image.fromarray(arr, "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(seed: int = 0, width: int = 96, height: int = 64) -> bytes:
    return encode(pattern(width, height, seed))


def exif_rotated_png(upright: Image.Image) -> bytes:
    """Stored rotated 90 degrees counter-clockwise with EXIF orientation 6 (display: rotate back)."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "PNG", exif=exif)


def cmyk_tiff(upright: Image.Image) -> bytes:
    return encode(upright.convert("CMYK"), "TIFF")


def cmyk_jpeg(upright: Image.Image) -> bytes:
    return encode(upright.convert("CMYK"), "JPEG", quality=95)


def gray16_png(gray: Image.Image) -> bytes:
    """A 16-bit grayscale PNG whose levels are the 8-bit ``gray`` image scaled to the full 0..65535 range."""
    arr = np.asarray(gray, dtype=np.uint16) * 257
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16"), image.mode
    return encode(image, "PNG")


def animated_gif(first: Image.Image, second: Image.Image) -> bytes:
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return buf.getvalue()


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, with a tiny data chunk: the classic bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages /Kids [] /Count 0 >>"
    b" endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def data_dir() -> Path:
    """``../shared/data`` beside the project root, or ``$CAPTIONER_DATA_DIR``."""
    env = os.environ.get("CAPTIONER_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def real_photos() -> list[Path]:
    """Real JPEG photos (COCO first, then Flickr8k), or [] when the shared data is absent."""
    root = data_dir()
    photos = sorted((root / "coco-mini" / "train2017").glob("*.jpg"))
    return photos or sorted((root / "flickr8k" / "images").glob("*.jpg"))[:50]
