"""Requests grouped into shared run() calls give each request its result alone (tiny checkpoint)."""
from __future__ import annotations

import numpy as np
import pytest

from uio.requests import RUN, TaskRequest, render, run_requests
from uio.runner import ModelRunner
from uio.tasks import TASKS


@pytest.fixture(scope="module")
def images(test_image) -> list[np.ndarray]:
    """Three images of different shapes (so different padding) from the 640x480 test image."""
    return [test_image, test_image[40:360, 100:300], test_image[::2, ::3].copy()]


def _masks(image: np.ndarray) -> list[np.ndarray]:
    left = np.zeros(image.shape[:2], bool)
    left[:, : image.shape[1] // 2] = True
    return [left, ~left]


def _inputs(name: str, image: np.ndarray, i: int) -> dict:
    """Inputs for task ``name``; prompts of different lengths per ``i`` so batches pad them."""
    text = ["a car", "the big red car on the left of the street", "sofa"][i % 3]
    box = [10.0 + 5 * i, 20.0, image.shape[1] - 30.0, image.shape[0] - 10.0 * i - 5]
    values = {"image": image, "location": box, "answer_options": ["cat", "dog", "bus"],
              "binary_masks": _masks(image), "labels": ["sky", text]}
    inputs = {}
    for arg in TASKS[name].args:
        if arg.kind == "text":
            inputs[arg.keyword] = text
        elif arg.kind == "masks":
            inputs.update(binary_masks=values["binary_masks"], labels=values["labels"])
        else:
            inputs[arg.keyword] = values[arg.keyword]
    return inputs


def _alone(runner: ModelRunner, request: TaskRequest) -> dict:
    if request.task == RUN:
        return run_requests(runner, [request], max_batch=1)[0]
    return getattr(runner, request.task)(**request.inputs, num_decodes=request.num_decodes,
                                         beam_search=request.beam_search)


def assert_same_result(grouped, alone, path="result"):
    """Equal tokens, texts, boxes, masks and images; scores equal to float32 rounding."""
    if isinstance(alone, dict):
        assert isinstance(grouped, dict) and grouped.keys() == alone.keys(), path
        for key in alone:
            assert_same_result(grouped[key], alone[key], f"{path}.{key}")
    elif isinstance(alone, (list, tuple)):
        assert len(grouped) == len(alone), path
        for i, (g, a) in enumerate(zip(grouped, alone)):
            assert_same_result(g, a, f"{path}[{i}]")
    elif "score" in path:
        np.testing.assert_allclose(grouped, alone, rtol=1e-5, atol=1e-5, err_msg=path)
    elif isinstance(alone, np.ndarray) and alone.dtype.kind == "f":
        # Decoded images come from identical tokens; the VQGAN decodes them in batches, whose
        # rounding may differ in the last bits.
        np.testing.assert_allclose(grouped, alone, atol=1e-5, err_msg=path)
    else:
        assert np.array_equal(grouped, alone) if isinstance(alone, np.ndarray) else grouped == alone, path


def _requests(name: str, images: list[np.ndarray], **options) -> list[TaskRequest]:
    return [TaskRequest(name, _inputs(name, image, i), **options) for i, image in enumerate(images)]


@pytest.mark.parametrize("name", [name for name, task in TASKS.items() if not task.generate_image])
def test_text_tasks_grouped_equal_alone(tiny_runner, images, name):
    requests = _requests(name, images[:2])
    batches = []
    grouped = run_requests(tiny_runner, requests, on_batch=lambda indices, seconds: batches.append(len(indices)))
    for request, result in zip(requests, grouped):
        assert not isinstance(result, Exception), result
        assert_same_result(result, _alone(tiny_runner, request))
    sampled = TASKS[name].beam_search is False
    assert batches == ([1, 1] if sampled else [2])


@pytest.mark.parametrize("name", [name for name, task in TASKS.items() if task.generate_image])
def test_image_tasks_with_beam_search_grouped_equal_alone(tiny_runner, images, name):
    requests = _requests(name, images[:2], beam_search=True)
    batches = []
    grouped = run_requests(tiny_runner, requests, on_batch=lambda indices, seconds: batches.append(len(indices)))
    assert batches == [2]
    for request, result in zip(requests, grouped):
        assert_same_result(result, _alone(tiny_runner, request))


def test_sampled_requests_run_alone_and_equal_alone(tiny_runner, images):
    requests = _requests("depth", images[:2])
    batches = []
    grouped = run_requests(tiny_runner, requests, on_batch=lambda indices, seconds: batches.append(len(indices)))
    assert batches == [1, 1]
    for request, result in zip(requests, grouped):
        assert_same_result(result, _alone(tiny_runner, request))


def test_mixed_requests_keep_their_order_and_num_decodes(tiny_runner, images):
    requests = [TaskRequest("vqa", {"image": images[0], "question": "what is it ?"}),
                TaskRequest("caption", {"image": images[1]}, num_decodes=2),
                TaskRequest(RUN, {"image": None, "prompt": "what is a car ?", "text_len": 8}),
                TaskRequest("vqa", {"image": images[2], "question": "what color is the sofa on the left ?"}),
                TaskRequest("caption", {"image": images[2]}, num_decodes=2),
                TaskRequest("image_classification", {"image": images[1], "answer_options": ["a", "b"]})]
    batches = []
    grouped = run_requests(tiny_runner, requests, on_batch=lambda indices, seconds: batches.append(len(indices)))
    assert sorted(batches) == [1, 1, 2, 2]  # vqa+caption(32 steps), 2 captions x2 decodes, run, options
    for request, result in zip(requests, grouped):
        assert_same_result(result, _alone(tiny_runner, request))


def test_max_batch_splits_groups(tiny_runner, images):
    requests = _requests("vqa", images * 2)
    batches = []
    run_requests(tiny_runner, requests, max_batch=4, on_batch=lambda indices, seconds: batches.append(len(indices)))
    assert batches == [4, 2]


def test_a_bad_request_fails_alone(tiny_runner, images):
    requests = [TaskRequest("vqa", {"image": images[0], "question": "what ?"}),
                TaskRequest("vqa", {"image": np.zeros((4, 4, 2), np.uint8), "question": "what ?"}),
                TaskRequest("nonsense", {}),
                TaskRequest("vqa", {"image": images[1]}),
                TaskRequest(RUN, {"image": None, "prompt": "p", "text_len": 1}),
                TaskRequest("caption", {"image": images[0]}, num_decodes=0),
                TaskRequest("vqa", {"image": images[1], "question": "why ?"})]
    results = run_requests(tiny_runner, requests)
    errors = [str(r) if isinstance(r, Exception) else None for r in results]
    assert errors[0] is None and errors[-1] is None
    assert "(height, width, 3)" in errors[1] and "unknown task 'nonsense'" in errors[2] and "question" in errors[3]
    assert "no room for text" in errors[4] and "num_decodes" in errors[5]
    assert_same_result(results[-1], _alone(tiny_runner, requests[-1]))


def test_a_failing_batch_is_run_again_one_by_one(tiny_runner, images, monkeypatch):
    """A request that fails only inside the model (here: an empty prompt when batched) fails alone."""
    original = ModelRunner.run

    def fragile_run(self, input_images, input_texts, *args, **kwargs):
        if "boom" in input_texts:
            raise RuntimeError("the model failed")
        return original(self, input_images, input_texts, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run", fragile_run)
    requests = [TaskRequest("vqa", {"image": images[0], "question": q}) for q in ("what ?", "boom", "why ?")]
    results = run_requests(tiny_runner, requests)
    assert isinstance(results[1], RuntimeError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_render_gives_the_cli_record_and_images(tiny_runner, images):
    request = TaskRequest("depth", {"image": images[1]}, num_decodes=2)
    record, pictures = render(request, _alone(tiny_runner, request), tiny_runner.tokenizer)
    assert record["command"] == "depth" and list(pictures) == ["depth-1.png", "depth-2.png"]
    assert [d["output"] for d in record["decodes"]] == ["depth-1.png", "depth-2.png"]
    assert pictures["depth-1.png"].size == (images[1].shape[1], images[1].shape[0])
    assert pictures["depth-1.png"].mode == "L"
    request = TaskRequest("vqa", {"image": images[0], "question": "what ?"})
    record, pictures = render(request, _alone(tiny_runner, request), tiny_runner.tokenizer)
    assert pictures == {} and set(record) == {"command", "text", "score"}
