"""The image a :mod:`captioner.client` request carries: a path, the file's bytes or a PIL image, made into the
multipart file part ``(filename, bytes, content type)``.

This is where the client reads files and encodes images (the clients call it on worker threads, or off the
event loop); a file that cannot be read or an image that cannot be encoded raises
:class:`~captioner.client_errors.ImageReadError` and nothing is sent.
"""

from __future__ import annotations

import io
import mimetypes
import os
from pathlib import Path

from PIL import Image

from captioner.client_errors import ImageReadError
from captioner.images import ImageError, load_image

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image
Upload = tuple[str, bytes, str]  # a multipart file part: (filename, bytes, content type)
_UNNAMED = "image"  # the filename of bytes, which have no name of their own


def check_image_type(image: object) -> None:
    """Raise ``TypeError`` unless ``image`` is something :func:`read_upload` takes (checked before any request)."""
    if not isinstance(image, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        raise TypeError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")


def read_upload(image: ImageInput) -> Upload:
    """The multipart file part for ``image``; reads a file, or encodes a PIL image.

    Files and bytes go as they are: the server sniffs the format and applies EXIF orientation, and a JPEG
    stays small. A PIL image goes as lossless PNG of the upright RGB pixels the library itself would
    caption, so the server's caption equals ``Captioner.caption`` on the same image.
    """
    check_image_type(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return _UNNAMED, bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return "image.png", _encode_png(image), "image/png"
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(None, "unreadable_file", f"cannot read {path}: {exc.strerror or exc}") from exc
    return path.name, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _encode_png(image: Image.Image) -> bytes:
    try:
        upright = load_image(image, max_pixels=None)  # the server enforces its own pixel limit
    except ImageError as exc:
        raise ImageReadError(None, "invalid_image", str(exc)) from exc
    buffer = io.BytesIO()
    upright.save(buffer, "PNG", compress_level=1)  # size matters less than time on the way to a local server
    return buffer.getvalue()
