"""Many task requests at once: grouped into shared :meth:`~uio.runner.ModelRunner.run` calls.

The server, batch jobs and Ray call :func:`run_requests` with whatever requests they have; it
groups those that can share one ``run()`` call (same output length and kind, decoding settings
and answer options), runs each group as one batch and hands every request the result its task
method would have returned for it alone. :func:`render` turns a result into the CLI's ``--json``
record and its images.

A request's result does not depend on the requests batched with it: the decoder attends only to
an example's own prompt and image, and padding positions are masked. Sampled requests (image
outputs without beam search, pose) run alone, since a ``run()`` call draws every example's
samples from one seeded generator: an example's samples would depend on its place in the batch.
So do text requests of a runner with ``stop_at_eos``, whose scores count the steps its batch ran.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from . import checks
from .results import Context, describe
from .runner import MAX_OUTPUT_TEXT_LEN
from .tasks import OPTIONS, TASKS, Arg, ModelCall, model_call, task_result

RUN = "run"  # the raw-prompt request: any prompt, text or image output
RUN_ARGS = (Arg("image", "image", help="input image (none for a text-only prompt)", optional=True),
            Arg("text", "prompt", help="the prompt"),
            Arg("integer", "text_len", help="output text length (default 32; 1 with image_output)", optional=True),
            Arg("flag", "image_output", help="generate an image", optional=True),
            OPTIONS)
DECODING_ARGS = (Arg("integer", "num_decodes", help="return N beams/samples, best first", optional=True),
                 Arg("flag", "beam_search", help="beam search (default for text) or sampling", optional=True))
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class TaskRequest:
    """One task to run: a :data:`~uio.tasks.TASKS` name (the runner method's name) or ``"run"``.

    ``inputs`` are the runner method's keyword arguments, already read (``image`` as an HxWx3
    uint8 array, ``question``, ``location``, ``answer_options``, ``binary_masks``, ``labels``...);
    for ``"run"``: ``image`` (or None), ``prompt``, ``text_len``, ``image_output``, ``answer_options``.
    """

    task: str
    inputs: Mapping[str, Any]
    num_decodes: int | None = None
    beam_search: bool | None = None


def unknown_task(task: Any) -> ValueError:
    """The error for a request naming no task of the table (nor ``run``)."""
    return ValueError(f"unknown task {task!r}: use one of {', '.join([*TASKS, RUN])}")


def model_call_of(request: TaskRequest) -> ModelCall:
    """How ``request`` runs the model, its inputs checked as ``run()`` checks them; ValueError or
    TypeError (naming the input) when its task or inputs are not usable."""
    if request.task == RUN:
        call = _run_call(request)
    elif request.task in TASKS:
        call = model_call(request.task, request.inputs, request.num_decodes, request.beam_search)
    else:
        raise unknown_task(request.task)
    checks.check_run_inputs(**call.run_arguments(), max_output_text_len=MAX_OUTPUT_TEXT_LEN)
    return call


def _run_call(request: TaskRequest) -> ModelCall:
    inputs = request.inputs
    image_output = bool(inputs.get("image_output", False))
    options = inputs.get("answer_options") or None
    text_len = inputs.get("text_len") or (1 if image_output else 32)
    if options and image_output:
        raise ValueError("answer_options scores text answers; it cannot be combined with image_output")
    if text_len == 1 and not image_output:
        raise ValueError("text_len 1 leaves no room for text; use 2 or more (or image_output)")
    image = inputs.get("image")
    image = None if image is None else checks.check_image(image)
    prompt = checks.check_text(inputs.get("prompt"), "prompt")
    return ModelCall(image, prompt, text_len, image_output, request.beam_search, request.num_decodes, options,
                     None, image)


def _result(request: TaskRequest, call: ModelCall, out: dict, tokenizer) -> dict:
    """The request's result from ``run()``'s output for it alone."""
    if request.task != RUN:
        return task_result(request.task, call, out, tokenizer)
    return {"text": None if out["text"] is None else out["text"][0],
            "image": None if out["image"] is None else out["image"][0], "score": out["score"][0]}


def _group_key(call: ModelCall, index: int, stop_at_eos: bool) -> tuple:
    """Requests with equal keys can share one ``run()`` call."""
    beam_search = not call.generate_image if call.beam_search is None else call.beam_search
    alone = not beam_search or (stop_at_eos and not call.generate_image)
    options = None if call.answer_options is None else tuple(call.answer_options)
    return (call.output_text_len, call.generate_image, beam_search, call.num_decodes, options,
            index if alone else None)


def _example(out: dict, i: int) -> dict:
    """Example ``i`` of a batch's ``run()`` output, shaped as a batch of one."""
    return {key: None if value is None else value[i:i + 1] for key, value in out.items()}


