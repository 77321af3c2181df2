"""The tasks Unified-IO was trained on: one table of prompts, inputs, output settings and post-processors.

Each :data:`TASKS` entry says everything about a task: the prompt, the inputs it takes (read by
the CLI's sub-commands, the server's endpoints and batch jobs), how the model is run, and how its
output is post-processed and shown. :class:`~uio.runner.ModelRunner` has one method per entry.

Prompts are the reference's, word for word (the model was trained on them). A task's ``{}`` is
filled with its text argument; region arguments become four location tokens first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import checks

# uio.processing (and with it torch) is imported where used: the CLI reads this table for --help.

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
class Arg:
    """One input of a task.

    ``kind`` says what it is: ``image`` (an image), ``text`` (one string), ``box`` (X1 Y1 X2 Y2
    pixels of the image), ``options`` (answers to choose from), ``masks`` (mask images and their
    ``labels``), ``integer`` or ``flag`` (true/false). ``keyword`` is the
    :class:`~uio.runner.ModelRunner` method's parameter it fills; ``metavar`` and ``help``
    describe it on the command line; an ``optional`` one may be left out (None).
    """

    kind: str
    keyword: str
    metavar: str = ""
    help: str = ""
    optional: bool = False


IMAGE = Arg("image", "image", "IMAGE", "input image file")
BOX = Arg("box", "location", help="the region, in pixels of IMAGE")
OPTIONS = Arg("options", "answer_options", help="comma-separated answers to choose from (scored by loss)",
              optional=True)
MASKS = Arg("masks", "binary_masks", "MASK", "mask images (white = the region)")


@dataclass(frozen=True)
class Task:
    """A task: how to call the model, read its output and show it.

    ``output`` names the post-processor: ``text``, ``image``, ``rescaled_image`` (also resized back
    to the input's size), ``segmentation``, ``boxes`` or ``pose``. ``beam_search=None`` keeps the
    reference's default (beam search for text, sampling for images). ``command`` is the CLI's
    sub-command, ``args`` the inputs in the method's order, and ``shows`` how a result is shown:
    ``text``; ``image`` (a generated 256x256 image); ``rescaled`` (a generated image brought back
    to the input's size); ``gray`` (the same, as grayscale); ``masks``, ``boxes`` or ``pose``
    (drawn onto the input image). ``hides_box``: the box's pixels are hidden from the model.
    """

    prompt: str
    output_text_len: int
    generate_image: bool
    output: str
    beam_search: bool | None = None
    lowercase: bool = False
    command: str = ""
    help: str = ""
    args: tuple[Arg, ...] = ()
    shows: str = "text"
    hides_box: bool = False


TASKS: dict[str, Task] = {
    "caption": Task(CAPTIONING_PROMPT, 32, False, "text", command="caption", help="describe an image",
                    args=(IMAGE,)),
    "vqa": Task("{}", 32, False, "text", lowercase=True, command="vqa", help="answer a question about an image",
                args=(IMAGE, Arg("text", "question", "QUESTION"))),
    "depth": Task(DEPTH_PROMPT, 1, True, "rescaled_image", command="depth",
                  help="estimate depth; saves a grayscale PNG of the input's size", args=(IMAGE,), shows="gray"),
    "surface_normal": Task(SURFACE_NORMAL_PROMPT, 1, True, "rescaled_image", command="surface-normal",
                           help="estimate surface normals; saves an RGB PNG", args=(IMAGE,), shows="rescaled"),
    "image_generation": Task(IMAGE_GENERATION, 1, True, "image", command="generate",
                             help="generate a 256x256 image from a description",
                             args=(Arg("text", "description", "DESCRIPTION"),), shows="image"),
    "image_inpainting": Task(IMAGE_INPAINTING, 1, True, "image", command="inpaint",
                             help="repaint a box of an image with a description",
                             args=(IMAGE, BOX, Arg("text", "replace_with", "REPLACEMENT")), shows="rescaled",
                             hides_box=True),
    "object_segmentation": Task(OBJECT_SEGMENTATION, 1, True, "segmentation", command="segment",
                                help="segment every instance of an object; draws the masks",
                                args=(IMAGE, Arg("text", "object_name", "OBJECT")), shows="masks"),
    "refexp": Task(REFEXP_PROMPT, 32, False, "boxes", command="refexp",
                   help="find the region a referring expression describes; draws the box",
                   args=(IMAGE, Arg("text", "expression", "EXPRESSION")), shows="boxes"),
    "object_localization": Task(REFEXP_PROMPT, 32, False, "boxes", command="locate",
                                help="find every instance of an object; draws the boxes",
                                args=(IMAGE, Arg("text", "object_name", "OBJECT")), shows="boxes"),
    "region_caption": Task(REGION_CAPTION, 32, False, "text", command="region-caption",
                           help="describe a region of an image", args=(IMAGE, BOX)),
    "region_classification": Task(REGION_CLASSIFICATION, 32, False, "text", command="region-classify",
                                  help="name the object in a region", args=(IMAGE, BOX, OPTIONS)),
    "image_classification": Task(IMAGE_TAGGING, 32, False, "text", command="classify",
                                 help="name what the image shows", args=(IMAGE, OPTIONS)),
    "pose": Task(POSE_ESTIMATION, 128, False, "pose", beam_search=False, command="pose",
                 help="find the joints of the person in a region; draws the skeleton", args=(IMAGE, BOX),
                 shows="pose"),
    "segmentation_based_generation": Task(
        SEGMENTATION_BASED_GENERATION, 1, True, "image", command="seg-generate",
        help="generate an image whose regions (mask files) show the given labels", args=(MASKS,), shows="image"),
}


@dataclass(frozen=True)
class ModelCall:
    """One example's :meth:`~uio.runner.ModelRunner.run` inputs, and the image its outputs refer to."""

    image: np.ndarray | None
    prompt: str
    output_text_len: int
    generate_image: bool
    beam_search: bool | None = None
    num_decodes: int | None = None
    answer_options: Sequence[str] | None = None
    mask_region: Sequence[float] | None = None
    original: np.ndarray | None = None

    def run_arguments(self) -> dict:
        """Keyword arguments of ``ModelRunner.run`` for this example alone."""
        return {"input_images": [self.image], "input_texts": [self.prompt], "output_text_len": self.output_text_len,
                "generate_image": self.generate_image, "beam_search": self.beam_search,
                "num_decodes": self.num_decodes, "answer_options": self.answer_options,
                "mask_regions": None if self.mask_region is None else [self.mask_region]}


def model_call(name: str, inputs: Mapping[str, Any], num_decodes: int | None = None,
               beam_search: bool | None = None) -> ModelCall:
    """How task ``name`` runs the model on ``inputs`` (its method's keyword arguments)."""
    task = TASKS[name]
    kinds = {arg.kind: arg for arg in task.args}
    image = checks.check_image(inputs.get("image")) if "image" in kinds else None
    text = checks.check_text(inputs.get(kinds["text"].keyword), kinds["text"].keyword) if "text" in kinds else None
    box = checks.check_box(inputs.get("location"), image) if "box" in kinds else None
    if box is not None:
        text = region_text(box, image, text)
    if "masks" in kinds:
        image, text = segmentation_input(checks.check_masks(inputs.get("binary_masks")),
                                         checks.check_texts(inputs.get("labels"), "labels"))
    return ModelCall(image, build_prompt(task, text), task.output_text_len, task.generate_image,
                     task.beam_search if beam_search is None else beam_search, num_decodes,
                     inputs.get("answer_options") if "options" in kinds else None,
                     box if task.hides_box else None, image)


def region_text(location: Sequence[float], image: np.ndarray, extra: str | None = None) -> str:
    """A box [x1, y1, x2, y2] in pixels of ``image`` as its four location tokens (+ ``extra``)."""
    from . import processing

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
        raise ValueError(f"segmentation_based_generation takes 1 to {len(GEN_SEGMENTATION_COLOR_NAMES)} masks, "
                         f"got {len(binary_masks)}")
    if len(binary_masks) != len(labels):
        raise ValueError(f"got {len(binary_masks)} masks but {len(labels)} labels")
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
    from . import processing

    try:
        return processing.tokens_to_regions(tokens, image_size)
    except ValueError as err:
        log.warning("the model's output is not a list of boxes, returning none: %.120s", err)
        return [], np.zeros((0, 4))


def _parse_keypoints(tokens: np.ndarray, tokenizer, image_size: tuple[int, int]) -> tuple:
    """``(points, labels, invalid)``; ``(None, None, True)`` when the output is not keypoints."""
    from . import processing

    try:
        return processing.extract_keypoints(tokens, tokenizer, image_size)
    except ValueError as err:
        log.warning("the model's output is not a list of keypoints, returning none: %.120s", err)
        return None, None, True


def postprocess(task: Task, out: dict, image: np.ndarray | None, tokenizer, many: bool) -> dict:
    """Turn :meth:`ModelRunner.run` output for one example into the task's result dict."""
    from . import processing

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


def task_result(name: str, call: ModelCall, out: dict, tokenizer) -> dict:
    """Task ``name``'s result for ``call``, from :meth:`~uio.runner.ModelRunner.run`'s output for it alone."""
    return postprocess(TASKS[name], out, call.original, tokenizer, many=call.num_decodes is not None)
