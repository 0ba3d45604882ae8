"""Every way ``load_image`` refuses an input carries an :class:`ImageErrorCode`, which front ends act on."""

import io
import pickle

import pytest
from PIL import Image

from captioner.transforms import ImageError, ImageErrorCode, load_image


def _png(size: tuple[int, int] = (60, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _tga() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TGA")  # Pillow reads it; load_image does not
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make_source", "kwargs", "code"),
    [
        (lambda: b"", {}, ImageErrorCode.EMPTY_FILE),
        (lambda: b"just some text, not an image\n", {}, ImageErrorCode.UNSUPPORTED_FORMAT),
        (_tga, {}, ImageErrorCode.UNSUPPORTED_FORMAT),
        (_png, {"max_pixels": 100}, ImageErrorCode.TOO_LARGE),
        (lambda: _png((10_000, 10_000), "L"), {"max_pixels": None}, ImageErrorCode.TOO_LARGE),  # decompression bomb
        (lambda: _png((200, 200))[:100], {}, ImageErrorCode.INVALID_IMAGE),  # truncated
        (lambda: Image.new("RGB", (0, 5)), {}, ImageErrorCode.INVALID_IMAGE),  # no pixels
    ],
    ids=["empty", "text", "tga", "over-limit", "bomb", "truncated", "no-pixels"],
)
def test_each_refusal_has_its_code(make_source, kwargs, code) -> None:
    with pytest.raises(ImageError) as caught:
        load_image(make_source(), **kwargs)
    assert caught.value.code is code


def test_a_missing_path_has_its_code(tmp_path) -> None:
    with pytest.raises(ImageError, match="no such file") as caught:
        load_image(tmp_path / "missing.jpg")
    assert caught.value.code is ImageErrorCode.NO_SUCH_FILE


def test_the_code_survives_pickling() -> None:
    """Errors cross process boundaries (data loader workers, process pools) with their code."""
    error = pickle.loads(pickle.dumps(ImageError("image is too wide", ImageErrorCode.TOO_LARGE)))
    assert isinstance(error, ImageError)
    assert (str(error), error.code) == ("image is too wide", ImageErrorCode.TOO_LARGE)
