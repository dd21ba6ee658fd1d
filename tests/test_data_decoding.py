"""Decoding real photos in the colour modes and formats ImageNet-style data contains,
reduced JPEG decoding, and zero-copy pixel views."""
import re

import numpy
import pytest
from PIL import Image

from utils.data.image_decoding import (
    CorruptImageError,
    decode,
    decode_rgb,
    image_to_chw,
    open_image,
    reduce_while_decoding,
)
from utils.data.pillow_pixels import pixel_view
from utils.data.sample_photos import load_photo


@pytest.fixture(scope="module")
def coffee():
    return load_photo("coffee").resize((120, 80))


@pytest.fixture(scope="module")
def camera():
    return load_photo("camera").resize((90, 90))


def _save(image, path, **options):
    image.save(path, **options)
    return str(path)


def test_rgb_jpeg_decodes_to_rgb_of_the_same_size(tmp_path, coffee):
    image = decode_rgb(_save(coffee, tmp_path / "a.JPEG", quality=95))
    assert image.mode == "RGB" and image.size == (120, 80)
    # JPEG is lossy, but the photo must come back close to the original.
    error = numpy.abs(numpy.asarray(image, dtype=float) - numpy.asarray(coffee, dtype=float))
    assert error.mean() < 6


def test_greyscale_jpeg_is_replicated_to_three_equal_channels(tmp_path, camera):
    pixels = numpy.asarray(decode_rgb(_save(camera, tmp_path / "grey.jpg")))
    assert pixels.shape == (90, 90, 3)
    assert numpy.array_equal(pixels[:, :, 0], pixels[:, :, 1])
    assert numpy.array_equal(pixels[:, :, 0], pixels[:, :, 2])
    assert pixels.std() > 10  # a real photo, not a flat image


