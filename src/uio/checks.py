"""Checks of the public API's inputs, made before any work starts.

Each check takes one argument and the name the caller knows it by, and returns it in the form
the model takes, or raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
unusable value) whose message names the argument and says how to fix it.
:meth:`uio.runner.ModelRunner.run` and the task methods call them; a front end (the CLI, a
server checking one request) can call them on their own.

Images (:func:`check_image`): HxWx3 numpy arrays (or torch tensors) of

* ``uint8``: 0..255, used as they are;
* ``uint16``: 16-bit images, scaled to 0..255 as :func:`uio.images.read_image` scales 16-bit files;
* ``float16/32/64``: 0..1, finite.

Other dtypes (``bool``, signed or wider integers...) are refused rather than guessed at.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from .images import scale_16_bit

__all__ = ["PromptTooLongWarning", "RunInputs", "check_answer_options", "check_box", "check_flag", "check_image",
           "check_images", "check_masks", "check_positive_int", "check_run_inputs", "check_text", "check_texts",
           "long_prompts", "warn_long_prompts"]

_FLOATS = (np.float16, np.float32, np.float64)


class PromptTooLongWarning(UserWarning):
    """A prompt (or answer option) longer than the runner's ``max_input_len`` tokens, which cuts it."""


def _kind(value: Any) -> str:
    """How an error message describes a value: its type, and its dtype for arrays."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return "None" if value is None else type(value).__name__


def _as_array(image: Any, name: str) -> np.ndarray:
    """A numpy array (or torch tensor, as numpy) of ``image``; TypeError for anything else."""
    if type(image).__module__.startswith("torch") and hasattr(image, "detach"):
        image = image.detach().cpu()
        image = (image.float() if str(image.dtype) == "torch.bfloat16" else image).numpy()
    if not isinstance(image, np.ndarray):
        hint = (" (a PIL image: pass np.asarray(image.convert('RGB')))" if hasattr(image, "getbands")
                else " (a file: read it with uio.images.read_image(path))")
        raise TypeError(f"{name} must be an HxWx3 numpy array, got {_kind(image)}{hint}")
    return image


def _check_shape(image: np.ndarray, name: str) -> None:
    if image.ndim == 2:
        raise ValueError(f"{name} has shape {image.shape}, a grey image: give it 3 channels, "
                         "e.g. np.repeat(image[..., None], 3, axis=-1)")
    if image.ndim != 3 or image.shape[-1] != 3:
        hint = "; drop the alpha channel with image[..., :3]" if image.ndim == 3 and image.shape[-1] == 4 else ""
        raise ValueError(f"{name} must have shape (height, width, 3), got {image.shape}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")


def _check_float_range(image: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name} holds NaN or infinite values; float images must be finite, in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        hint = " (0..255 values: divide by 255, or pass them as uint8)" if high <= 255 and low >= 0 else ""
        raise ValueError(f"{name} has values from {low:g} to {high:g}; float images must be in [0, 1]{hint}")


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """``image`` as the model takes it: HxWx3 ``uint8`` (``uint16`` scaled to it) or float in [0, 1]."""
    image = _as_array(image, name)
    _check_shape(image, name)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return scale_16_bit(image)
    if image.dtype in _FLOATS:
        _check_float_range(image, name)
        return image
    raise TypeError(f"{name} has dtype {image.dtype}; give uint8 (0..255), uint16 (0..65535) or float (0..1) "
                    "values, e.g. image.astype(np.uint8) for 0..255 integers")


def check_images(images: Any, name: str = "input_images") -> list[np.ndarray | None]:
    """A sequence of images (each as :func:`check_image` takes it) or None for a text-only prompt."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise TypeError(f"{name} must be a sequence of images, one per prompt, got a single image of shape "
                        f"{images.shape}: pass [image]")
    if not isinstance(images, (Sequence, np.ndarray)) or isinstance(images, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of images (or None), one per prompt, got {_kind(images)}")
    return [None if image is None else check_image(image, f"{name}[{i}]") for i, image in enumerate(images)]


def check_text(text: Any, name: str) -> str:
    """``text`` if it is a string (numpy's included), else a TypeError naming ``name``."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {_kind(text)}")
    return str(text)


def check_texts(texts: Any, name: str = "input_texts") -> list[str]:
    """A sequence of strings (not one bare string) as a list."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, got the string {texts[:40]!r}: pass [{name[:-1]}]")
    if not isinstance(texts, (Sequence, np.ndarray)) or np.ndim(texts) != 1:
        raise TypeError(f"{name} must be a sequence of strings, got {_kind(texts)}")
    return [check_text(text, f"{name}[{i}]") for i, text in enumerate(texts)]


