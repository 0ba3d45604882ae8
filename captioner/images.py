"""Reading images: any source (a path, bytes, a PIL image) -> an upright 8-bit RGB PIL image, or an
:class:`ImageError` saying why not.

The first step of the one preprocessing path (:mod:`captioner.transforms` resizes, crops and normalises what
this reads) and all the HTTP client needs to send a PIL image as the library would see it. Pillow only: the
client imports this without torch or numpy (numpy is imported only to convert a 16-bit or float image).
"""

from __future__ import annotations

import enum
import functools
import io
import os
import warnings
from typing import Any, cast

from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from captioner.errors import CaptionerError

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike

DEFAULT_MAX_PIXELS = 40_000_000
# Peak memory of decoding one image to RGB, per pixel of the full-size image (tests/service/test_memory_plan.py
# measures each format): the decoded image and its RGB conversion. Pillow's WebP decoder holds two more
# copies of the RGBA pixels while it decodes (measured ~19 bytes a pixel), so WebP gets a smaller pixel
# limit that keeps its peak within the same bytes: max_pixels x DECODE / WEBP_DECODE (16 MP by default).
DECODE_BYTES_PER_PIXEL = 8
WEBP_DECODE_BYTES_PER_PIXEL = 20
# The formats that are decoded: those the API documents (Pillow's JPEG reader also takes phone cameras' MPO
# files). Pillow knows dozens more (TGA, PCX, SGI, PSD, DDS, EPS, which runs Ghostscript when installed, ...):
# each is a parser untrusted uploads could reach for no benefit, so anything else is refused as not an image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow mallocs an image's pixels in blocks of at most this many bytes (its own default: 16 MiB). One
# block per image makes a large image one allocation above malloc's mmap threshold, which glibc maps on
# its own and unmaps when the image is freed; 16 MiB blocks stay below it and, freed on a decode thread,
# stay in that thread's malloc arena for good (see captioner.runtime, "Large images").
WHOLE_IMAGE_BLOCK_BYTES = 1024 * 1024 * 1024  # Pillow's maximum; more than DEFAULT_MAX_PIXELS takes


class ImageErrorCode(enum.Enum):
    """Why an input is not a usable image: what a caller acts on (the service's HTTP status), never the wording."""

    UNSUPPORTED_FORMAT = "unsupported_format"  # not one of IMAGE_FORMATS (or not an image at all)
    TOO_LARGE = "too_large"  # over the pixel limit, or a decompression bomb
    EMPTY_FILE = "empty_file"  # zero bytes
    NO_SUCH_FILE = "no_such_file"  # a path that is not a file
    INVALID_IMAGE = "invalid_image"  # truncated, corrupt, unreadable, or no pixels


class ImageError(CaptionerError, ValueError):
    """An input that cannot be turned into an image: ``code`` says why, the message says it in words."""

    def __init__(self, message: str, code: ImageErrorCode) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, ImageErrorCode]]:
        # pickled with its code (DataLoader workers, process pools)
        return type(self), (str(self), self.code)


@functools.cache
def allocate_images_whole() -> None:
    """Have Pillow allocate each image's pixels in one block, so a large image's memory goes back to the
    system when it is freed (see :data:`WHOLE_IMAGE_BLOCK_BYTES`); :func:`load_image` calls it.

    Process-wide and done once. A block size set with Pillow's own ``PILLOW_BLOCK_SIZE`` is left as it is.
    """
    if "PILLOW_BLOCK_SIZE" not in os.environ:
        Image.core.set_block_size(WHOLE_IMAGE_BLOCK_BYTES)


