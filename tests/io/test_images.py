"""uio.images.read_image: every PIL mode and bit depth, transparency, orientation, bad files."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uio import cli, images
from uio.images import ImageReadError, read_image, read_mask


def _encoded(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _png(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes 16-bit grey, but not 16-bit colour or grey+alpha)."""
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 110 * 257, 65535], [257, 128, 1000]], np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(_encoded(Image.fromarray(values)))
    expected = np.round(values / 257).astype(np.uint8)
    for read in (read_image, cli.read_image):  # the CLI reads through uio.images
        image = read(path)
        assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
        np.testing.assert_array_equal(image[..., 0], expected)
        np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert read_image(path)[0, 1, 0] == 110


@pytest.mark.parametrize("dtype", [">u2", "<u2"])
def test_16_bit_grey_tiff_of_either_byte_order(dtype):
    values = np.array([[110 * 257, 65535, 0]], dtype)
    image = Image.fromarray(values)
    assert image.mode in ("I;16B", "I;16")
    np.testing.assert_array_equal(read_image(_encoded(image, "TIFF"))[0, :, 1], [110, 255, 0])


def test_32_bit_integer_grey_holding_16_bit_values_is_scaled_and_wider_values_refused():
    image = Image.fromarray(np.array([[110 * 257, 65535]], np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(read_image(_encoded(image, "TIFF"))[0, :, 0], [110, 255])
    wide = Image.fromarray(np.array([[0, 70000]], np.int32))
    with pytest.raises(ImageReadError, match=r"deep\.tif: 32-bit integer pixels from 0 to 70000; only 0\.\.65535"):
        read_image(_encoded(wide, "TIFF"), "deep.tif")


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1
    ([0.0, 110.0, 255.0], [0, 110, 255]),  # 0..255
    ([0.0, 110.0 * 257, 65535.0], [0, 110, 255]),  # 0..65535
])
def test_float_grey_is_scaled_from_the_smallest_range_that_holds_it(values, expected):
    image = Image.fromarray(np.array([values], np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(read_image(_encoded(image, "TIFF"))[0, :, 0], expected)


@pytest.mark.parametrize("value, problem", [(-1.0, "from -1 to"), (1e6, "to 1e\\+06"), (np.nan, "NaN")])
def test_float_grey_out_of_every_range_is_refused(value, problem):
    image = Image.fromarray(np.array([[0.5, value]], np.float32))
    with pytest.raises(ImageReadError, match=f"f.tif: floating-point pixels .*{problem}"):
        read_image(_encoded(image, "TIFF"), "f.tif")


def test_16_bit_colour_and_grey_alpha_pngs():
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 110 * 257, 65535
    np.testing.assert_array_equal(read_image(_png(rgb, 2))[0, 0], [110, 255, 0])
    grey_alpha = np.zeros((2, 2, 2), np.uint16)
    grey_alpha[..., 0] = 110 * 257
    grey_alpha[0, 0, 1] = 65535  # one opaque pixel, the others transparent
    read = read_image(_png(grey_alpha, 4))
    np.testing.assert_array_equal(read[0, 0], [110] * 3)
    np.testing.assert_array_equal(read[1, 1], images.BACKGROUND)


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 0] = 200
    rgba[0, :, 3] = [255, 0, 128]
    read = read_image(_encoded(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(read[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(read[0, 1], [255, 255, 255])
    np.testing.assert_allclose(read[0, 2], [228, 127, 127], atol=1)  # half-way to white
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    read = read_image(_encoded(palette, transparency=0))
    np.testing.assert_array_equal(read[0], [[255, 255, 255], [40, 50, 60]])


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "LA", "I;16", "I", "F"])
def test_every_common_mode_reads_as_hxwx3_uint8(mode):
    image = read_image(_encoded(Image.new(mode, (5, 4)), "TIFF"))
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8


def test_exif_orientation_is_applied():
    pixels = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    read = read_image(_encoded(Image.fromarray(pixels), "JPEG", exif=exif.tobytes()))
    assert read.shape == (4, 2, 3)


def test_sources_path_bytes_and_file_object(tmp_path):
    data = _encoded(Image.new("RGB", (3, 2), (1, 2, 3)))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with open(path, "rb") as f:
        from_file = read_image(f)
    for image in (read_image(path), read_image(str(path)), read_image(data), read_image(memoryview(data)), from_file):
        np.testing.assert_array_equal(image, np.full((2, 3, 3), [1, 2, 3], np.uint8))
    with pytest.raises(TypeError, match="expected a path, bytes or a binary file object"):
        read_image(12)


def test_pixel_cap_is_checked_before_decoding(monkeypatch):
    data = _encoded(Image.new("L", (40, 30)))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageReadError, match=r"big\.png is 40x30 = 1,200 pixels; images of at most 1,000 pixels"):
        read_image(data, "big.png")


@pytest.mark.parametrize("data, problem", [
    (b"not an image", "not a readable image"),
    (_encoded(Image.new("RGB", (64, 64)), "JPEG")[:300], "not a readable image .*truncated"),
])
def test_unreadable_files_name_the_file(tmp_path, data, problem):
    path = tmp_path / "broken.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageReadError, match=f"^{path}: (?i:{problem})"):
        read_image(path)
    with pytest.raises(ImageReadError, match=f"^{tmp_path / 'missing.png'}: no such file"):
        read_image(tmp_path / "missing.png")


def test_mask_reads_any_mode_as_bool():
    values = np.array([[0, 65535, 30000]], np.uint16)  # 16-bit: 30000 is below half of white
    np.testing.assert_array_equal(read_mask(_encoded(Image.fromarray(values))), [[False, True, False]])
    np.testing.assert_array_equal(read_mask(_encoded(Image.new("1", (2, 1)))), [[False, False]])


def test_transparent_mask_pixels_are_outside_the_mask():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 1] = [255, 255, 255, 255]  # one opaque white pixel; the others transparent
    np.testing.assert_array_equal(read_mask(_encoded(Image.fromarray(rgba, "RGBA"))), [[False, True, False]])
