"""The tasks Unified-IO was trained on: one table of prompts, output settings and post-processors.

Prompts are the reference's, word for word (the model was trained on them). A task's ``{}`` is
filled with its text argument; region arguments become four location tokens first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import processing

log = logging.getLogger(__name__)

CAPTIONING_PROMPT = "What does the image describe ?"
DEPTH_PROMPT = "What is the depth map of the image ?"
SURFACE_NORMAL_PROMPT = "What is the surface normal of the image ?"
OBJECT_SEGMENTATION = 'What is the segmentation of " {} " ?'
IMAGE_GENERATION = 'What is the complete image? Text: " {} " .'
REFEXP_PROMPT = 'Which region does the text " {} " describe ?'
REGION_CAPTION = 'What does the region " {} " describe ?'
REGION_CLASSIFICATION = 'What is the category of region " {} " ?'
IMAGE_TAGGING = "What is this in the image ?"
IMAGE_INPAINTING = 'Filling the blank region " {} " ?'
POSE_ESTIMATION = 'Find the human joints in the region " {} " .'
SEGMENTATION_BASED_GENERATION = 'What is the complete image? Segmentation color: " {} "'

GEN_SEGMENTATION_COLORS = np.array([
    [255, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [128, 128, 128], [255, 0, 255],
    [255, 255, 0], [0, 255, 255], [192, 192, 192], [128, 0, 0], [128, 128, 0], [0, 128, 0], [0, 128, 128],
    [0, 0, 128], [128, 0, 128]], dtype=np.uint8)
# The first name is "white" although its color is red: kept, since it is what the model saw.
GEN_SEGMENTATION_COLOR_NAMES = ["white", "red", "lime", "blue", "white", "gray", "fuchsia", "yellow", "aqua",
                                "silver", "maroon", "olive", "green", "teal", "navy", "purple"]


@dataclass(frozen=True)
class Task:
    """How one task calls the model and reads its output.

    ``output`` names the post-processor: ``text``, ``image``, ``rescaled_image`` (also resized back
    to the input's size), ``segmentation``, ``boxes`` or ``pose``. ``beam_search=None`` keeps the
    reference's default (beam search for text, sampling for images).
    """

    prompt: str
    output_text_len: int
    generate_image: bool
    output: str
    beam_search: bool | None = None
    lowercase: bool = False


TASKS: dict[str, Task] = {
    "caption": Task(CAPTIONING_PROMPT, 32, False, "text"),
    "vqa": Task("{}", 32, False, "text", lowercase=True),
    "depth": Task(DEPTH_PROMPT, 1, True, "rescaled_image"),
    "surface_normal": Task(SURFACE_NORMAL_PROMPT, 1, True, "rescaled_image"),
    "image_generation": Task(IMAGE_GENERATION, 1, True, "image"),
    "image_inpainting": Task(IMAGE_INPAINTING, 1, True, "image"),
    "object_segmentation": Task(OBJECT_SEGMENTATION, 1, True, "segmentation"),
    "refexp": Task(REFEXP_PROMPT, 32, False, "boxes"),
    "object_localization": Task(REFEXP_PROMPT, 32, False, "boxes"),
    "region_caption": Task(REGION_CAPTION, 32, False, "text"),
    "region_classification": Task(REGION_CLASSIFICATION, 32, False, "text"),
    "image_classification": Task(IMAGE_TAGGING, 32, False, "text"),
    "pose": Task(POSE_ESTIMATION, 128, False, "pose", beam_search=False),
    "segmentation_based_generation": Task(SEGMENTATION_BASED_GENERATION, 1, True, "image"),
}


def region_text(location: Sequence[float], image: np.ndarray, extra: str | None = None) -> str:
    """A box [x1, y1, x2, y2] in pixels of ``image`` as its four location tokens (+ ``extra``)."""
    height, width = image.shape[:2]
    words = list(processing.region_to_tokens(location, width, height))
    if extra is not None:
        words.append(extra)
    return " ".join(words)


def build_prompt(task: Task, text: str | None = None) -> str:
    """Fill the task's template with ``text``."""
    prompt = task.prompt.replace("{}", text) if "{}" in task.prompt else task.prompt
    return prompt.lower() if task.lowercase else prompt


def segmentation_input(binary_masks: Sequence[np.ndarray], labels: Sequence[str]) -> tuple[np.ndarray, str]:
    """Paint each mask in its color and name the colors, as segmentation-based generation expects."""
    if not 0 < len(binary_masks) <= len(GEN_SEGMENTATION_COLOR_NAMES):
        raise ValueError(f"binary_masks: segmentation_based_generation takes 1 to "
                         f"{len(GEN_SEGMENTATION_COLOR_NAMES)} masks, got {len(binary_masks)}")
    if len(binary_masks) != len(labels):
        raise ValueError(f"got {len(binary_masks)} binary_masks but {len(labels)} labels; give one label per mask")
    masks = [np.asarray(m, dtype=bool) for m in binary_masks]
    if any(m.ndim != 2 or m.shape != masks[0].shape for m in masks):
        raise ValueError("binary masks must all be 2-D boolean arrays of the same height and width")
    image = np.zeros(masks[0].shape + (3,), dtype=np.uint8)
    for color, mask in zip(GEN_SEGMENTATION_COLORS, masks):
        image[mask] = color
    text = " , ".join(f"{label} : {name}" for label, name in zip(labels, GEN_SEGMENTATION_COLOR_NAMES))
    return image, text.lower()


def _per_decode(value: Any, fn: Callable[[Any], Any], many: bool) -> Any:
    """Apply ``fn`` to the single output, or to each of the ``num_decodes`` outputs."""
    return [fn(v) for v in value] if many else fn(value)


def _parse_regions(tokens: np.ndarray, image_size: tuple[int, int]) -> tuple[list, np.ndarray]:
    """Labels and boxes in ``tokens``; none (with a warning) when the output is not well formed.

    The reference raised a bare ValueError here, losing the rest of the output.
    """
    try:
        return processing.tokens_to_regions(tokens, image_size)
    except ValueError as err:
        log.warning("the model's output is not a list of boxes, returning none: %.120s", err)
        return [], np.zeros((0, 4))


def _parse_keypoints(tokens: np.ndarray, tokenizer, image_size: tuple[int, int]) -> tuple:
    """``(points, labels, invalid)``; ``(None, None, True)`` when the output is not keypoints."""
    try:
        return processing.extract_keypoints(tokens, tokenizer, image_size)
    except ValueError as err:
        log.warning("the model's output is not a list of keypoints, returning none: %.120s", err)
        return None, None, True


def postprocess(task: Task, out: dict, image: np.ndarray | None, tokenizer, many: bool) -> dict:
    """Turn :meth:`ModelRunner.run` output for one example into the task's result dict."""
    kind = task.output
    if kind == "text":
        return {"text": out["text"][0], "score": out["score"][0]}
    if kind == "image":
        return {"image": out["image"][0], "score": out["score"][0]}
    if kind == "rescaled_image":
        rescaled = _per_decode(out["image"][0], lambda im: processing.undo_image_preprocessing(
            im, image.shape[:2]), many)
        return {"image": out["image"][0], "rescaled_image": rescaled, "score": out["score"][0]}
    if kind == "segmentation":
        masks = _per_decode(out["image"][0], processing.extract_segmentation_masks, many)
        return {"mask": masks, "image": out["image"][0], "score": out["score"][0]}
    tokens = out["text_tokens"][0]
    if kind == "boxes":
        regions = [_parse_regions(row, image.shape[:2]) for row in tokens]
        boxes = regions[0][1] if len(tokens) == 1 else [r[1] for r in regions]
        labels = regions[0][0] if len(tokens) == 1 else [r[0] for r in regions]
        return {"boxes": boxes, "labels": labels, "text": out["text"], "score": out["score"],
                "text_tokens": out["text_tokens"]}
    if kind == "pose":
        found = [_parse_keypoints(row, tokenizer, image.shape[:2]) for row in tokens]
        points, labels, invalid = found[0] if len(tokens) == 1 else (list(x) for x in zip(*found))
        return {"points": points, "labels": labels, "invalid": invalid, "score": out["score"],
                "text_tokens": out["text_tokens"]}
    raise ValueError(f"unknown task output kind {kind!r}")
