"""``uio batch``: run a JSONL file of requests, or one task over a folder of images (see :mod:`uio.batch`).

With ``--ray`` the same job runs as a Ray Data pipeline (:mod:`uio.ray_jobs`, ``pip install ".[ray]"``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import batch
from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    _check_model_args,
    _comma_list,
    _coordinate,
    _positive_int,
    load_runner,
    runner_options,
)
from .requests import DECODING_ARGS, RUN, task_arguments
from .tasks import TASKS, Arg

FILE_KINDS = ("image", "masks")  # given by the folder's images; masks only in JSONL files


def folder_arguments() -> dict[str, Arg]:
    """Every task argument a folder job can take as an option (``--<keyword>``; ``--box``, ``--options``),
    by keyword: those of the task table, less files and the decoding options (model options here)."""
    decoding = {arg.keyword for arg in DECODING_ARGS}
    return {arg.keyword: arg for task in [*TASKS, RUN] for arg in task_arguments(task)
            if arg.kind not in FILE_KINDS and arg.keyword not in decoding}


def _option_name(arg: Arg) -> str:
    return {"box": "--box", "options": "--options"}.get(arg.kind, f"--{arg.keyword.replace('_', '-')}")


def _add_folder_option(group, arg: Arg) -> None:
    name, help_text = _option_name(arg), arg.help or None
    if arg.kind == "box":
        group.add_argument(name, dest=arg.keyword, nargs=4, type=_coordinate, metavar=("X1", "Y1", "X2", "Y2"),
                           help="the region, in pixels of every image")
    elif arg.kind == "options":
        group.add_argument(name, dest=arg.keyword, type=_comma_list, metavar="A,B,...", help=help_text)
    elif arg.kind == "integer":
        group.add_argument(name, dest=arg.keyword, type=_positive_int, metavar="N", help=help_text)
    elif arg.kind == "flag":
        group.add_argument(name, dest=arg.keyword, action="store_const", const=True, help=help_text)
    else:
        group.add_argument(name, dest=arg.keyword, metavar=arg.metavar or "TEXT", help=help_text)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """Declare ``uio batch`` on the ``uio`` parser's sub-commands."""
    p = sub.add_parser(
        "batch", parents=parents, help="run many requests (a JSONL file, or a task over a folder of images)",
        description="Run a JSONL file of requests (one {\"id\", \"task\", ...} object a line; image paths "
                    "relative to the file), or --task over every image of a folder (ids: the relative paths). "
                    "Results go to --output, one line per id; rerunning the same command skips the ids "
                    "already there. Exit status: 0 all succeeded, 1 some failed, 2 bad usage.")
    p.add_argument("input", metavar="INPUT", help="a .jsonl file of requests, or a folder of images")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="results JSONL (appended to on reruns)")
    p.add_argument("--output-images", metavar="DIR",
                   help="folder for image outputs (default: <output name>-images beside FILE)")
    p.add_argument("--batch-size", type=_positive_int, default=batch.DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"examples per run() call (default {batch.DEFAULT_BATCH_SIZE})")
    p.add_argument("--draw", action="store_true", help="also save boxes and keypoints drawn onto the input image")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed item")
    p.add_argument("--quiet", action="store_true", help="no progress bar: errors and the summary only")
    folder = p.add_argument_group("folder inputs: the task and its arguments")
    folder.add_argument("--task", choices=[*TASKS, RUN], metavar="TASK",
                        help=f"one of {', '.join([*TASKS, RUN])}")
    for arg in folder_arguments().values():
        _add_folder_option(folder, arg)
    add_ray_options(p, "run the job as a Ray Data pipeline")
    p.set_defaults(handler=handle)


