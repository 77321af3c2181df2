"""Draw model outputs (boxes, keypoints, masks) onto images with PIL.

Every function takes an image as a PIL image or an HxWx3 (or HxW) array, uint8 or float in
[0, 1], and returns a new RGB :class:`PIL.Image.Image`; the input is never modified.
Coordinates are pixels of that image, ``[x1, y1, x2, y2]`` for boxes and ``(x, y)`` for points.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "COCO_KEYPOINTS", "COCO_SKELETON", "to_pil", "draw_boxes", "draw_keypoints",
           "overlay_masks", "grayscale"]

# Distinct, saturated colors (Tableau 10), cycled for successive boxes and masks.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle")

# Limbs as pairs of COCO keypoint indices.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB copy of ``image`` (PIL, or an HxWx3 / HxW uint8 array or float array in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"expected an HxWx3 or HxW image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float64)), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def grayscale(image: np.ndarray) -> Image.Image:
    """An HxWx3 (or HxW) float image in [0, 1] as an 8-bit grayscale image (channel mean)."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        array = array.mean(axis=-1)
    return Image.fromarray((np.clip(np.nan_to_num(array), 0, 1) * 255).round().astype(np.uint8), mode="L")


def _line_width(image: Image.Image) -> int:
    """A stroke width that stays visible on large images."""
    return max(2, round(max(image.size) / 200))


def _color(i: int, colors: Sequence[tuple[int, int, int]] | None) -> tuple[int, int, int]:
    colors = colors or PALETTE
    return tuple(colors[i % len(colors)])


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int]) -> None:
    """Write ``text`` in white on a ``color`` background just above ``xy`` (below it at the top edge)."""
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x, y = xy[0], xy[1] - h if xy[1] >= h else xy[1]
    draw.rectangle([x, y, x + w, y + h], fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_boxes(image: Image.Image | np.ndarray, boxes: np.ndarray | Sequence[Sequence[float]],
               labels: Sequence[str] | None = None, colors: Sequence[tuple[int, int, int]] | None = None,
               width: int | None = None) -> Image.Image:
    """Outline each ``[x1, y1, x2, y2]`` box (in a color of its own) and write its label, if any."""
    out = to_pil(image)
    draw = ImageDraw.Draw(out)
    width = width or _line_width(out)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        color = _color(i, colors)
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=width)
        if labels is not None and i < len(labels) and labels[i]:
            _label(draw, (min(x1, x2), min(y1, y2)), str(labels[i]), color)
    return out


def draw_keypoints(image: Image.Image | np.ndarray, points: np.ndarray | None,
                   visibility: Sequence[int] | None = None, box: Sequence[float] | None = None,
                   radius: int | None = None) -> Image.Image:
    """Draw COCO keypoints ``points`` [17, 2] (x, y) and the limbs between them.

    Points whose ``visibility`` is 0 (not labeled) are skipped; 1 (occluded) are drawn hollow,
    2 (visible) filled. ``box``, the region the pose was asked for, is outlined in gray.
    """
    out = to_pil(image)
    draw = ImageDraw.Draw(out)
    width = _line_width(out)
    radius = radius or width + 2
    if box is not None:
        draw.rectangle(list(map(float, box)), outline=(160, 160, 160), width=max(1, width // 2))
    if points is None:
        return out
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    shown = np.ones(len(points), bool) if visibility is None else np.asarray(visibility)[:len(points)] > 0
    for a, b in COCO_SKELETON:
        if a < len(points) and b < len(points) and shown[a] and shown[b]:
            draw.line([tuple(points[a]), tuple(points[b])], fill=_color(a, None), width=width)
    for i, (x, y) in enumerate(points):
        if shown[i]:
            filled = visibility is None or visibility[i] >= 2
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 255, 255),
                         fill=_color(i, None) if filled else None, width=max(1, width // 2))
    return out


def overlay_masks(image: Image.Image | np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5,
                  colors: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """Tint the pixels of each boolean HxW mask (the image's size) with a color of its own."""
    out = np.asarray(to_pil(image), dtype=np.float64)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask {i} has shape {mask.shape}, expected the image's {out.shape[:2]}")
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(_color(i, colors), dtype=np.float64)
    return Image.fromarray(out.round().astype(np.uint8))
