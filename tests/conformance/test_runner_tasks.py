"""Every task of the public runner against the reference's runner on the tiny checkpoint, with
acceleration on and off (tests/conformance/conftest.py).

The reference sampled for image tasks and pose; its goldens were made with beam search instead
(runner.json ``sampling_forced_to_beam_search``), which our task methods take as an argument.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

SCORE_ATOL = 1e-2
IMAGE_ATOL = 1e-4
# Tests of the shared runner run on each device; a GPU's run of the suite checks it against the goldens.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.fixture(scope="module", params=DEVICES)
def runner(accel_mode, tiny_runner_options, request):
    """The tiny checkpoint's runner on each device, built on the module's path (accelerated or reference)."""
    from uio.runner import ModelRunner

    return ModelRunner.from_pretrained(**{**tiny_runner_options, "device": request.param})


@pytest.fixture(scope="module")
def calls(runner):
    """Record every run() call made by a task method: (kwargs, result)."""
    recorded = []
    original = runner.run

    def recording_run(*args, **kwargs):
        result = original(*args, **kwargs)
        recorded.append((args, kwargs, result))
        return result

    runner.run = recording_run
    yield recorded
    runner.run = original


def task_args(name, spec, npz, image):
    args = spec["args"]
    table = {
        "caption": ((image,), {}), "vqa": ((image, args.get("question")), {}),
        "refexp": ((image, args.get("expression")), {}),
        "region_caption": ((image, args.get("location")), {}),
        "region_classification": ((image, args.get("location")), {"answer_options": args.get("options")}),
        "image_classification": ((image,), {"answer_options": args.get("options")}),
        "depth": ((image,), {}), "surface_normal": ((image,), {}),
        "image_generation": ((args.get("description"),), {}),
        "image_inpainting": ((image, args.get("location"), args.get("replace_with")), {}),
        "object_segmentation": ((image, args.get("object_name")), {}),
        "pose": ((image, args.get("location")), {}),
        "segmentation_based_generation": (
            ([npz[f"{name}/args/binary_masks/{i}"] for i in range(len(args.get("labels", [])))],
             args.get("labels")), {}),
    }
    method = name.split("_num_decodes")[0].split("_options")[0]
    positional, keywords = table[method]
    keywords = {k: v for k, v in keywords.items() if v is not None}
    run = spec["runs"][0]
    if run["num_decodes"] is not None:
        keywords["num_decodes"] = run["num_decodes"]
    if run["sampling_forced_to_beam_search"] or run["beam_search_requested"]:
        keywords["beam_search"] = True
    return method, positional, keywords


TASK_CASES = ["caption", "vqa", "vqa_num_decodes2", "refexp", "region_caption", "region_classification",
              "region_classification_options", "image_classification_options", "depth", "surface_normal",
              "image_generation", "image_inpainting", "object_segmentation", "pose",
              "segmentation_based_generation"]


@pytest.mark.parametrize("name", TASK_CASES)
def test_task_matches_reference(runner, calls, golden, test_image, name):
    spec, npz = golden("runner.json")[name], golden("runner.npz")
    method, positional, keywords = task_args(name, spec, npz, test_image)
    calls.clear()
    out = getattr(runner, method)(*positional, **keywords)
    (_, run_kwargs, raw), = calls
    golden_run = spec["runs"][0]
    assert run_kwargs["output_text_len"] == golden_run["output_text_len"]
    assert run_kwargs["generate_image"] == golden_run["generate_image"]
    prefix = f"{name}/run0"
    np.testing.assert_array_equal(
        runner.tokenizer([golden_run["input_texts"][0]], max_length=64, truncation=True),
        npz[f"{prefix}/inputs/text_encoder_inputs"])
    for field in ("text_tokens", "image_tokens"):
        if f"{prefix}/raw/{field}" in npz:
            np.testing.assert_array_equal(raw[field], npz[f"{prefix}/raw/{field}"])
    if f"{prefix}/raw/score" in npz:
        np.testing.assert_allclose(raw["score"], npz[f"{prefix}/raw/score"], atol=SCORE_ATOL, rtol=0)
    if f"{prefix}/raw/all_scores" in npz:
        np.testing.assert_allclose(raw["all_scores"], npz[f"{prefix}/raw/all_scores"], atol=SCORE_ATOL, rtol=1e-4)
    if golden_run.get("raw_text") is not None and raw["text"] is not None:
        assert raw["text"] == golden_run["raw_text"] or raw["text"] == [golden_run["raw_text"]]
    if spec["status"] == "raised":
        # The reference crashed parsing this garbage output; we return it with no boxes/points.
        assert len(out.get("boxes", [])) == 0 and out.get("points") is None
        return
    check_fields(spec, npz, name, out)


def check_fields(spec, npz, name, out):
    for field, described in spec["fields"].items():
        key = f"{name}/out/{field}"
        if field == "text":
            assert out["text"] == described
        elif field == "mask":
            count = len([k for k in npz if k.startswith(key + "/")])
            assert len(out["mask"]) == count
            for i in range(count):
                np.testing.assert_array_equal(out["mask"][i], npz[f"{key}/{i}"])
        elif field == "score":
            np.testing.assert_allclose(np.ravel(out["score"]), np.ravel(npz[key]), atol=SCORE_ATOL, rtol=0)
        else:
            np.testing.assert_allclose(out[field], npz[key], atol=IMAGE_ATOL, rtol=1e-4)


def test_run_with_image_answer_options(runner, golden, test_image):
    from uio.runner import DEPTH_PROMPT

    npz = golden("runner.npz")
    options = [npz[f"run_image_answer_options/args/option_images/{i}"] for i in range(3)]
    out = runner.run([test_image], [DEPTH_PROMPT], output_text_len=1, generate_image=True, answer_options=options)
    assert out["text_tokens"] is None and out["text"] is None and out["image_tokens"] is None
    for field in ("image", "score", "all_scores"):
        np.testing.assert_allclose(out[field], npz[f"run_image_answer_options/out/{field}"], atol=SCORE_ATOL, rtol=1e-4)


def test_object_localization_is_refexp_by_another_name(runner, golden, test_image):
    """The reference asks both with the same prompt and reads boxes the same way."""
    expression = golden("runner.json")["refexp"]["args"]["expression"]
    np.testing.assert_equal(runner.object_localization(test_image, expression), runner.refexp(test_image, expression))
