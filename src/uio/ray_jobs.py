"""Unified-IO batch jobs on Ray Data (``pip install ".[ray]"``; the core package never imports this).

``uio batch ... --ray`` runs a job as a pipeline: the requests the output does not hold yet go
into a dataset, :class:`UIOPredictor` actors (one model each) run them in batches, and this
process writes their lines and images as they arrive, exactly as a local job does (same output,
same resume). Image paths must be readable where the actors run (one machine, or a shared
filesystem).

Your own pipelines can use :class:`UIOPredictor` directly::

    import json, ray
    from uio.ray_jobs import UIOPredictor

    ds = ray.data.read_json("requests.jsonl")  # {"id": ..., "task": "vqa", "image": "a.jpg", "question": ...}
    out = ds.map_batches(UIOPredictor, batch_size=8, num_gpus=1,
                         compute=ray.data.ActorPoolStrategy(size=4),  # concurrency=4 in older Ray
                         fn_constructor_kwargs={"runner_options": {"size": "small"}, "base_dir": "/data"})
    for row in out.iter_rows():
        record = json.loads(row["record"])  # {"id": ..., **uio's --json record} or {"id": ..., "error": ...}
        pngs = dict(zip(row["image_names"], row["image_pngs"]))  # image outputs, as PNG bytes
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import ray

from . import batch
from .requests import run_requests

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("record", pa.string()), ("image_names", pa.list_(pa.string())),
                           ("image_pngs", pa.list_(pa.binary()))])


def _plain(value: Any) -> Any:
    """A numpy value of a batch column as plain Python (lists, numbers, strings)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def batch_rows(batch: pa.Table | Mapping[str, np.ndarray]) -> list[dict]:
    """A Ray Data batch (pyarrow, or numpy columns) as rows of request fields; null fields are absent.

    A ``request`` column holding a request's JSON text stands for its fields (``ray.data.read_text``
    of a JSONL file names its column ``text``, also accepted)."""
    if isinstance(batch, pa.Table):
        rows = batch.to_pylist()
    else:
        columns = {name: list(values) for name, values in batch.items()}
        rows = [{name: _plain(values[i]) for name, values in columns.items()}
                for i in range(len(next(iter(columns.values()), [])))]
    rows = [json.loads(row.get("request") or row["text"]) if {"request", "text"} & set(row) else row for row in rows]
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


class UIOPredictor:
    """A Ray Data callable class: loads the model once, then runs each batch of requests.

    Each input row is one request, with the fields of a ``uio batch`` JSONL line (``id``,
    ``task``, ``image`` path, the task's arguments...). Each output row has ``id`` (as a string),
    ``record`` (the output line's JSON text: the CLI's ``--json`` record with the id, or
    ``{"id", "error"}``), ``image_names`` and ``image_pngs`` (the image outputs as PNG bytes,
    named as ``uio batch`` names its files).

    :param runner_options: keyword arguments of :meth:`~uio.runner.ModelRunner.from_pretrained`
        (``size``, ``weights``, ``tokenizer``, ``device``, ``dtype``...)
    :param base_dir: the folder relative image paths start from
    :param images_dir: the folder records name as their images' place
    :param max_batch: examples per ``run()`` call
    :param draw: also return boxes and keypoints drawn onto the input image
    :param defaults: ``num_decodes``/``beam_search`` for requests that do not give them
    """

    def __init__(self, runner_options: Mapping[str, Any] | None = None, base_dir: str = ".", images_dir: str = "",
                 max_batch: int = batch.DEFAULT_BATCH_SIZE, draw: bool = False,
                 defaults: Mapping[str, Any] | None = None):
        from .runner import ModelRunner

        self.runner = ModelRunner.from_pretrained(**{"log_inputs": False, **(runner_options or {})})
        self.base_dir, self.images_dir = Path(base_dir), Path(images_dir)
        self.max_batch, self.draw, self.defaults = max_batch, draw, dict(defaults or {})
        self.pool = ThreadPoolExecutor(batch.READ_THREADS, thread_name_prefix="uio-ray-reader")

    def __call__(self, rows: pa.Table | Mapping[str, np.ndarray]) -> pa.Table:
        items = [batch.Item(row.get("id"), row, f"id {row.get('id')!r}") for row in batch_rows(rows)]
        prepared = next(batch.prepared_chunks(self.pool, items, self.base_dir, self.defaults, max(len(items), 1)), [])
        requests = [request for _, request in prepared if not isinstance(request, Exception)]
        computed = iter(run_requests(self.runner, requests, max_batch=self.max_batch))
        columns: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
        for item, request in prepared:
            result = request if isinstance(request, Exception) else next(computed)
            record, files = batch.finished_item(item, request, result, self.runner.tokenizer, self.images_dir,
                                                self.draw)
            for name, value in zip(OUTPUT_SCHEMA.names, (str(item.id), json.dumps(record), list(files),
                                                         list(files.values()))):
                columns[name].append(value)
        return pa.table(columns, schema=OUTPUT_SCHEMA)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: this machine's), or start one here when
    None and ``RAY_ADDRESS`` is unset; nothing when this process is already connected."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # uio batch shows its own progress


def placement(runner_options: Mapping[str, Any], gpus_per_replica: float | None) -> tuple[dict, float]:
    """A replica's runner options and GPUs: 1 GPU by default where the device is CUDA, and the
    device CUDA by default where GPUs are asked for."""
    device = str(runner_options.get("device") or "")
    gpus = gpus_per_replica if gpus_per_replica is not None else 1 if device.startswith("cuda") else 0
    return {**runner_options, "device": device or ("cuda" if gpus else "cpu")}, gpus


class RayExecutor:
    """Runs a job's items as a Ray Data pipeline of ``replicas`` :class:`UIOPredictor` actors
    with ``gpus_per_replica`` GPUs each (default: 1 when ``runner_options`` asks for CUDA)."""

    def __init__(self, runner_options: Mapping[str, Any], address: str | None = None, replicas: int = 1,
                 gpus_per_replica: float | None = None):
        self.runner_options, self.gpus = placement(runner_options, gpus_per_replica)
        self.address, self.replicas = address, replicas

    def __call__(self, todo: list[batch.Item], base_dir: Path, recorder: batch.Recorder,
                 options: batch.JobOptions) -> int:
        connect(self.address)
        dataset = ray.data.from_items([{"request": json.dumps(dict(item.fields))} for item in todo])
        results = dataset.map_batches(
            UIOPredictor, batch_size=options.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.replicas), num_gpus=self.gpus or None,
            fn_constructor_kwargs={"runner_options": self.runner_options, "base_dir": str(base_dir),
                                   "images_dir": str(options.images_dir), "max_batch": options.batch_size,
                                   "draw": options.draw, "defaults": dict(options.defaults)})
        items = {str(item.id): item for item in todo}
        handled = 0
        for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in table.to_pylist():
                recorder.add(items[row["id"]], json.loads(row["record"]), dict(zip(row["image_names"],
                                                                                   row["image_pngs"])))
            recorder.end_chunk(table.num_rows)
            handled += table.num_rows
            if options.fail_fast and recorder.failed:
                break
        return handled
