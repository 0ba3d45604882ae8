"""The single image-preprocessing path shared by training and serving.

Loading (any source -> upright RGB PIL image) and per-encoder tensor preprocessing live here and only
here, so that a model never sees differently prepared pixels at training and at serving time.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

ImageSource = Image.Image | bytes | str | os.PathLike

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input that cannot be turned into an image (not an image, truncated, too large, ...)."""


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its pixels: resize the short side, centre-crop, normalise."""

    resize: int  # short side after resizing
    crop: int  # square centre crop fed to the encoder
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``source`` (PIL image, bytes, or path) as an upright 8-bit RGB image.

    EXIF orientation is applied; animated images give their first frame; grayscale, palette,
    RGBA (composited on white), CMYK and 16-bit images are converted to RGB with correct levels.
    Raises :class:`ImageError` with a one-line reason for anything that is not a usable image.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, bytes | bytearray | memoryview):
            if len(source) == 0:
                raise ImageError("empty file: zero bytes")
            fp: Any = io.BytesIO(source)
        else:
            fp = os.fspath(source)
            if not os.path.isfile(fp):
                raise ImageError(f"no such file: {fp}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(_describe_open_error(exc)) from exc
        except OSError as exc:
            raise ImageError(f"cannot read image: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"truncated or corrupt image data: {exc}") from exc


def _describe_open_error(exc: Exception) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "image dimensions are too large (possible decompression bomb)"
    return "not a recognised image format (expected JPEG, PNG, GIF, WebP, BMP or TIFF)"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without the classic mistakes.

    ``Image.convert("RGB")`` clips 16-bit values (so 16-bit photos turn white) and drops alpha onto
    black; both are handled here.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        elif mode != "F" and (mode.startswith("I;16") or (arr.size and arr.max() > 255)):
            arr = arr / 257.0  # 16-bit full range 0..65535 -> 0..255
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def build_transform(preprocess: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor ``(3, crop, crop)`` for the encoder."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(preprocess.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(preprocess.crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ]
    )


def preprocess_images(
    sources: Sequence[ImageSource], preprocess: Preprocess, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Load and preprocess several images into one batch ``(B, 3, crop, crop)``."""
    transform = build_transform(preprocess)
    return torch.stack([transform(load_image(s, max_pixels=max_pixels)) for s in sources])