def add_ray_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray`` and its options (``uio batch`` and ``uio serve``)."""
    ray = p.add_argument_group("Ray (pip install \".[ray]\")")
    ray.add_argument("--ray", action="store_true", help=what)
    ray.add_argument("--address", metavar="ADDR",
                     help="Ray cluster to join (auto: the local machine's; default: RAY_ADDRESS, else a new local Ray)")
    ray.add_argument("--replicas", type=_positive_int, default=1, metavar="N", help="model copies (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, metavar="G",
                     help="GPUs each copy holds (default: 1 with --device cuda, else 0)")


def _folder_fields(args: argparse.Namespace) -> dict:
    """The fields every request of a folder job shares: the task and the task options given."""
    if args.task is None:
        raise UsageError(f"{args.input} is a folder: give --task (one of {', '.join([*TASKS, RUN])})")
    known = batch.task_fields(args.task)
    if "image" not in known:
        raise UsageError(f"{args.task} takes no input image; give its requests in a JSONL file")
    fields = {"task": args.task}
    for keyword, arg in folder_arguments().items():
        if getattr(args, keyword) is None:
            continue
        if keyword not in known:
            raise UsageError(f"{_option_name(arg)} is not an argument of {args.task}")
        fields[keyword] = getattr(args, keyword)
    return fields


def _check_no_folder_options(args: argparse.Namespace) -> None:
    given = [arg for keyword, arg in folder_arguments().items() if getattr(args, keyword) is not None]
    if args.task is not None or given:
        raise UsageError(f"{_option_name(given[0]) if given else '--task'} is for folder inputs; a JSONL file gives "
                         "each request's task and arguments on its line")


def read_inputs(args: argparse.Namespace, output: Path, images_dir: Path) -> batch.Inputs:
    """The job's requests: a folder's images with the task options, or a JSONL file's lines."""
    source = Path(args.input)
    if source.is_dir():
        return batch.read_folder(source, _folder_fields(args), exclude=[output, images_dir])
    _check_no_folder_options(args)
    if not source.is_file():
        raise UsageError(f"{source}: no such file or folder")
    return batch.read_jsonl(source)


def handle(args: argparse.Namespace):
    """``uio batch``: check everything, then run the job locally or on Ray; exit 1 when items failed."""
    _check_model_args(args)
    output = Path(args.output)
    images_dir = Path(args.output_images) if args.output_images else output.with_name(f"{output.stem}-images")
    options = batch.JobOptions(output, images_dir, args.batch_size, args.draw, args.fail_fast, args.quiet,
                               defaults={"num_decodes": args.num_decodes, "beam_search": args.beam_search})
    try:
        inputs = read_inputs(args, output, images_dir)
        if args.ray:
            try:
                from . import ray_jobs
            except ImportError as err:
                raise UsageError(f"--ray needs the ray extra ({err.name} is not installed): "
                                 "pip install 'unified-io[ray]'") from None
            execute = ray_jobs.RayExecutor(runner_options(args), args.address, args.replicas, args.gpus_per_replica)
        else:
            execute = batch.LocalExecutor(lambda: load_runner(args))
        summary = batch.run_job(inputs, options, execute)
    except batch.InputError as err:
        raise UsageError(str(err)) from None
    return (*describe(summary, options), EXIT_OK if summary.ok else EXIT_FAILED)


def describe(summary: batch.Summary, options: batch.JobOptions) -> tuple[dict, list[str]]:
    """The summary as the CLI's JSON record and lines."""
    record = {"command": "batch", "output": str(options.output), "images": str(options.images_dir),
              "total": summary.total, "succeeded": summary.succeeded, "failed": summary.failed,
              "skipped": summary.skipped, "not_run": summary.not_run, "malformed_lines": summary.malformed,
              "repaired_bytes": summary.repaired_bytes}
    counts = (f"{summary.total} requests: {summary.succeeded} done now, {summary.skipped} done before, "
              f"{summary.failed} failed")
    lines = [counts]
    if summary.repaired_bytes:
        lines.append(f"cut off a partial last line ({summary.repaired_bytes} bytes) that an interrupted run left "
                     f"in {options.output}; its request ran again")
    if summary.failed:
        lines.append(f"failed requests have {{\"id\": ..., \"error\": ...}} lines in {options.output}")
    if summary.not_run:
        lines.append(f"stopped at the first failure (--fail-fast): {summary.not_run} requests not run; "
                     "rerun the command to go on")
    if summary.malformed:
        lines += [f"{len(summary.malformed)} input line(s) are not requests:", *(f"  {m}" for m in summary.malformed)]
    return record, lines