def check_positive_int(value: Any, name: str, maximum: int | None = None, optional: bool = True) -> int | None:
    """``value`` as an int in 1..``maximum`` (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        shown = f"{_kind(value)} {value!r}"[:80]
        raise TypeError(f"{name} must be a positive integer{' or None' if optional else ''}, got {shown}")
    if value < 1 or (maximum is not None and value > maximum):
        span = f"between 1 and {maximum}" if maximum is not None else "at least 1"
        raise ValueError(f"{name} must be {span}, got {value}")
    return int(value)


def check_flag(value: Any, name: str, optional: bool = False) -> bool | None:
    """``value`` as a bool (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False{' (or None)' if optional else ''}, got {_kind(value)}")
    return bool(value)


def check_box(box: Any, image: np.ndarray, name: str = "location") -> list[float]:
    """``[x1, y1, x2, y2]`` (pixels) as floats if it is a non-empty box inside ``image``.

    Corners are left-top then right-bottom: ``0 <= x1 < x2 <= width``, ``0 <= y1 < y2 <= height``.
    """
    if isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be 4 numbers [x1, y1, x2, y2], got {_kind(box)}")
    values = list(np.ravel(box)) if isinstance(box, np.ndarray) else list(box)
    if len(values) != 4 or np.ndim(box) != 1:
        raise ValueError(f"{name} must be 4 numbers [x1, y1, x2, y2], got {len(values)} values")
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, Real) for v in values):
        raise TypeError(f"{name} must be 4 numbers [x1, y1, x2, y2], got {[_kind(v) for v in values]}")
    x1, y1, x2, y2 = (float(v) for v in values)
    shown = " ".join(f"{v:g}" for v in (x1, y1, x2, y2))
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise ValueError(f"{name} {shown}: coordinates must be finite numbers")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name} {shown}: need x1 < x2 and y1 < y2 (corners left-top then right-bottom)")
    height, width = image.shape[:2]
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"{name} {shown} is not inside the {width}x{height} image "
                         f"(x in 0..{width}, y in 0..{height} pixels)")
    return [x1, y1, x2, y2]


