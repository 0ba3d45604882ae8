"""``Preprocess.crop_box``: the one computation of where the centre crop lies in the resized image."""

import numpy as np
import pytest
from PIL import Image

from captioner.transforms import Preprocess, resize_crop


@pytest.mark.parametrize(
    ("size", "preprocess", "box"),
    [
        ((384, 256), Preprocess(resize=256, crop=224), (80, 16, 304, 240)),  # landscape: 384x256 resized
        ((256, 384), Preprocess(resize=256, crop=224), (16, 80, 240, 304)),  # portrait
        ((100, 100), Preprocess(resize=64, crop=64), (0, 0, 64, 64)),  # square, crop = resize
        ((1000, 100), Preprocess(resize=40, crop=32), (184, 4, 216, 36)),  # very wide: 400x40 resized
        ((90, 60), Preprocess(resize=20, crop=32), (0, 0, 30, 20)),  # crop larger than the image: clamped
    ],
)
def test_crop_box_is_the_centre_crop_clamped_to_the_resized_image(size, preprocess, box) -> None:
    assert preprocess.crop_box(*size) == box
    resized_w, resized_h, left, top = preprocess.crop_geometry(*size)
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= resized_w and 0 <= y0 < y1 <= resized_h
    assert (x0, y0) == (max(0, left), max(0, top))


def test_resize_crop_takes_its_pixels_from_the_crop_box() -> None:
    """A crop larger than the resized image: the box's pixels, padded with black where it has none."""
    image = Image.new("RGB", (90, 60), "white")
    preprocess = Preprocess(resize=20, crop=32)
    x0, y0, x1, y1 = preprocess.crop_box(*image.size)
    _, _, left, top = preprocess.crop_geometry(*image.size)
    out = np.asarray(resize_crop(image, preprocess))
    white = out.min(axis=2) > 200
    rows, cols = np.nonzero(white)
    assert (cols.min(), cols.max() + 1) == (x0 - left, x1 - left)
    assert (rows.min(), rows.max() + 1) == (y0 - top, y1 - top)
    assert white.sum() == (x1 - x0) * (y1 - y0)
