import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.transforms import (
    WHOLE_IMAGE_BLOCK_BYTES,
    ImageError,
    Preprocess,
    build_transform,
    load_image,
    preprocess_images,
    resize_crop,
    to_tensor,
)

PRE = Preprocess(resize=40, crop=32)


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(w=60, h=40) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    arr = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 128, np.uint8)], -1)
    return Image.fromarray(arr, "RGB")


def _odd_images() -> dict[str, bytes | Image.Image]:
    rgb = _gradient()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    palette_t.info["transparency"] = 0
    frames = [Image.new("RGB", (30, 20), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    return {
        "rgb-jpeg": _bytes(rgb, "JPEG"),
        "grayscale": _bytes(rgb.convert("L"), "PNG"),
        "bilevel": _bytes(rgb.convert("1"), "PNG"),
        "palette": _bytes(rgb.convert("P"), "PNG"),
        "palette-transparency": _bytes(palette_t, "PNG"),
        "rgba": _bytes(rgba, "PNG"),
        "la": _bytes(rgb.convert("LA"), "PNG"),
        "cmyk-jpeg": _bytes(rgb.convert("CMYK"), "JPEG"),
        "gray16": _bytes(Image.fromarray((np.arange(2400).reshape(40, 60) * 27).astype(np.uint16)), "PNG"),
        "int32": Image.fromarray(np.full((40, 60), 40000, np.int32), "I"),
        "float": Image.fromarray(np.full((40, 60), 0.5, np.float32), "F"),
        "animated-gif": gif.getvalue(),
        "exif-rotated": _bytes(rgb, "JPEG", exif=exif),
        "webp": _bytes(rgb, "WEBP"),
        "bmp": _bytes(rgb, "BMP"),
        "tiff": _bytes(rgb, "TIFF"),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_every_mode_preprocesses_to_the_same_shape(name):
    image = load_image(_odd_images()[name])
    assert image.mode == "RGB"
    tensor = build_transform(PRE)(image)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()


def test_sixteen_bit_keeps_its_levels():
    mid = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert np.asarray(load_image(_bytes(mid, "PNG")))[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(_bytes(clear, "PNG")))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert np.asarray(load_image(_bytes(half, "PNG")))[0, 0].tolist() == [127, 127, 127]


def test_exif_orientation_is_applied():
    image = load_image(_odd_images()["exif-rotated"])
    assert image.size == (40, 60)  # stored 60x40, displayed rotated


def test_animated_gif_gives_first_frame():
    assert np.asarray(load_image(_odd_images()["animated-gif"]))[0, 0].tolist() == [255, 0, 0]


def test_cmyk_colours_survive():
    red = Image.new("RGB", (8, 8), (255, 0, 0)).convert("CMYK")
    r, g, b = np.asarray(load_image(_bytes(red, "JPEG")))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "zero bytes"),
        (b"just some text, not an image\n", "not a recognised image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a recognised image"),
    ],
)
def test_non_images_are_refused_clearly(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_files_are_refused():
    for fmt in ("JPEG", "PNG"):
        data = _bytes(_gradient(200, 200), fmt)
        with pytest.raises(ImageError, match="truncated|cannot read"):
            load_image(data[: len(data) // 2])


def test_pixel_limit_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="limit is 100"):
        load_image(_bytes(_gradient(), "PNG"), max_pixels=100)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_is_refused():
    bomb = _bytes(Image.new("L", (10_000, 10_000)), "PNG")  # 100 MP of zeros compresses to ~100 kB
    with pytest.raises(ImageError, match="decompression bomb|limit"):
        load_image(bomb, max_pixels=None)


def test_batch_helper_and_normalisation():
    batch = preprocess_images(
        [_gradient(), _gradient()], Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    assert batch.shape == (2, 3, 32, 32)
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random colour fields: a JPEG-friendly stand-in for a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (640, 427), (333, 500), (41, 40), (500, 7)])
def test_resize_crop_matches_torchvision_resize_and_centre_crop(size):
    # the single-resample crop must give the pixels of torchvision's Resize + CenterCrop (what the
    # transform used to be, and what the first feature caches were built with) to within rounding
    from torchvision.transforms import v2

    pre = Preprocess(resize=292, crop=260)
    image = _photo_like(*size)
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(pre.crop),
        ]
    )(image)
    ours = torch.from_numpy(np.array(resize_crop(image, pre))).permute(2, 0, 1)
    assert ours.shape == reference.shape == (3, 260, 260)
    diff = (ours.int() - reference.int()).abs()
    assert diff.max() <= 3
    assert diff.float().mean() < 0.1


def test_crop_larger_than_the_resized_image_is_padded_black():
    pre = Preprocess(resize=20, crop=32)
    out = np.asarray(resize_crop(Image.new("RGB", (40, 20), "white"), pre))
    assert out.shape == (32, 32, 3)
    assert (out[0] == 0).all() and (out[-1] == 0).all()  # rows above and below the 20-pixel-high image
    assert (out[16] == 255).all()  # 40 wide resized to 40: the crop is all image across


