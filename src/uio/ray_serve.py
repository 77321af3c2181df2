"""``uio serve`` on Ray Serve: the same HTTP app (:mod:`uio.server`) as a deployment of N replicas.

Needs the ``ray`` and ``serve`` extras. Each replica loads the model once and serves the whole
app (every task endpoint, the page, health and metrics); requests are grouped by Ray Serve's
``@serve.batch`` and run with :func:`uio.requests.run_requests`, as the server's own batcher
does. Start it with ``uio serve --ray --replicas 2``, or with Ray's CLI on a running cluster::

    serve run uio.ray_serve:build_app size=small replicas=2 gpus_per_replica=1

(``build_app``'s arguments: ``size`` (or a config JSON), ``weights``, ``tokenizer``, ``device``,
``dtype``, ``replicas``, ``gpus_per_replica``, ``max_batch``, ``max_wait_ms``, ``token``.)
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

from ray import serve

from .ray_jobs import connect, placement
from .requests import TaskRequest
from .server import ServerSettings, create_app
from .server.batcher import Batcher, Outcome


class ServeBatcher(Batcher):
    """The server's batcher with Ray Serve's ``@serve.batch`` collecting the batches: up to
    ``max_batch`` requests, waiting at most ``max_wait_ms`` for them; one inference thread."""

    def __init__(self, runner, metrics, max_batch: int, max_wait_ms: float, max_queue: int):
        super().__init__(runner, metrics, max_batch, max_wait_ms, max_queue)
        self._batched = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)(
            self._run_batch)

    def start(self) -> None:
        """Nothing to start: Ray Serve collects the batches."""

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)

    async def submit(self, request: TaskRequest) -> Outcome:
        return await self._batched(request)

    async def _run_batch(self, requests: list[TaskRequest]) -> list[Outcome]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, list(requests))


def deployment(runner_options: Mapping[str, Any], gpus_per_replica: float = 0,
               settings: ServerSettings = ServerSettings(), replicas: int = 1) -> serve.Application:
    """The Ray Serve application: ``replicas`` copies of the server app, each with its own model
    (:meth:`~uio.runner.ModelRunner.from_pretrained` with ``runner_options``)."""
    options = dict(runner_options)

    def load_runner():
        from .runner import ModelRunner

        return ModelRunner.from_pretrained(**{"log_inputs": False, **options})

    @serve.deployment(name="uio", num_replicas=replicas, max_queued_requests=settings.max_queue,
                      max_ongoing_requests=2 * settings.max_batch,  # enough for full batches
                      ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica})
    @serve.ingress(lambda: create_app(load_runner, settings, batcher_class=ServeBatcher))
    class UIOServer:
        """One replica: the server app around one model."""

    return UIOServer.bind()


def build_app(args: Mapping[str, str]) -> serve.Application:
    """The application for ``serve run uio.ray_serve:build_app key=value...`` (see the module's docstring)."""
    args = dict(args)
    runner_options = {"size": args.pop("size", "small"), **{key: args.pop(key) for key in
                                                            ("weights", "tokenizer", "device", "dtype") if key in args}}
    replicas, gpus = int(args.pop("replicas", 1)), float(args.pop("gpus_per_replica", 0))
    settings = ServerSettings(max_batch=int(args.pop("max_batch", ServerSettings.max_batch)),
                              max_wait_ms=float(args.pop("max_wait_ms", ServerSettings.max_wait_ms)),
                              token=args.pop("token", None))
    if args:
        raise ValueError(f"unknown argument(s) {', '.join(args)}; see uio.ray_serve's docstring")
    return deployment(*placement(runner_options, gpus), settings=settings, replicas=replicas)


def run(runner_options: Mapping[str, Any], settings: ServerSettings, address: str | None = None, replicas: int = 1,
        gpus_per_replica: float | None = None) -> None:
    """``uio serve --ray``: deploy on the Ray cluster at ``address`` (default: a new local one) and
    serve on ``settings.host:port`` until interrupted."""
    runner_options, gpus = placement(runner_options, gpus_per_replica)
    connect(address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(deployment(runner_options, gpus, settings, replicas), name="uio", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