def _run_batch(runner, calls: Sequence[ModelCall]) -> dict:
    first = calls[0]
    regions = [call.mask_region for call in calls]
    return runner.run([call.image for call in calls], [call.prompt for call in calls],
                      output_text_len=first.output_text_len, generate_image=first.generate_image,
                      beam_search=first.beam_search, num_decodes=first.num_decodes,
                      answer_options=first.answer_options,
                      mask_regions=None if all(r is None for r in regions) else regions)


def run_requests(runner, requests: Sequence[TaskRequest], max_batch: int = DEFAULT_MAX_BATCH,
                 on_batch: Callable[[list[int], float], None] | None = None) -> list[dict | Exception]:
    """Run ``requests`` on ``runner`` in as few ``run()`` calls as they allow, up to ``max_batch``
    examples each; return, per request and in order, the task's result dict or the exception it raised.

    A bad request fails alone: inputs are checked one by one first, and a batch that fails is run
    again one request at a time. ``on_batch(indices, seconds)`` is called after each ``run()`` call with
    the indices of the requests it ran.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    results: list[dict | Exception | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, ModelCall]]] = {}
    for index, request in enumerate(requests):
        try:
            call = model_call_of(request)
        except (ValueError, TypeError) as err:
            results[index] = err
            continue
        groups.setdefault(_group_key(call, index, runner.stop_at_eos), []).append((index, call))
    for members in groups.values():
        for start in range(0, len(members), max_batch):
            _run_group(runner, requests, members[start:start + max_batch], results, on_batch)
    return results  # type: ignore[return-value]


def _run_group(runner, requests, members: list[tuple[int, ModelCall]], results: list, on_batch) -> None:
    """Run one batch and store each member's result; when the batch fails, run its members alone."""
    start = time.perf_counter()
    try:
        out = _run_batch(runner, [call for _, call in members])
    except Exception as err:
        if len(members) == 1:
            results[members[0][0]] = err
        else:
            for member in members:
                _run_group(runner, requests, [member], results, on_batch)
        return
    if on_batch is not None:
        on_batch([index for index, _ in members], time.perf_counter() - start)
    for i, (index, call) in enumerate(members):
        try:
            results[index] = _result(requests[index], call, _example(out, i), runner.tokenizer)
        except Exception as err:
            results[index] = err


def describe_request(request: TaskRequest, result: dict, tokenizer,
                     image_name: str | None = None) -> tuple[dict, list[str], dict[str, Image.Image]]:
    """The CLI's ``--json`` record of ``result``, its text lines and its images by name
    (``image_name``, default ``<command>.png``; numbered when there are several decodes)."""
    if request.task == RUN:
        command, shows = RUN, "image" if request.inputs.get("image_output") else "text"
    else:
        command, shows = TASKS[request.task].command, TASKS[request.task].shows
    ctx = Context(request.inputs.get("image"), tokenizer, request.inputs.get("location"))
    return describe(command, shows, result, ctx, request.num_decodes, image_name or f"{command}.png")


def render(request: TaskRequest, result: dict, tokenizer) -> tuple[dict, dict[str, Image.Image]]:
    """The CLI's ``--json`` record for ``result`` and its image outputs by name (see :func:`describe_request`)."""
    record, _, images = describe_request(request, result, tokenizer)
    return record, images


_TYPES = {"image": "image", "text": "string", "box": "box", "options": "list of strings", "integer": "integer",
          "flag": "boolean"}


def task_arguments(task: str) -> tuple[Arg, ...]:
    """The inputs of ``task`` (a :data:`~uio.tasks.TASKS` name or ``"run"``), then the decoding options."""
    return (RUN_ARGS if task == RUN else TASKS[task].args) + DECODING_ARGS


def _argument(arg: Arg) -> list[dict]:
    """How ``arg`` is given in a request: name, type, whether required, default, description."""
    if arg.kind == "masks":
        return [{"name": arg.keyword, "type": "list of images", "required": True, "default": None, "help": arg.help},
                {"name": "labels", "type": "list of strings", "required": True, "default": None,
                 "help": "what each mask shows, in the order of the masks"}]
    return [{"name": arg.keyword, "type": _TYPES[arg.kind], "required": not arg.optional, "default": None,
             "help": arg.help or arg.metavar.lower().replace("_", " ")}]


def describe_tasks() -> list[dict]:
    """Every task (and ``run``) with its arguments' names, types and defaults, and how its result shows."""
    table = [{"name": name, "command": task.command, "help": task.help, "output": task.shows,
              "arguments": [a for arg in task_arguments(name) for a in _argument(arg)]}
             for name, task in TASKS.items()]
    table.append({"name": RUN, "command": RUN, "help": "run any prompt, with or without an image",
                  "output": "text or image", "arguments": [a for arg in task_arguments(RUN) for a in _argument(arg)]})
    return table