def test_to_tensor_normalises_like_the_formula():
    pre = Preprocess(resize=4, crop=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    image = Image.fromarray(np.full((4, 4, 3), (51, 102, 255), np.uint8), "RGB")
    x = to_tensor([image, image], pre)
    expected = (torch.tensor([51, 102, 255]) / 255.0 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x[1, :, 2, 3], expected)


def test_large_jpeg_decodes_at_reduced_scale_with_the_same_crop():
    pre = Preprocess(resize=292, crop=260)
    photo = _photo_like(2400, 1800, seed=1)
    data = _bytes(photo, "JPEG", quality=95)
    small = load_image(data, min_size=pre.resize)
    full = load_image(data)
    assert small.size == (600, 450)  # 1/4 scale: the largest with both sides >= 292
    assert small.info["original_size"] == full.info["original_size"] == (2400, 1800)
    a = np.asarray(resize_crop(small, pre)).astype(int)
    b = np.asarray(resize_crop(full, pre)).astype(int)
    assert np.abs(a - b).mean() < 2.0  # DCT-domain scaling is a fine low-pass filter
    # never below the size the encoder needs, and PNGs are decoded whole
    assert min(load_image(_bytes(_photo_like(500, 300), "JPEG"), min_size=292).size) >= 292
    assert load_image(_bytes(photo, "PNG"), min_size=pre.resize).size == (2400, 1800)


@pytest.mark.parametrize("kind", ["cmyk-jpeg", "grayscale-jpeg", "mpo"])
def test_every_kind_of_jpeg_decodes_at_reduced_scale(kind: str) -> None:
    """CMYK JPEGs (print workflows) and phone cameras' MPO files are JPEGs too: decoded at full size, a
    36-megapixel CMYK upload held ~290 MB on its decode thread instead of ~2 MB."""
    pre = Preprocess(resize=292, crop=260)
    photo = _photo_like(2400, 1800, seed=2)
    if kind == "mpo":
        data = _bytes(photo, "MPO", save_all=True, append_images=[photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        assert Image.open(io.BytesIO(data)).format == "MPO"
    else:
        data = _bytes(photo.convert("CMYK" if kind == "cmyk-jpeg" else "L"), "JPEG", quality=95)
    small = load_image(data, min_size=pre.resize)
    full = load_image(data)
    assert small.size == (600, 450) and full.size == (2400, 1800)
    assert small.mode == "RGB" and small.info["original_size"] == (2400, 1800)
    a = np.asarray(resize_crop(small, pre)).astype(int)
    b = np.asarray(resize_crop(full, pre)).astype(int)
    assert np.abs(a - b).mean() < 2.0  # the same pixels but for DCT scaling's low-pass filter


def test_original_size_is_upright_for_exif_rotated_photos():
    image = _gradient(60, 40)
    exif = image.getexif()
    exif[0x0112] = 6
    loaded = load_image(_bytes(image, "JPEG", exif=exif))
    assert loaded.size == (40, 60)
    assert loaded.info["original_size"] == (40, 60)


@pytest.mark.parametrize("pillow_format", ["TGA", "PCX", "SGI", "PPM", "ICO", "IM", "DDS"])
def test_formats_outside_the_documented_ones_are_refused(pillow_format, tmp_path) -> None:
    path = tmp_path / f"image.{pillow_format.lower()}"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path, format=pillow_format)
    assert Image.open(path).format == pillow_format  # Pillow itself would decode it
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(str(path))
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(path.read_bytes())


@pytest.mark.parametrize("pillow_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_documented_formats_are_decoded(pillow_format) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 10)).save(buffer, format=pillow_format)
    assert load_image(buffer.getvalue()).size == (32, 24)


@pytest.mark.parametrize(("mode", "dtype", "value", "expected"), [
    ("I;16", np.uint16, 65535, 255), ("I", np.int32, 40000, 156), ("F", np.float32, 0.5, 128),
])  # fmt: skip
def test_high_bit_images_convert_in_bands_within_a_byte_per_pixel(mode, dtype, value, expected) -> None:
    import tracemalloc

    from captioner.images import _BAND_ROWS, to_rgb

    height, width = 1500, 2000
    image = Image.fromarray(np.full((height, width), value, dtype))
    assert image.mode == mode
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and np.asarray(rgb)[-1, -1].tolist() == [expected] * 3
    # the 8-bit result (1 B per pixel) and one band's scratch; Pillow's own images are not Python allocations
    bound = height * width + 16 * width * _BAND_ROWS + 100_000
    assert peak <= bound, f"{peak / (height * width):.1f} bytes per pixel"


@pytest.mark.parametrize(("env", "block_size"), [({}, WHOLE_IMAGE_BLOCK_BYTES), ({"PILLOW_BLOCK_SIZE": "16m"}, 2**24)])
def test_images_are_allocated_whole_unless_pillow_block_size_is_set(env: dict[str, str], block_size: int) -> None:
    """One block per image is what lets a large image's memory go back (captioner.runtime, "Large images");
    a block size the user gave Pillow stays. Fresh processes: the setting is process-wide."""
    probe = (
        "from PIL import Image; from captioner.transforms import load_image; "
        "load_image(Image.new('RGB', (4, 4))); print(Image.core.get_block_size())"
    )
    environ = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCK_SIZE"}
    done = subprocess.run([sys.executable, "-c", probe], env={**environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == block_size
