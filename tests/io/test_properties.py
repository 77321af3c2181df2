"""Property test of the public API (issue 28): any input is either used or refused clearly.

Random images (dtypes, shapes, values with NaN and infinities, non-arrays), boxes, option lists,
prompts and decoding counts go to ``ModelRunner.run`` and the task methods of the tiny
checkpoint. Every call must return a result, or raise ``ValueError``/``TypeError`` raised by uio's
own code (not from inside torch, numpy or PIL) whose message names one of the call's arguments.

To keep the test short, task methods decode at most 2 text tokens (their post-processing takes
any length), and calls that would generate an image stop once ``run()`` has checked its inputs:
256 image tokens and the VQGAN would take seconds each and check nothing more about inputs.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import uio
from uio import checks

UIO_DIR = Path(uio.__file__).resolve().parent
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class ImageGenerationReached(Exception):
    """A call that passed every check of run() and would now generate an image."""


@pytest.fixture(scope="module")
def runner(conformance):
    from uio.runner import ModelRunner

    runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                         tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False)

    def short_run(input_images, input_texts, output_text_len=128, generate_image=False, **kwargs):
        """What task methods call instead of run(): at most 2 text tokens, no image generation."""
        if generate_image:
            checks.check_run_inputs(input_images, input_texts, output_text_len, generate_image, **kwargs)
            raise ImageGenerationReached
        return ModelRunner.run(runner, input_images, input_texts, min(output_text_len, 2), generate_image, **kwargs)

    runner.run = short_run
    return runner


# ---- strategies ------------------------------------------------------------------------------------
# Each call starts from usable arguments; then one of them (or none) is replaced by anything at all.

DTYPES = [np.uint8, np.uint16, np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.bool_,
          np.complex64]
small_rgb = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12).map(lambda hw: (*hw, 3))
good_images = st.one_of(hnp.arrays(np.uint8, small_rgb), hnp.arrays(np.uint16, small_rgb),
                        hnp.arrays(np.float32, small_rgb, elements=st.floats(0, 1, width=32)))
good_texts = st.one_of(st.text(max_size=20), st.just("big " * 70))  # the long one is warned about, not refused
good_options = st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
                         st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1, max_size=3).map(np.array))
good_counts = st.sampled_from([None, 1, 2])

numbers = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2))
ANYTHING = {
    "image": st.one_of(
        hnp.arrays(st.sampled_from(DTYPES), st.one_of(small_rgb, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))),
        st.none(), st.integers(), st.text(max_size=3), st.just([[[0, 0, 0]]])),
    "text": st.one_of(st.text(max_size=20), st.none(), st.integers(), st.binary(max_size=4), st.lists(st.text())),
    "box": st.one_of(
        st.lists(numbers, min_size=0, max_size=5), st.lists(st.integers(-3, 15), min_size=4, max_size=4),
        hnp.arrays(st.sampled_from([np.float64, np.int64, np.bool_]), st.sampled_from([(4,), (2, 2), (5,), ()])),
        st.none(), st.text(max_size=8)),
    "options": st.one_of(st.lists(st.one_of(st.text(max_size=3), st.integers(), st.none()), max_size=3),
                         st.text(max_size=5), st.integers(), st.just([]), st.just(np.array("cat"))),
    "count": st.one_of(st.integers(-1, 3), st.floats(0, 3), st.booleans(), st.text(max_size=2), st.none()),
    "flag": st.one_of(st.booleans(), st.none(), st.integers(), st.text(max_size=2)),
    "masks": st.lists(hnp.arrays(st.sampled_from([np.bool_, np.uint8, np.float32, np.str_]),
                                 st.sampled_from([(4, 4), (4, 5), (4,), (0, 3)])), max_size=3),
    "texts": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.none(), st.integers()), max_size=3),
                       st.text(max_size=5), st.none()),
}


@st.composite
def good_box(draw, image):
    height, width = image.shape[:2]
    x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
    return [x1, y1, draw(st.integers(x1 + 1, width)), draw(st.integers(y1 + 1, height))]


# Each task method's arguments: (name, kind), positional ones first.
TASK_ARGUMENTS = {
    "caption": [("image", "image"), ("num_decodes", "count")],
    "vqa": [("image", "image"), ("question", "text"), ("num_decodes", "count")],
    "refexp": [("image", "image"), ("expression", "text")],
    "region_caption": [("image", "image"), ("location", "box"), ("num_decodes", "count")],
    "region_classification": [("image", "image"), ("location", "box"), ("answer_options", "options")],
    "image_classification": [("image", "image"), ("answer_options", "options"), ("num_decodes", "count")],
    "pose": [("image", "image"), ("location", "box"), ("beam_search", "flag")],
    "depth": [("image", "image")],
    "image_generation": [("description", "text")],
    "image_inpainting": [("image", "image"), ("location", "box"), ("replace_with", "text")],
    "object_segmentation": [("image", "image"), ("object_name", "text")],
    "segmentation_based_generation": [("binary_masks", "masks"), ("labels", "texts")],
}
RUN_ARGUMENTS = [("input_images", "images"), ("input_texts", "texts"), ("output_text_len", "count"),
                 ("num_decodes", "count"), ("answer_options", "options"), ("mask_regions", "boxes")]


@st.composite
def usable(draw, kind, image):
    """A usable value of ``kind`` (for a call on ``image``)."""
    if kind == "box":
        return draw(good_box(image))
    if kind == "masks":
        shape = draw(st.sampled_from([(4, 4), (6, 3)]))
        return draw(st.lists(hnp.arrays(np.bool_, shape), min_size=1, max_size=3))
    strategy = {"image": st.just(image), "text": good_texts, "texts": st.lists(good_texts, min_size=1, max_size=3),
                "options": good_options, "count": good_counts, "flag": st.sampled_from([None, True])}[kind]
    return draw(strategy)


@st.composite
def task_calls(draw):
    """(method name, keyword arguments): usable ones with one (or none) replaced by anything."""
    name = draw(st.sampled_from(sorted(TASK_ARGUMENTS)))
    image = draw(good_images)
    kwargs = {arg: draw(usable(kind, image)) for arg, kind in TASK_ARGUMENTS[name]}
    if name == "segmentation_based_generation":
        kwargs["labels"] = draw(st.lists(good_texts, min_size=len(kwargs["binary_masks"]),
                                         max_size=len(kwargs["binary_masks"])))
    if kwargs.get("answer_options") is not None:
        kwargs["num_decodes"] = None  # the two together are refused; tried below as a replacement
    replaced = draw(st.sampled_from([None, *TASK_ARGUMENTS[name]]))
    if replaced is not None:
        kwargs[replaced[0]] = draw(ANYTHING[replaced[1]])
    return name, kwargs


@st.composite
def run_calls(draw):
    """Keyword arguments of one run() call: usable ones with one (or none) replaced by anything."""
    images = draw(st.lists(st.one_of(st.none(), good_images), min_size=1, max_size=2))
    kwargs = {"input_images": images, "input_texts": draw(st.lists(good_texts, min_size=len(images),
                                                                  max_size=len(images))),
              "output_text_len": draw(st.integers(1, 2)), "num_decodes": None,
              "answer_options": draw(good_options),
              "mask_regions": draw(st.one_of(st.none(), st.tuples(*[st.none() if image is None else
                                                                    st.one_of(st.none(), good_box(image))
                                                                    for image in images]).map(list)))}
    if kwargs["answer_options"] is None:
        kwargs["num_decodes"] = draw(good_counts)
    replaced = draw(st.sampled_from([None, *RUN_ARGUMENTS]))
    if replaced is not None:
        anything = {"images": st.one_of(st.lists(ANYTHING["image"], max_size=2), ANYTHING["image"]),
                    "boxes": st.one_of(st.lists(st.one_of(st.none(), ANYTHING["box"]), max_size=2), ANYTHING["box"]),
                    "count": st.one_of(ANYTHING["count"], st.just(129))}
        kwargs[replaced[0]] = draw(anything.get(replaced[1], ANYTHING.get(replaced[1])))
    return kwargs


# ---- the property ----------------------------------------------------------------------------------

def assert_used_or_refused_clearly(call, names: list[str]) -> None:
    try:
        result = call()
    except ImageGenerationReached:
        hypothesis.event("accepted (image output: stopped before generating)")
        return
    except (ValueError, TypeError) as err:
        hypothesis.event(f"refused: {type(err).__name__}")
        innermost = Path(traceback.extract_tb(err.__traceback__)[-1].filename).resolve()
        assert innermost.is_relative_to(UIO_DIR), f"raised inside {innermost}, not by uio: {err!r}"
        assert any(name in str(err) for name in names), f"the message names none of {names}: {err}"
        return
    hypothesis.event("accepted and run")
    assert isinstance(result, dict)


@pytest.mark.filterwarnings("ignore::uio.checks.PromptTooLongWarning")
@SETTINGS
@given(call=task_calls())
def test_task_methods_use_or_refuse_any_input(runner, call):
    name, kwargs = call
    assert_used_or_refused_clearly(lambda: getattr(runner, name)(**kwargs), list(kwargs))


@pytest.mark.filterwarnings("ignore::uio.checks.PromptTooLongWarning")
@SETTINGS
@given(kwargs=run_calls())
def test_run_uses_or_refuses_any_input(runner, kwargs):
    from uio.runner import ModelRunner

    assert_used_or_refused_clearly(lambda: ModelRunner.run(runner, **kwargs), list(kwargs))
