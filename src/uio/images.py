"""Read image files of any PIL mode and bit depth as the HxWx3 uint8 arrays the model takes.

PIL's own ``convert("RGB")`` clips 16- and 32-bit grey to 255 (a 16-bit pixel of 110 * 257
comes out white) and drops transparency onto black. :func:`read_image` instead:

* scales 16-bit integer grey (modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding 0..65535)
  to 0..255 with rounding (``v / 257``); ``I`` values outside 0..65535 are refused;
* scales 32-bit float grey (mode ``F``) from the smallest of the ranges 0..1, 0..255 or 0..65535
  that holds it; negative, NaN or infinite values are refused;
* composites transparency (an alpha band, or a palette's or grey image's transparent colour)
  onto white, the usual background of documents and web graphics;
* applies the EXIF orientation, and reads the first frame of animations and multi-page files;
* refuses images of more than :data:`MAX_PIXELS` pixels before decoding them (decompression bombs).

Errors are :class:`ImageReadError` (a ``ValueError``) whose message starts with the file's name.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BACKGROUND", "MAX_PIXELS", "ImageReadError", "read_image", "read_mask", "scale_16_bit"]

MAX_PIXELS = 8192 * 8192  # below PIL's own bomb warning (~89.5 M pixels); the model sees 384x384 anyway
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_FLOAT_RANGES = (1.0, 255.0, 65535.0)


class ImageReadError(ValueError):
    """An image that cannot be read: missing, not an image, too large, or values out of range."""


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<image bytes>"
    return str(getattr(source, "name", "<image file object>" if hasattr(source, "read") else "source"))


def _open(source: ImageSource, name: str) -> Image.Image:
    """``Image.open`` on a path, bytes or binary file object; ImageReadError if it is not an image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise ImageReadError(f"{name}: no such file")
    elif not hasattr(source, "read"):
        raise TypeError(f"{name}: expected a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        return Image.open(source)
    except Image.DecompressionBombError:
        raise _too_large(name, None) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not a readable image (not an image file, or a format PIL cannot read)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{name}: not a readable image ({err})") from None


def _too_large(name: str, size: tuple[int, int] | None) -> ImageReadError:
    shown = f" is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels;" if size else " is too large;"
    return ImageReadError(f"{name}{shown} images of at most {MAX_PIXELS:,} pixels are read "
                          "(a guard against decompression bombs); scale it down first")


def scale_16_bit(values: np.ndarray) -> np.ndarray:
    """Integer values in 0..65535 -> 0..255, rounded (a value of ``k * 257`` becomes ``k``)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _integer_grey(image: Image.Image, name: str) -> np.ndarray:
    """Mode ``I`` or ``I;16*`` as 0..255 grey; ``I`` beyond 16 bits is refused."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageReadError(f"{name}: 32-bit integer pixels from {values.min()} to {values.max()}; only 0..65535 "
                             "(16-bit data) can be scaled to 8 bits: save it as an 8- or 16-bit image")
    return scale_16_bit(values)


def _float_grey(image: Image.Image, name: str) -> np.ndarray:
    """Mode ``F`` as 0..255 grey, scaled from 0..1, 0..255 or 0..65535 (the smallest that fits)."""
    values = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ImageReadError(f"{name}: floating-point pixels include NaN or infinity")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if low < 0 or high > _FLOAT_RANGES[-1]:
        raise ImageReadError(f"{name}: floating-point pixels from {low:g} to {high:g}; expected them within "
                             "0..1, 0..255 or 0..65535")
    top = next(limit for limit in _FLOAT_RANGES if high <= limit)
    return np.rint(values * (255.0 / top)).astype(np.uint8)


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # not LAB: its "A" band is a colour axis


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _composited(image: Image.Image) -> Image.Image:
    """``image`` as RGB, its transparent pixels composited onto :data:`BACKGROUND`."""
    if not _has_transparency(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, scaling deep grey and compositing transparency onto white."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        grey = _integer_grey(image, name)
    elif image.mode == "F":
        grey = _float_grey(image, name)
    else:
        try:
            return np.asarray(_composited(image))
        except ValueError as err:  # modes PIL cannot convert to RGB (LAB, HSV...)
            raise ImageReadError(f"{name}: cannot read PIL mode {image.mode} as RGB ({err})") from None
    return np.repeat(grey[..., None], 3, axis=-1)


def _decoded(source: ImageSource, name: str) -> Image.Image:
    """The image opened, size-checked, decoded and turned upright (EXIF orientation)."""
    with _open(source, name) as image:
        if image.width * image.height > MAX_PIXELS:
            raise _too_large(name, image.size)
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise ImageReadError(f"{name}: not a readable image ({err})") from None


def read_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """An image file as an HxWx3 uint8 array (see the module's docstring for how modes are read).

    :param source: a path, the file's bytes, or a binary file object
    :param name: what error messages call the image (default: the path, or the file object's name)
    :raises ImageReadError: (a ``ValueError``) naming the file and the problem
    :raises TypeError: ``source`` is none of the above
    """
    name = _source_name(source, name)
    return np.ascontiguousarray(_to_rgb(_decoded(source, name), name))


def read_mask(source: ImageSource, name: str | None = None) -> np.ndarray:
    """A mask image as an HxW bool array: pixels brighter than half the brightest (0/1 or 0/255 masks).

    Brightness is PIL's luminance (``L``) of the pixels as :func:`read_image` reads them.
    """
    grey = read_image(source, name) @ np.array([0.299, 0.587, 0.114])
    return grey > grey.max() / 2 if grey.max() > 0 else np.zeros(grey.shape, bool)
