"""Describe task results for people and programs: a JSON record, text lines and images.

Shared by the front ends: the CLI prints the lines (or the record with ``--json``) and saves the
images to files, the server returns the record with its images as base64 PNG, batch jobs write
the record and the images. A result is shown in one of the ways :attr:`uio.tasks.Task.shows`
names; images are drawn at the input image's size (boxes, keypoints, masks, depth...) or 256x256
(generated images).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from . import draw

# A decode shown: its record fields, its text lines, and its image (None for text results).
Shown = tuple[dict, list[str], "Image.Image | None"]


@dataclass(frozen=True)
class Context:
    """What describing a result needs besides the result: the input image, the vocabulary, the box."""

    image: np.ndarray | None
    tokenizer: Any = None
    box: Sequence[float] | None = None


_PER_DECODE = {"text": ("text",), "image": ("image", "text"), "rescaled": ("image", "rescaled_image"),
               "gray": ("image", "rescaled_image"), "masks": ("mask",), "boxes": ("boxes", "labels"),
               "pose": ("points", "labels", "invalid")}
SPATIAL_OUTPUTS = tuple(kind for kind in _PER_DECODE if kind != "text")


def split_decodes(result: Mapping[str, Any], output: str, num_decodes: int | None) -> list[dict]:
    """One dict per decode (best score first) holding that decode's fields and its ``score``."""
    scores = np.ravel(result["score"])
    keys = [key for key in _PER_DECODE[output] if result.get(key) is not None]
    if num_decodes is None:
        return [{**{key: result[key] for key in keys}, "score": float(scores[0])}]
    decodes = [{**{key: result[key][i] for key in keys}, "score": float(score)} for i, score in enumerate(scores)]
    return sorted(decodes, key=lambda decode: -decode["score"])


def _to_input_size(image: np.ndarray, ctx: Context, mode: str = "bilinear") -> np.ndarray:
    """A generated (padded, square) image cropped and resized back to the input image's size."""
    from .processing import undo_image_preprocessing

    return undo_image_preprocessing(image, ctx.image.shape[:2], mode=mode)


def _show_text(decode: dict, ctx: Context) -> Shown:
    return {"text": decode["text"]}, [decode["text"]], None


def _show_image(decode: dict, ctx: Context) -> Shown:
    text = decode.get("text")
    record, lines = ({"text": text}, [text]) if text else ({}, [])
    return record, lines, draw.to_pil(decode["image"])


def _rescaled(decode: dict, ctx: Context) -> np.ndarray:
    return decode["rescaled_image"] if "rescaled_image" in decode else _to_input_size(decode["image"], ctx)


def _show_rescaled(decode: dict, ctx: Context) -> Shown:
    return {}, [], draw.to_pil(_rescaled(decode, ctx))


def _show_gray(decode: dict, ctx: Context) -> Shown:
    return {}, [], draw.grayscale(_rescaled(decode, ctx))


def fit_masks(masks: Sequence[np.ndarray], image_shape: Sequence[int]) -> list[np.ndarray]:
    """Generated (square, padded) masks cropped and resized (nearest) to an image of ``image_shape`` (h, w, ...)."""
    from .processing import undo_image_preprocessing

    return [undo_image_preprocessing(np.asarray(m, np.float32)[..., None], tuple(image_shape)[:2], mode="nearest")
            [..., 0] > 0.5 for m in masks]


def region_labels(labels: Sequence[Sequence[int]], tokenizer) -> list[str]:
    """The label token ids of each box (``result["labels"]`` of refexp/localization) as text."""
    return [tokenizer.decode(np.asarray(ids).tolist()).strip() for ids in labels]


def _show_masks(decode: dict, ctx: Context) -> Shown:
    masks = fit_masks(decode["mask"], ctx.image.shape)
    pixels = [int(m.sum()) for m in masks]
    return {"masks": len(masks), "mask_pixels": pixels}, [
        f"{len(masks)} mask(s) of {', '.join(map(str, pixels)) or 'no'} pixels"], draw.overlay_masks(ctx.image, masks)


def _show_boxes(decode: dict, ctx: Context) -> Shown:
    boxes = np.asarray(decode["boxes"], dtype=np.float64).reshape(-1, 4)
    labels = region_labels(decode.get("labels", []), ctx.tokenizer)
    found = [" ".join(f"{v:.1f}" for v in box) + (f"  {label}" if label else "")
             for box, label in zip(boxes, labels + [""] * len(boxes))]
    return ({"boxes": boxes.round(2).tolist(), "labels": labels}, found or ["no boxes found"],
            draw.draw_boxes(ctx.image, boxes, labels))


def _show_pose(decode: dict, ctx: Context) -> Shown:
    points, visibility = decode.get("points"), decode.get("labels")
    keypoints = [] if points is None else [
        {"name": name, "x": round(float(x), 2), "y": round(float(y), 2), "visibility": int(v)}
        for name, (x, y), v in zip(draw.COCO_KEYPOINTS, np.asarray(points), visibility)]
    shown = [f"{k['name']:<15} {k['x']:7.1f} {k['y']:7.1f}  {'visible' if k['visibility'] == 2 else 'occluded'}"
             for k in keypoints if k["visibility"] > 0]
    if decode.get("invalid"):
        shown.append("(the model's output was not well-formed keypoints)")
    return ({"keypoints": keypoints, "invalid": bool(decode.get("invalid"))}, shown or ["no visible keypoints"],
            draw.draw_keypoints(ctx.image, points, visibility, ctx.box))


SHOW: dict[str, Callable[[dict, Context], Shown]] = {
    "text": _show_text, "image": _show_image, "rescaled": _show_rescaled, "gray": _show_gray,
    "masks": _show_masks, "boxes": _show_boxes, "pose": _show_pose}


def numbered(name: str, index: int, count: int) -> str:
    """``out.png`` for a single decode; ``out-1.png``, ``out-2.png``... for several."""
    if count == 1:
        return name
    path = PurePath(name)
    return str(path.with_name(f"{path.stem}-{index + 1}{path.suffix}"))


def describe(command: str, output: str, result: Mapping[str, Any], ctx: Context, num_decodes: int | None,
             image_name: str = "output.png") -> tuple[dict, list[str], dict[str, Image.Image]]:
    """The JSON record of a task result (its best decode, plus ``decodes`` with ``num_decodes``),
    its text lines, and its images by name (``image_name``, numbered when there are several)."""
    decodes = split_decodes(result, output, num_decodes)
    records, lines, images = [], [], {}
    for i, decode in enumerate(decodes):
        record, shown, picture = SHOW[output](decode, ctx)
        if picture is not None:
            name = numbered(image_name, i, len(decodes))
            images[name] = picture
            record = {**record, "output": name, "width": picture.width, "height": picture.height}
            shown = [*shown, f"wrote {name} ({picture.width}x{picture.height})"]
        records.append({**record, "score": decode["score"]})
        lines += shown if len(decodes) == 1 else [f"#{i + 1} score {decode['score']:.4f}", *(f"  {s}" for s in shown)]
    record = {"command": command, **records[0]}
    if num_decodes is not None:
        record["decodes"] = records
    return record, lines, images