def test_cmyk_jpeg_converts_to_rgb(tmp_path, coffee):
    path = _save(coffee.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    image = decode_rgb(path)
    assert image.mode == "RGB"
    error = numpy.abs(numpy.asarray(image, dtype=float) - numpy.asarray(coffee, dtype=float))
    assert error.mean() < 8


def test_png_with_alpha_palette_and_16_bits(tmp_path, coffee, camera):
    rgba = coffee.convert("RGBA")
    assert decode_rgb(_save(rgba, tmp_path / "rgba.png")).mode == "RGB"
    palette = coffee.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    assert decode_rgb(_save(palette, tmp_path / "palette.png")).mode == "RGB"
    grey = numpy.asarray(camera, dtype=numpy.uint16)
    sixteen_bit = Image.fromarray(grey * 257)  # 0..255 -> 0..65535
    path = _save(sixteen_bit, tmp_path / "grey16.png")
    assert Image.open(path).mode.startswith("I")
    pixels = numpy.asarray(decode_rgb(path))
    assert numpy.array_equal(pixels[:, :, 1], grey)


def test_missing_file_names_its_path(tmp_path):
    path = str(tmp_path / "n01" / "missing.JPEG")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image file not found: {path}")):
        decode_rgb(path)


def test_directory_instead_of_file_names_its_path(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        decode_rgb(str(tmp_path))


def test_garbage_bytes_are_a_corrupt_image_naming_the_path(tmp_path):
    path = tmp_path / "garbage.JPEG"
    path.write_bytes(numpy.random.default_rng(0).bytes(2000))
    with pytest.raises(CorruptImageError, match=re.escape(f"corrupt image {path}")):
        decode_rgb(str(path))


def test_truncated_jpeg_is_a_corrupt_image(tmp_path, coffee):
    path = tmp_path / "cut.JPEG"
    data = open(_save(coffee, path), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=re.escape(f"corrupt image {path}")):
        decode_rgb(str(path))


def test_image_to_chw_is_float32_in_unit_range(coffee, camera):
    x = image_to_chw(coffee)
    assert x.dtype == numpy.float32 and x.shape == (3, 80, 120)
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    numpy.testing.assert_allclose(x[:, 5, 7], numpy.asarray(coffee)[5, 7] / 255, rtol=1e-6)
    assert image_to_chw(camera).shape == (1, 90, 90)


def test_open_image_reads_the_header_and_decode_finishes(tmp_path, coffee):
    path = _save(coffee, tmp_path / "a.JPEG", quality=95)
    with open_image(path) as image:
        assert image.size == (120, 80) and image.tile  # header only: pixels still to decode
        decoded = decode(image)
        assert decoded.mode == "RGB" and not image.tile
        assert numpy.array_equal(numpy.asarray(decoded), numpy.asarray(decode_rgb(path)))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        open_image(str(tmp_path / "missing.JPEG"))


def test_truncated_jpeg_fails_when_decoded_naming_the_path(tmp_path, coffee):
    path = tmp_path / "cut.JPEG"
    data = open(_save(coffee, path), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with open_image(str(path)) as image:  # the header is intact
        with pytest.raises(CorruptImageError, match=re.escape(f"corrupt image {path}")):
            decode(image)


def test_jpeg_reduction_while_decoding(tmp_path):
    photo = load_photo("astronaut")  # 512 x 512
    path = _save(photo.resize((401, 300)), tmp_path / "big.JPEG", quality=95)
    for factor, size in ((1, (401, 300)), (2, (201, 150)), (4, (101, 75)), (8, (51, 38))):
        with open_image(path) as image:
            assert reduce_while_decoding(image, factor) == factor
            assert image.size == size
            decoded = decode(image)
            assert decoded.size == size
    # The reduced decode is an average of the full one, not a subsample.
    full = numpy.asarray(decode_rgb(path), dtype=float)[:296, :400]
    with open_image(path) as image:
        reduce_while_decoding(image, 4)
        quarter = numpy.asarray(decode(image), dtype=float)[:74, :100]
    block_means = full.reshape(74, 4, 100, 4, 3).mean(axis=(1, 3))
    assert numpy.abs(quarter - block_means).mean() < 3
    png = _save(photo, tmp_path / "a.png")
    with open_image(png) as image:
        assert reduce_while_decoding(image, 2) == 1 and image.size == (512, 512)
    assert reduce_while_decoding(decode_rgb(path), 2) == 1  # already decoded
    with pytest.raises(ValueError, match="JPEG decoding reduces by 1, 2, 4 or 8, got 3"):
        reduce_while_decoding(decode_rgb(path), 3)


def test_one_channel_decoding_takes_greyscale_only(tmp_path, coffee, camera):
    grey = decode(Image.open(_save(camera, tmp_path / "grey.png")), channels=1)
    assert grey.mode == "L" and numpy.array_equal(numpy.asarray(grey), numpy.asarray(camera))
    sixteen = Image.fromarray(numpy.asarray(camera, dtype=numpy.uint16) * 257)
    assert numpy.array_equal(numpy.asarray(decode(sixteen, channels=1)), numpy.asarray(camera))
    colour = _save(coffee, tmp_path / "colour.png")
    with pytest.raises(ValueError, match=re.escape(f"image {colour} has colour mode RGB")):
        decode(Image.open(colour), channels=1)
    with pytest.raises(ValueError, match="images decode to 1 .L. or 3 .RGB. channels, not 2"):
        decode(camera, channels=2)


def test_pixel_view_shares_pillow_storage(coffee, camera):
    view = pixel_view(coffee)
    assert view.shape == (80, 120, 4) and not view.flags.owndata and not view.flags.writeable
    assert numpy.array_equal(view[:, :, :3], numpy.asarray(coffee))
    grey = pixel_view(camera)
    assert grey.shape == (90, 90) and numpy.array_equal(grey, numpy.asarray(camera))
    # The view keeps the pixels alive after the image is gone and its memory reused.
    image = coffee.copy()
    view = pixel_view(image)
    del image
    others = [coffee.copy() for _ in range(20)]  # noqa: F841 (allocations that could reuse it)
    assert numpy.array_equal(view[:, :, :3], numpy.asarray(coffee))
    with pytest.raises(ValueError, match="pixel views take 8-bit L or RGB images, got mode P"):
        pixel_view(coffee.convert("P"))


def test_pixel_view_falls_back_to_a_copy_for_images_in_several_blocks():
    # Pillow's default block is 16 MiB: a 2500 x 2000 RGB image (20 MB) spans two.
    image = Image.new("RGB", (2500, 2000), (10, 20, 30))
    view = pixel_view(image)
    assert view.shape == (2000, 2500, 3)  # three bytes per pixel: numpy.asarray's copy
    assert (view[1999, 2499] == (10, 20, 30)).all()