def load_image(
    source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_size: int | None = None
) -> Image.Image:
    """Open ``source`` (PIL image, bytes, or path) as an upright 8-bit RGB image.

    EXIF orientation is applied; animated images give their first frame; grayscale, palette,
    RGBA (composited on white), CMYK and 16-bit images are converted to RGB with correct levels.
    With ``min_size``, a JPEG (RGB, grayscale or CMYK; phone cameras' MPO files too) is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's DCT scaling) when both sides stay at least ``min_size``: a 12-megapixel
    photo decodes about 10x faster, a large image never occupies its full size in memory, and the
    encoder never sees the lost detail. ``image.info["original_size"]`` is then the full upright size.
    Raises :class:`ImageError` with a one-line reason for anything that is not a usable image.
    """
    allocate_images_whole()
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, bytes | bytearray | memoryview):
            if len(source) == 0:
                raise ImageError("empty file: zero bytes", ImageErrorCode.EMPTY_FILE)
            fp: Any = io.BytesIO(source)
        else:
            fp = os.fspath(source)
            if not os.path.isfile(fp):
                raise ImageError(f"no such file: {fp}", ImageErrorCode.NO_SUCH_FILE)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp, formats=IMAGE_FORMATS)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _open_error(exc) from exc
        except OSError as exc:
            raise ImageError(f"cannot read image: {exc}", ImageErrorCode.INVALID_IMAGE) from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})", ImageErrorCode.INVALID_IMAGE)
    if max_pixels is not None and image.format == "WEBP":
        max_pixels = max_pixels * DECODE_BYTES_PER_PIXEL // WEBP_DECODE_BYTES_PER_PIXEL
    if max_pixels is not None and width * height > max_pixels:
        kind = "the limit for WebP" if image.format == "WEBP" else "the limit"
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels; {kind} is {max_pixels:,}",
            ImageErrorCode.TOO_LARGE,
        )
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        if min_size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO files too
            image.draft(image.mode, (min_size, min_size))  # any mode: CMYK scales as well as RGB
        image.load()
        size = image.size
        ImageOps.exif_transpose(image, in_place=True)  # without in_place it copies even an upright image
        if image.size != size:
            width, height = height, width  # a quarter turn
        image = to_rgb(image)
        image.info["original_size"] = (width, height)
        return image
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"truncated or corrupt image data: {exc}", ImageErrorCode.INVALID_IMAGE) from exc


def _open_error(exc: Exception) -> ImageError:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageError("image dimensions are too large (possible decompression bomb)", ImageErrorCode.TOO_LARGE)
    return ImageError(
        "not a recognised image format (expected JPEG, PNG, GIF, WebP, BMP or TIFF)", ImageErrorCode.UNSUPPORTED_FORMAT
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without the classic mistakes.

    ``Image.convert("RGB")`` clips 16-bit values (so 16-bit photos turn white) and drops alpha onto
    black; both are handled here.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in HIGH_BIT_MODES:
        return _high_bit_to_gray(image).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Pasted on white through its own alpha: 3 more bytes a pixel beside the image, where compositing
        # in RGBA and converting took 4 + 4 + 4 + 3 (a 40-megapixel RGBA PNG peaked at +907 MB, now +310)
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba)
        return rgb
    return image.convert("RGB")


HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_BAND_ROWS = 64  # rows converted at a time


def _high_bit_to_gray(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image -> 8-bit grayscale with the right levels, a band at a time.

    Memory, beyond the decoded image itself: the 8-bit result (1 byte per pixel) and, for one band of
    ``_BAND_ROWS`` rows, its pixels as numpy (Pillow's bytes are joined from chunks, so up to twice
    4 bytes) and float32 scratch: worst case 1 byte per pixel plus ``16 * width * _BAND_ROWS`` bytes.
    Converting the whole image to float64 at once cost about 24 bytes per pixel (a 40-megapixel
    16-bit PNG: ~1 GB per decoding thread).
    """
    # Imported here, not above: these images are rare, and the HTTP client (which reads images with this module)
    # stays free of numpy for everything else.
    import numpy as np

    width, height = image.size
    # in Pillow, without a copy of the pixels; one band (HIGH_BIT_MODES), so (min, max), not one pair per band
    low, high = cast("tuple[float, float]", image.getextrema())
    if image.mode == "F":
        scale = 255.0 if high <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or high > 255:
        scale = 1.0 / 257.0  # 16-bit full range 0..65535 -> 0..255
    else:
        scale = 1.0
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, _BAND_ROWS):
        bottom = min(height, top + _BAND_ROWS)
        band = np.array(image.crop((0, top, width, bottom)), dtype=np.float32)  # a writable copy
        band *= scale
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        out[top:bottom] = band
    return Image.fromarray(out, mode="L")
