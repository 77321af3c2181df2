"""Show Unified-IO's outputs in matplotlib figures (for notebooks), drawn with :mod:`uio.draw`.

matplotlib is imported on first use (``pip install "unified-io[notebook]"``), so importing this
module costs nothing. Images are PIL images or HxWx3 (HxW) arrays, uint8 or float in [0, 1], as
:class:`~uio.runner.ModelRunner` returns them; boxes are ``[x1, y1, x2, y2]`` pixels of the input.
Every ``show_*`` function makes one pyplot figure (so a notebook shows it) and returns it.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import draw
from .processing import undo_image_preprocessing
from .results import fit_masks as masks_to_image
from .results import region_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    ImageLike = Image.Image | np.ndarray

__all__ = ["masks_to_image", "region_labels", "show_boxes", "show_depth", "show_images", "show_inpainting",
           "show_masks", "show_normals", "show_pose", "show_text"]

TITLE_WIDTH = 48  # characters per title line: model text can be long


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('uio.plots needs matplotlib: pip install "unified-io[notebook]"') from None
    return plt


def _wrap(title: str | None) -> str:
    return "\n".join(textwrap.fill(line, TITLE_WIDTH) for line in (title or "").splitlines())


def show_images(images: Sequence[ImageLike], titles: Sequence[str | None] | None = None, *,
                cmap: str | None = None, size: float = 4.0) -> Figure:
    """Show ``images`` side by side, each above its title; single-channel images in ``cmap``."""
    if len(images) == 0:
        raise ValueError("show_images needs at least one image")
    titles = list(titles) if titles is not None else [None] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles")
    fig, axes = _pyplot().subplots(1, len(images), figsize=(size * len(images), size), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        pixels = np.asarray(image) if cmap is not None and np.ndim(image) == 2 else draw.to_pil(image)
        ax.imshow(pixels, cmap=cmap)
        ax.set_title(_wrap(title), fontsize=9, parse_math=False)  # model text may hold "$"
        ax.axis("off")
    fig.tight_layout()
    return fig


def show_text(image: ImageLike, text: str, title: str | None = None) -> Figure:
    """``image`` with the model's ``text`` (a caption, an answer) below ``title``."""
    return show_images([image], [f"{title}: {text!r}" if title else repr(text)])


def show_depth(image: ImageLike, depth: np.ndarray, cmap: str = "magma") -> Figure:
    """The input beside its depth map (an HxWx3 or HxW map in [0, 1], brighter is farther) in ``cmap``."""
    return show_images([image, np.asarray(draw.grayscale(depth))],
                       ["input", "depth"], cmap=cmap)


def show_normals(image: ImageLike, normals: np.ndarray) -> Figure:
    """The input beside its surface normals (RGB: x, y, z directions mapped to [0, 1])."""
    return show_images([image, normals], ["input", "surface normals"])


def show_boxes(image: ImageLike, boxes: np.ndarray | Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               title: str | None = None) -> Figure:
    """``image`` with each box outlined in its own color and labeled."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    shown = title or f"{len(boxes)} box(es)"
    return show_images([draw.draw_boxes(image, boxes, labels)], [shown])


def show_masks(image: ImageLike, masks: Sequence[np.ndarray], title: str | None = None) -> Figure:
    """``image`` with each mask tinted in its own color; masks of another size (the model's 256x256
    output) are first fitted to the image (:func:`masks_to_image`)."""
    pil = draw.to_pil(image)
    fitted = masks_to_image(masks, (pil.height, pil.width))
    pixels = ", ".join(str(int(m.sum())) for m in fitted) or "no"
    return show_images([draw.overlay_masks(pil, fitted)], [title or f"{len(fitted)} mask(s) of {pixels} pixels"])


def show_pose(image: ImageLike, points: np.ndarray | None, visibility: Sequence[int] | None = None,
              box: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """``image`` with COCO keypoints and the skeleton between them, in the gray ``box`` asked about."""
    shown = title or ("no visible keypoints" if points is None else
                      f"{int(np.sum(np.asarray(visibility) > 0)) if visibility is not None else len(points)} keypoints")
    return show_images([draw.draw_keypoints(image, points, visibility, box)], [shown])


def show_inpainting(image: ImageLike, box: Sequence[float], output: np.ndarray, text: str | None = None) -> Figure:
    """The input with the repainted ``box`` outlined, beside the output fitted to the input's size."""
    pil = draw.to_pil(image)
    fitted = undo_image_preprocessing(np.asarray(output), (pil.height, pil.width), mode="bilinear")
    return show_images([draw.draw_boxes(pil, [box], [text] if text else None), fitted], ["input", "inpainted"])