def check_answer_options(options: Any, name: str = "answer_options") -> list[str] | list[np.ndarray] | None:
    """None, or a non-empty sequence of strings (a 1-D numpy string array too) or of images."""
    if options is None:
        return None
    if isinstance(options, str) or (isinstance(options, np.ndarray) and options.ndim == 0):
        raise TypeError(f"{name} must be a sequence of strings, got the single string {str(options)[:40]!r}: "
                        f"pass [{str(options)[:40]!r}]")
    if not isinstance(options, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of strings (or of images), got {_kind(options)}")
    if isinstance(options, np.ndarray) and options.dtype.kind in "US":
        if options.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of strings, got shape {options.shape}")
        options = options.tolist()
    if len(options) == 0:
        raise ValueError(f"{name} is empty: give at least one option, or None to generate freely")
    if isinstance(options[0], (np.ndarray,)) or type(options[0]).__module__.startswith("torch"):
        return [check_image(option, f"{name}[{i}]") for i, option in enumerate(options)]
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise TypeError(f"{name}[{i}] is {_kind(option)}; options must all be strings (or all images)")
    return [str(option) for option in options]


def check_masks(binary_masks: Any, name: str = "binary_masks") -> list[np.ndarray]:
    """A non-empty sequence of 2-D masks of one size, as bool arrays (non-zero is inside)."""
    if not isinstance(binary_masks, (Sequence, np.ndarray)) or isinstance(binary_masks, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of HxW arrays, got {_kind(binary_masks)}")
    masks = []
    for i, mask in enumerate(binary_masks):
        if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biuf":
            raise TypeError(f"{name}[{i}] must be an HxW numpy array of booleans or numbers, got {_kind(mask)}")
        if mask.ndim != 2 or mask.size == 0 or mask.shape != np.shape(binary_masks[0]):
            raise ValueError(f"{name}[{i}] has shape {mask.shape} ({name}[0]: {np.shape(binary_masks[0])}); masks "
                             "must be non-empty 2-D arrays of the same height and width")
        masks.append(mask.astype(bool))
    return masks


@dataclass(frozen=True)
class RunInputs:
    """The arguments of :meth:`~uio.runner.ModelRunner.run` after :func:`check_run_inputs`."""

    images: list[np.ndarray | None]
    texts: list[str]
    output_text_len: int
    generate_image: bool
    beam_search: bool | None
    num_decodes: int | None
    answer_options: list[str] | list[np.ndarray] | None
    mask_regions: list[list[float] | None] | None
    average_loss: bool


def _check_mask_regions(regions: Any, images: list[np.ndarray | None]) -> list[list[float] | None] | None:
    if regions is None:
        return None
    if not isinstance(regions, (Sequence, np.ndarray)) or len(regions) != len(images):
        raise ValueError(f"mask_regions must hold one box (or None) per image ({len(images)}), got {_kind(regions)}")
    checked = []
    for i, (region, image) in enumerate(zip(regions, images)):
        if region is not None and image is None:
            raise ValueError(f"mask_regions[{i}] is given but input_images[{i}] is None")
        checked.append(None if region is None else check_box(region, image, f"mask_regions[{i}]"))
    return checked


def check_run_inputs(input_images: Any, input_texts: Any, output_text_len: Any = 128, generate_image: Any = False,
                     beam_search: Any = None, num_decodes: Any = None, answer_options: Any = None,
                     mask_regions: Any = None, average_loss: Any = False, *,
                     max_output_text_len: int = 128) -> RunInputs:
    """Every argument of one :meth:`~uio.runner.ModelRunner.run` call checked, as :class:`RunInputs`."""
    images, texts = check_images(input_images), check_texts(input_texts)
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} input_images but {len(texts)} input_texts; give one image (or None) "
                         "per prompt")
    if not texts:
        raise ValueError("input_texts is empty: run() needs at least one prompt")
    options = check_answer_options(answer_options)
    num_decodes = check_positive_int(num_decodes, "num_decodes")
    if options is not None and num_decodes is not None:
        raise ValueError("num_decodes cannot be combined with answer_options (options are scored, not decoded)")
    return RunInputs(images, texts, check_positive_int(output_text_len, "output_text_len", max_output_text_len, False),
                     check_flag(generate_image, "generate_image"), check_flag(beam_search, "beam_search", True),
                     num_decodes, options, _check_mask_regions(mask_regions, images),
                     check_flag(average_loss, "average_loss"))


def long_prompts(tokenizer: Any, texts: Sequence[str], max_input_len: int) -> list[tuple[int, int]]:
    """``(index, tokens)`` of each text longer than ``max_input_len`` tokens (EOS included)."""
    lengths = [len(tokenizer.encode(text)) for text in texts]
    return [(i, n) for i, n in enumerate(lengths) if n > max_input_len]


def warn_long_prompts(tokenizer: Any, texts: Sequence[str], max_input_len: int, name: str = "input_texts") -> None:
    """Warn (:class:`PromptTooLongWarning`) about each text that ``max_input_len`` will cut."""
    for i, n in long_prompts(tokenizer, texts, max_input_len):
        warnings.warn(f"{name}[{i}] is {n} tokens, over max_input_len={max_input_len}: its last {n - max_input_len} "
                      "tokens are cut; shorten it, or make the ModelRunner with a larger max_input_len (up to 256)",
                      PromptTooLongWarning, stacklevel=3)
