"""The public API refuses bad inputs before any work, naming the argument (issue 28, item 6)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from uio import checks

IMAGE = np.zeros((24, 32, 3), np.uint8)


@pytest.fixture(scope="module")
def runner(conformance):
    from uio.runner import ModelRunner

    return ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                       tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False)


@pytest.fixture
def no_work(runner, monkeypatch):
    """The runner, made to fail loudly if a call gets as far as encoding its inputs."""
    def encode(*args, **kwargs):
        raise AssertionError("the model was run before the inputs were refused")

    monkeypatch.setattr(runner, "_encode", encode)
    return runner


BAD_CALLS = [
    # (call, exception, words the message must hold)
    (lambda r: r.vqa(np.full((8, 8, 3), 200.0), "q"), ValueError, r"image has values from 200 to 200; .*\[0, 1\]"),
    (lambda r: r.caption(np.full((8, 8, 3), np.nan)), ValueError, "image holds NaN"),
    (lambda r: r.caption(np.full((8, 8, 3), np.inf, np.float32)), ValueError, "image holds NaN or infinite"),
    (lambda r: r.caption(np.zeros((8, 8, 3), np.int64)), TypeError, "image has dtype int64"),
    (lambda r: r.caption(np.zeros((8, 8, 3), bool)), TypeError, "image has dtype bool"),
    (lambda r: r.caption(np.zeros((8, 8))), ValueError, "image has shape .*grey"),
    (lambda r: r.caption(np.zeros((8, 8, 4), np.uint8)), ValueError, r"image must have shape .*image\[..., :3\]"),
    (lambda r: r.caption(np.zeros((0, 8, 3), np.uint8)), ValueError, "image is empty"),
    (lambda r: r.caption([[[0, 0, 0]]]), TypeError, "image must be an HxWx3 numpy array, got list"),
    (lambda r: r.vqa(None, "q"), TypeError, "image must be an HxWx3 numpy array, got None"),
    (lambda r: r.vqa(IMAGE, None), TypeError, "question must be a string, got None"),
    (lambda r: r.vqa(IMAGE, 3), TypeError, "question must be a string, got int"),
    (lambda r: r.refexp(IMAGE, b"cat"), TypeError, "expression must be a string"),
    (lambda r: r.image_generation(None), TypeError, "description must be a string"),
    (lambda r: r.image_inpainting(IMAGE, [1, 1, 5, 5], None), TypeError, "replace_with must be a string"),
    (lambda r: r.object_segmentation(IMAGE, ["cat"]), TypeError, "object_name must be a string"),
    (lambda r: r.image_classification(IMAGE, answer_options="cat"), TypeError,
     "answer_options must be a sequence of strings, got the single string 'cat'"),
    (lambda r: r.image_classification(IMAGE, answer_options=[]), ValueError, "answer_options is empty"),
    (lambda r: r.image_classification(IMAGE, answer_options=["a", 2]), TypeError,
     r"answer_options\[1\] is int; options must all be strings"),
    (lambda r: r.image_classification(IMAGE, answer_options=np.array([["a", "b"]])), ValueError,
     "answer_options must be a 1-D array of strings"),
    (lambda r: r.image_classification(IMAGE, answer_options=np.array("cat")), TypeError, "the single string 'cat'"),
    (lambda r: r.image_classification(IMAGE, answer_options=[np.zeros((4, 4, 3), np.float32) + 9]), ValueError,
     r"answer_options\[0\] has values from 9 to 9"),
    (lambda r: r.caption(IMAGE, num_decodes=1.5), TypeError, "num_decodes must be a positive integer"),
    (lambda r: r.caption(IMAGE, num_decodes=0), ValueError, "num_decodes must be at least 1"),
    (lambda r: r.caption(IMAGE, num_decodes=True), TypeError, "num_decodes must be a positive integer"),
    (lambda r: r.caption(IMAGE, beam_search="yes"), TypeError, "beam_search must be True or False"),
    (lambda r: r.run([IMAGE], ["q"], output_text_len=2.5), TypeError, "output_text_len must be a positive integer"),
    (lambda r: r.run([IMAGE], "q"), TypeError, "input_texts must be a sequence of strings, got the string 'q'"),
    (lambda r: r.run(IMAGE, ["q"]), TypeError, r"input_images must be a sequence of images.*pass \[image\]"),
    (lambda r: r.run([IMAGE], [None]), TypeError, r"input_texts\[0\] must be a string"),
    (lambda r: r.region_caption(IMAGE, [-1, 0, 10, 10]), ValueError,
     "location -1 0 10 10 is not inside the 32x24 image"),
    (lambda r: r.region_caption(IMAGE, [0, 0, 33, 10]), ValueError, "not inside the 32x24 image"),
    (lambda r: r.pose(IMAGE, [10, 0, 5, 10]), ValueError, "location 10 0 5 10: need x1 < x2 and y1 < y2"),
    (lambda r: r.region_classification(IMAGE, [0, 0, np.nan, 10]), ValueError, "coordinates must be finite"),
    (lambda r: r.region_caption(IMAGE, [0, 0, 10]), ValueError, "location must be 4 numbers .*got 3 values"),
    (lambda r: r.region_caption(IMAGE, "0 0 5 5"), TypeError, "location must be 4 numbers"),
    (lambda r: r.region_caption(IMAGE, [0, 0, "5", 5]), TypeError, "location must be 4 numbers"),
    (lambda r: r.image_inpainting(IMAGE, [0, 0, 99, 5], "x"), ValueError, "location 0 0 99 5 is not inside"),
    (lambda r: r.run([IMAGE], ["q"], mask_regions=[[0, 0, 99, 5]]), ValueError,
     r"mask_regions\[0\] 0 0 99 5 is not inside"),
    (lambda r: r.segmentation_based_generation([np.ones((4, 4))], [None]), TypeError,
     r"labels\[0\] must be a string"),
    (lambda r: r.segmentation_based_generation([np.array([["a"]])], ["x"]), TypeError,
     r"binary_masks\[0\] must be an HxW numpy array of booleans or numbers"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_inputs_are_refused_before_work_naming_the_argument(no_work, call, error, message):
    with pytest.raises(error, match=message):
        call(no_work)


def test_numpy_string_options_are_scored_as_the_list(runner):
    as_list = runner.image_classification(IMAGE, answer_options=["cat", "dog"])
    as_array = runner.image_classification(IMAGE, answer_options=np.array(["cat", "dog"]))
    assert as_array["text"] == as_list["text"]
    np.testing.assert_allclose(as_array["score"], as_list["score"])


def test_uint16_images_are_scaled_like_16_bit_files(runner):
    wide = np.arange(24 * 32 * 3, dtype=np.uint16).reshape(24, 32, 3) * 20
    narrow = np.round(wide / 257).astype(np.uint8)
    np.testing.assert_array_equal(checks.check_image(wide), narrow)
    out_wide = runner.run([wide], ["what is this ?"], output_text_len=3)
    out_narrow = runner.run([narrow], ["what is this ?"], output_text_len=3)
    np.testing.assert_array_equal(out_wide["text_tokens"], out_narrow["text_tokens"])


def test_float_images_in_0_1_and_boxes_on_the_edge_are_accepted():
    image = np.linspace(0, 1, 24 * 32 * 3).reshape(24, 32, 3)
    assert checks.check_image(image) is image
    assert checks.check_box(np.array([0, 0, 32, 24]), image) == [0.0, 0.0, 32.0, 24.0]


def test_long_prompts_are_warned_about_naming_the_limit(runner):
    prompt = "what is " + "very " * 80 + "big ?"
    with pytest.warns(checks.PromptTooLongWarning, match=r"input_texts\[0\] is \d+ tokens, over max_input_len=64"):
        runner.run([IMAGE], [prompt], output_text_len=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checks.PromptTooLongWarning)
        runner.run([IMAGE], ["what is this ?"], output_text_len=2)


def test_long_text_options_are_warned_about(runner):
    with pytest.warns(checks.PromptTooLongWarning, match=r"answer_options\[1\] is \d+ tokens"):
        runner.image_classification(IMAGE, answer_options=["cat", "big " * 70])
    assert checks.long_prompts(runner.tokenizer, ["a b c", "d " * 70], 64) == [
        (1, len(runner.tokenizer.encode("d " * 70)))]


def test_torch_tensors_are_taken_as_arrays():
    import torch

    np.testing.assert_array_equal(checks.check_image(torch.zeros(4, 5, 3, dtype=torch.uint8)), np.zeros((4, 5, 3)))
    assert checks.check_image(torch.ones(4, 5, 3, dtype=torch.bfloat16)).dtype == np.float32
    with pytest.raises(ValueError, match="image has values from 2 to 2"):
        checks.check_image(torch.full((4, 5, 3), 2.0))
