"""Batch jobs: run many task requests from a JSONL file or a folder of images, resumably.

A job reads its requests (:func:`read_jsonl`, :func:`read_folder`), skips the ids its output
already holds, and runs the rest in shared :meth:`~uio.runner.ModelRunner.run` calls through
:func:`uio.requests.run_requests` (the server's grouping), while background threads read the
next requests' images and a writer thread renders and writes finished ones. Each finished request
becomes one line of the output JSONL: ``{"id": ..., **record}`` with the record the CLI's
``--json`` prints, or ``{"id": ..., "error": "..."}``; its images (depth maps, generated images,
masks, drawings with ``draw``) are PNG files named by :func:`image_stem`, written under a temporary
name and then renamed, before the line that names them.

Nothing is lost on a crash: lines are written whole and flushed after every group of batches, a
partial last line left by a killed run is cut off by the next run (:meth:`ResultsFile.open`),
which then does the requests that were not written. This module does not import Ray; see
:mod:`uio.ray_jobs`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from PIL import Image

from .images import read_image, read_mask
from .requests import RUN, TaskRequest, render, run_requests, task_arguments, unknown_task
from .tasks import TASKS, Arg

DEFAULT_BATCH_SIZE = 8
READ_THREADS = 2
# run_requests groups what it is given: several batches' worth lets a file of mixed tasks still
# fill its batches, and is the most work a crash can lose.
BATCHES_PER_CHUNK = 4
READ_AHEAD_CHUNKS = 2
TEMPORARY_PREFIX = ".uio-"
TEMPORARY_SUFFIX = ".png.tmp"
REQUEST_OPTIONS = ("num_decodes", "beam_search")


class InputError(ValueError):
    """The job cannot start: unreadable input, duplicate ids, an output that is not a results file."""


@dataclass(frozen=True)
class Item:
    """One request of a job: its id (a string or an integer), its fields (``task``, ``image``, the
    task's arguments, ``num_decodes``, ``beam_search``) and where it was read (for messages)."""

    id: str | int
    fields: Mapping[str, Any]
    where: str


@dataclass
class Inputs:
    """A job's requests, the folder their relative paths start from, and the input lines that were
    not requests (each message names its line)."""

    items: list[Item]
    base_dir: Path
    malformed: list[str] = field(default_factory=list)


# ---- reading the requests --------------------------------------------------------------------

def _item_id(value: Any) -> str | int | None:
    """A usable id (a non-empty string or an integer), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return value


def read_jsonl(path: str | os.PathLike) -> Inputs:
    """The requests of a JSONL file, one JSON object per line with an ``id`` and a ``task``.

    Image paths resolve relative to the file's folder. Lines that are not such objects are
    listed in :attr:`Inputs.malformed` with their line numbers; blank lines are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from None
    inputs = Inputs([], path.resolve().parent)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            inputs.malformed.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        item_id = _item_id(fields.get("id")) if isinstance(fields, dict) else None
        if item_id is None:
            inputs.malformed.append(f"{where}: expected a JSON object with an \"id\" (a non-empty string "
                                    "or an integer)")
            continue
        inputs.items.append(Item(item_id, fields, where))
    return inputs


def image_files(folder: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """The image files under ``folder`` (by extension, hidden ones and ``exclude`` left out), sorted."""
    extensions = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
    excluded = [path.resolve() for path in exclude]
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if (path.suffix.lower() in extensions and path.is_file()
                and not any(part.startswith(".") for part in relative.parts)
                and not any(path.resolve().is_relative_to(other) for other in excluded)):
            found.append(path)
    return sorted(found)


def read_folder(folder: str | os.PathLike, fields: Mapping[str, Any], exclude: Sequence[Path] = ()) -> Inputs:
    """One request per image under ``folder``: ``fields`` (the task and its other arguments) with
    the image; ids are the images' paths relative to ``folder`` (``/``-separated)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    items = [Item(path.relative_to(folder).as_posix(), {**fields, "image": str(path)}, str(path))
             for path in image_files(folder, exclude)]
    if not items:
        raise InputError(f"{folder}: no image files in it")
    return Inputs(items, folder.resolve())


def check_unique_ids(items: Iterable[Item]) -> None:
    """InputError naming the repeated ids (and where) if two requests share an id."""
    first: dict[str, Item] = {}
    repeated = []
    for item in items:
        key = str(item.id)
        if key in first:
            repeated.append(f"{item.id!r} ({first[key].where} and {item.where})")
        else:
            first[key] = item
    if repeated:
        shown = "; ".join(repeated[:5]) + (f"; and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise InputError(f"duplicate ids: {shown}. Every request needs its own id; nothing was run")


# ---- turning fields into a task request ------------------------------------------------------

def _path(value: Any, base_dir: Path, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a file path (a string), got {value!r}")
    return base_dir / value  # an absolute value stays absolute


def _read_files(arg: Arg, value: Any, base_dir: Path) -> Any:
    """An image field's file read (a path -> HxWx3 array), a masks field's files (-> HxW bool arrays)."""
    if arg.kind == "image":
        return None if value is None else read_image(_path(value, base_dir, arg.keyword), value)
    if arg.kind == "masks":
        if not isinstance(value, list) or not value:
            raise TypeError(f"{arg.keyword} must be a non-empty list of mask image paths, got {value!r}")
        return [read_mask(_path(v, base_dir, arg.keyword), v) for v in value]
    return value  # checked with the request (uio.checks)


def task_fields(task: Any) -> dict[str, Arg]:
    """The fields a request of ``task`` takes (:func:`uio.requests.task_arguments`), by name."""
    if task is None:
        raise ValueError(f"missing \"task\": use one of {', '.join([*TASKS, RUN])}")
    if task not in [*TASKS, RUN]:
        raise unknown_task(task)
    fields = {arg.keyword: arg for arg in task_arguments(task)}
    if "binary_masks" in fields:
        fields["labels"] = Arg("labels", "labels")
    return fields


def to_request(fields: Mapping[str, Any], base_dir: Path, defaults: Mapping[str, Any] | None = None) -> TaskRequest:
    """The :class:`~uio.requests.TaskRequest` a request's fields describe, its files read.

    Paths resolve relative to ``base_dir``; ``defaults`` gives ``num_decodes``/``beam_search``
    where the fields do not. ValueError or TypeError (naming the field) for missing or unknown
    fields and unreadable files; the values themselves are checked when the request runs.
    """
    known = task_fields(fields.get("task"))
    given = {key: value for key, value in fields.items() if key not in ("id", "task")}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{fields['task']} takes no {', '.join(map(repr, unknown))}; its fields are "
                         f"{', '.join(known)}")
    missing = [key for key, arg in known.items() if not arg.optional and key not in given]
    if missing:
        raise ValueError(f"{fields['task']} needs {', '.join(map(repr, missing))}")
    options = {**(defaults or {}), **{key: given.pop(key) for key in REQUEST_OPTIONS if key in given}}
    inputs = {key: _read_files(known[key], value, base_dir) for key, value in given.items()}
    return TaskRequest(fields["task"], inputs, options.get("num_decodes"), options.get("beam_search"))


def prepare(item: Item, base_dir: Path, defaults: Mapping[str, Any] | None = None) -> TaskRequest:
    """:func:`to_request` for one item of a job."""
    return to_request(item.fields, base_dir, defaults)


# ---- writing results -------------------------------------------------------------------------

def image_stem(item_id: str | int) -> str:
    """A file name stem for ``item_id``'s images: its safe characters (at most 80), then a hash
    of the whole id, so that no two ids share a stem (also where case is ignored)."""
    text = str(item_id)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80] or "item"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path``: a temporary file in the same folder, then a rename, so that
    ``path`` is either absent or whole."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_temporary_images(folder: Path) -> None:
    """Delete the temporary image files a killed job left in ``folder`` (if it exists)."""
    for path in folder.glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
        path.unlink(missing_ok=True)


class ResultsFile:
    """The output JSONL: reads the records already there, then appends whole lines."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self.repaired_bytes = 0  # the partial last line cut off by :meth:`open`

    def open(self) -> dict[str, dict]:
        """Open for appending; return the records already written, by ``str(id)``.

        A last line without its newline (a run killed while writing it) is cut off: its request
        runs again. InputError if a whole line is not a record (not a results file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        whole = data[:data.rfind(b"\n") + 1]
        self.repaired_bytes = len(data) - len(whole)
        records = {}
        for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or _item_id(record.get("id")) is None:
                raise InputError(f"{self.path} line {number} is not a result record: is it the output of "
                                 "another program? Give a new --output")
            records[str(record["id"])] = record
        self._file = open(self.path, "r+b" if self.path.exists() else "wb")
        self._file.truncate(len(whole))
        self._file.seek(len(whole))
        return records

    def write(self, record: dict) -> None:
        """Append ``record`` as one line."""
        self._file.write((json.dumps(record) + "\n").encode())

    def flush(self) -> None:
        """Make what was written survive a crash of this process (and of the machine)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


def error_message(err: BaseException) -> str:
    """An item's error as one line: bad input (ValueError, TypeError) as its message says, others
    with their type."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {text}"


def result_record(item_id: str | int, request: TaskRequest, result: dict, tokenizer, images_dir: Path,
                  draw: bool) -> tuple[dict, dict[str, bytes]]:
    """An item's output line and its PNG files by name: the record of :func:`~uio.requests.render`
    with each image named ``<image_stem>.<name>`` and its ``output`` in ``images_dir``. Drawn
    boxes and keypoints are kept only with ``draw``."""
    record, images = render(request, result, tokenizer)
    drawings = request.task != RUN and TASKS[request.task].shows in ("boxes", "pose")
    names = {name: f"{image_stem(item_id)}.{name}" for name in images}

    def renamed(part: dict) -> dict:
        if "output" not in part:
            return part
        if drawings and not draw:
            return {key: value for key, value in part.items() if key not in ("output", "width", "height")}
        return {**part, "output": str(images_dir / names[part["output"]])}

    record = renamed(record)
    if "decodes" in record:
        record["decodes"] = [renamed(decode) for decode in record["decodes"]]
    files = {} if drawings and not draw else {names[name]: png_bytes(image) for name, image in images.items()}
    return {"id": item_id, **record}, files


def finished_item(item: Item, request: TaskRequest | Exception, result: dict | Exception, tokenizer,
                  images_dir: Path, draw: bool) -> tuple[dict, dict[str, bytes]]:
    """:func:`result_record`, or ``{"id": ..., "error": ...}`` when preparing, running or
    rendering the item failed (``request`` or ``result`` is then the exception)."""
    error = request if isinstance(request, Exception) else result if isinstance(result, Exception) else None
    if error is None:
        try:
            return result_record(item.id, request, result, tokenizer, images_dir, draw)
        except Exception as err:  # drawing this item's result failed: the job goes on
            error = err
    return {"id": item.id, "error": error_message(error)}, {}


# ---- the job ---------------------------------------------------------------------------------

@dataclass
class JobOptions:
    """How a job runs: where its results go and how it batches."""

    output: Path
    images_dir: Path
    batch_size: int = DEFAULT_BATCH_SIZE
    draw: bool = False
    fail_fast: bool = False
    quiet: bool = False
    read_threads: int = READ_THREADS
    defaults: Mapping[str, Any] = field(default_factory=dict)  # num_decodes, beam_search


@dataclass
class Summary:
    """What a job did. ``failed`` counts the error lines of this job's ids in the output, earlier
    runs' included; ``skipped`` the ids already done before this run."""

    total: int
    skipped: int = 0
    succeeded: int = 0
    failed: int = 0
    not_run: int = 0
    repaired_bytes: int = 0
    malformed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.malformed or self.not_run)


class _Progress:
    """A tqdm bar of done/total on stderr (none with ``quiet``); item errors are printed above it."""

    def __init__(self, total: int, done: int, quiet: bool):
        from tqdm import tqdm

        self.quiet = quiet
        self.bar = tqdm(total=total, initial=done, unit="item", desc="uio batch", disable=quiet, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def error(self, message: str) -> None:
        if self.quiet:
            print(message, file=sys.stderr)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _outcome(future: Future) -> Any:
    try:
        return future.result()
    except Exception as err:  # the item's own error, reported in its line
        return err


def prepared_chunks(pool: ThreadPoolExecutor, items: Sequence[Item], base_dir: Path, defaults: Mapping[str, Any],
                    chunk_size: int) -> Iterator[list[tuple[Item, TaskRequest | Exception]]]:
    """``items`` in chunks of ``chunk_size``, each with its request (or the error preparing it
    raised); ``pool`` reads the next chunks' files while the caller computes this one."""
    pending: deque[tuple[Item, Future]] = deque()
    upcoming = iter(items)

    def submit(count: int) -> None:
        for item in upcoming:
            pending.append((item, pool.submit(prepare, item, base_dir, defaults)))
            count -= 1
            if count == 0:
                return

    submit(chunk_size * (1 + READ_AHEAD_CHUNKS))
    while pending:
        chunk = [pending.popleft() for _ in range(min(chunk_size, len(pending)))]
        submit(len(chunk))
        yield [(item, _outcome(future)) for item, future in chunk]


class Recorder:
    """Writes finished items to the job's output: their image files (atomically), then their line;
    counts successes and failures and reports each failure."""

    def __init__(self, results: ResultsFile, images_dir: Path, progress: _Progress):
        self.results, self.images_dir, self.progress = results, images_dir, progress
        self.succeeded = self.failed = 0

    def add(self, item: Item, record: dict, files: Mapping[str, bytes]) -> None:
        if files:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomically(self.images_dir / name, data)
        self.results.write(record)
        if "error" in record:
            self.failed += 1
            self.progress.error(f"{item.where} (id {item.id!r}): {record['error']}")
        else:
            self.succeeded += 1

    def end_chunk(self, count: int) -> None:
        """Flush the lines written so far and count ``count`` more items done."""
        self.results.flush()
        self.progress.bar.update(count)


class _Writer:
    """Renders finished items and records them (:class:`Recorder`), a chunk at a time, in a thread
    of its own so that the model goes on with the next chunk."""

    def __init__(self, recorder: Recorder, tokenizer, draw: bool):
        self.recorder, self.tokenizer, self.draw = recorder, tokenizer, draw
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="uio-batch-writer")
        self._last: Future | None = None

    def submit(self, outcomes: list[tuple[Item, TaskRequest | Exception, dict | Exception]]) -> None:
        """Queue a chunk; raises the error writing the previous chunk raised, if any."""
        self.wait()
        self._last = self._thread.submit(self._write, outcomes)

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()

    def _write(self, outcomes) -> None:
        for item, request, result in outcomes:
            self.recorder.add(item, *finished_item(item, request, result, self.tokenizer, self.recorder.images_dir,
                                                   self.draw))
        self.recorder.end_chunk(len(outcomes))


def pending_items(inputs: Inputs, done: Mapping[str, dict]) -> list[Item]:
    """The items whose ids the output does not hold yet."""
    return [item for item in inputs.items if str(item.id) not in done]


def run_job(inputs: Inputs, options: JobOptions, execute: Callable[..., int]) -> Summary:
    """Run the requests of ``inputs`` not yet in ``options.output``, appending their lines.

    Duplicate ids raise InputError before anything is read or run. ``execute(todo, base_dir,
    recorder, options)`` runs the items left (:class:`LocalExecutor` here, or on Ray) and records
    each finished one; it returns how many it handled, fewer when ``fail_fast`` stopped it
    (:attr:`Summary.not_run` counts the rest). It is not called when nothing is left to do.
    """
    check_unique_ids(inputs.items)
    results = ResultsFile(options.output)
    done = results.open()
    try:
        todo = pending_items(inputs, done)
        summary = Summary(len(inputs.items), skipped=len(inputs.items) - len(todo),
                          repaired_bytes=results.repaired_bytes, malformed=list(inputs.malformed))
        if todo:
            _execute(execute, todo, inputs.base_dir, results, options, summary)
    finally:
        results.close()
    summary.failed += sum("error" in done.get(str(item.id), {}) for item in inputs.items)
    return summary


def _execute(execute: Callable[..., int], todo: list[Item], base_dir: Path, results: ResultsFile,
             options: JobOptions, summary: Summary) -> None:
    remove_temporary_images(options.images_dir)
    recorder = Recorder(results, options.images_dir, _Progress(summary.total, summary.skipped, options.quiet))
    handled = 0
    try:
        handled = execute(todo, base_dir, recorder, options)
    finally:
        recorder.progress.close()
        summary.succeeded, summary.failed = recorder.succeeded, recorder.failed
        summary.not_run = len(todo) - (handled or recorder.succeeded + recorder.failed)


class LocalExecutor:
    """Runs a job's items in this process: background threads read the next chunks' files while
    :func:`~uio.requests.run_requests` computes one, and a writer thread records finished ones."""

    def __init__(self, load_runner: Callable[[], Any]):
        self.load_runner = load_runner

    def __call__(self, todo: list[Item], base_dir: Path, recorder: Recorder, options: JobOptions) -> int:
        runner = self.load_runner()
        writer = _Writer(recorder, runner.tokenizer, options.draw)
        pool = ThreadPoolExecutor(options.read_threads, thread_name_prefix="uio-batch-reader")
        handled = 0
        try:
            chunk_size = options.batch_size * BATCHES_PER_CHUNK
            for chunk in prepared_chunks(pool, todo, base_dir, options.defaults, chunk_size):
                requests = [request for _, request in chunk if not isinstance(request, Exception)]
                computed = iter(run_requests(runner, requests, max_batch=options.batch_size))
                writer.submit([(item, request, request if isinstance(request, Exception) else next(computed))
                               for item, request in chunk])
                handled += len(chunk)
                if options.fail_fast:
                    writer.wait()
                    if recorder.failed:
                        break
        finally:
            pool.shutdown(cancel_futures=True)
            writer.close()
        return handled
