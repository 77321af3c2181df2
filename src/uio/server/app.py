"""The HTTP application: one endpoint per task, the task table, the web page, health and metrics.

Errors are JSON ``{"error": ..., "detail": ...}`` with a 4xx status for anything wrong with a
request (never a stack trace); a failure inside the model answers 500 for the requests of that
batch only. The model is loaded on a background thread at startup: ``/readyz`` says when it is
ready, task endpoints answer 503 until then.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import checks
from ..requests import DEFAULT_MAX_BATCH, RUN, TaskRequest, describe_tasks, model_call_of, render
from ..tasks import TASKS
from .batcher import Batcher, QueueFull
from .fields import Fields, read_request
from .metrics import Metrics

log = logging.getLogger("uio.server")

MiB = 1 << 20
STATIC_FILES = ("app.js", "style.css", "demo.png")  # what /static/ serves: nothing else, no paths
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs: where it listens, batching, limits, and the access token (if any)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_body_bytes: int = 20 * MiB
    token: str | None = None


class ApiError(Exception):
    """An error answered as ``{"error": error, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__} as JSON")


class UioJSON(JSONResponse):
    """JSON that takes numpy values."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_json_value).encode()


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes are answered 413 (by declared length or as they arrive)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "body too large", f"the request body is over {self.limit:,} bytes")
            return message

        return await self.app(scope, counting_receive, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, "body too large", f"the request body is over {self.limit:,} bytes")
        await response(scope, receive, send)


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _Model:
    """The runner, loaded on a background thread; ``error`` says why loading failed."""

    def __init__(self, load: Callable[[], Any]):
        self.runner, self.error = None, None
        self.loaded = threading.Event()
        threading.Thread(target=self._load, args=(load,), name="uio-load", daemon=True).start()

    def _load(self, load: Callable[[], Any]) -> None:
        try:
            self.runner = load()
        except Exception as err:  # reported by /readyz and every task request
            log.error("loading the model failed: %s", err)
            self.error = err
        self.loaded.set()


def create_app(load_runner: Callable[[], Any], settings: ServerSettings = ServerSettings(),
               batcher_class: type[Batcher] = Batcher) -> FastAPI:
    """The ASGI app serving the runner that ``load_runner()`` returns (called on a background thread).

    ``batcher_class`` groups the requests (:class:`~uio.server.batcher.Batcher`'s arguments);
    :mod:`uio.ray_serve` passes one that batches with Ray Serve."""
    metrics = Metrics(settings.max_batch)
    state: dict[str, Any] = {}

    async def lifespan(app: FastAPI):
        state["model"] = _Model(load_runner)
        yield
        if "batcher" in state:
            await state["batcher"].stop()

    app = FastAPI(title="Unified-IO", summary="Run Unified-IO's tasks over HTTP", lifespan=lifespan,
                  default_response_class=UioJSON)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def batcher() -> Batcher:
        model: _Model = state["model"]
        if model.error is not None:
            raise ApiError(503, "model unavailable", f"loading the model failed: {model.error}")
        if not model.loaded.is_set():
            raise ApiError(503, "not ready", "the model is still loading", {"Retry-After": str(RETRY_AFTER_S)})
        if "batcher" not in state:
            state["batcher"] = batcher_class(model.runner, metrics, settings.max_batch, settings.max_wait_ms,
                                       settings.max_queue)
            state["batcher"].start()
        return state["batcher"]

    def authorize(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
            raise ApiError(401, "unauthorized", "send the server's token as 'Authorization: Bearer TOKEN'",
                           {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error(err.status, err.error, err.detail, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        detail = "no such endpoint; GET /v1/tasks lists the tasks" if err.status_code == 404 else str(err.detail)
        error = {404: "not found", 405: "method not allowed"}.get(err.status_code, "bad request")
        return _error(err.status_code, error, detail, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return _error(422, "invalid input", "; ".join(str(e.get("msg")) for e in err.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error", f"{type(err).__name__}: {str(err)[:300]}")

    @app.get("/healthz", summary="The server is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded")
    async def readyz():
        model: _Model = state["model"]
        if model.loaded.is_set() and model.error is None:
            return {"status": "ready"}
        detail = f"loading the model failed: {model.error}" if model.error else "the model is still loading"
        return _error(503, "not ready", detail)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/tasks", summary="Every task, its arguments (names, types, defaults) and output")
    async def tasks(request: Request):
        authorize(request)
        return describe_tasks()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_static("index.html").decode())

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        types = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
        if name not in STATIC_FILES:
            raise ApiError(404, "not found", "no such file")
        return Response(_static(name), media_type=types[name.rsplit(".", 1)[-1]])

    async def run_task(task: str, request: Request):
        started = time.perf_counter()
        status = 500
        try:
            response = await _answer(task, request, started)
            status = response.status_code
            return response
        except ApiError as err:
            status = err.status
            raise
        finally:
            metrics.requests.labels(task, str(status)).inc()
            metrics.latency.labels(task).observe(time.perf_counter() - started)

    async def _answer(task: str, request: Request, started: float) -> Response:
        authorize(request)
        work = batcher()
        task_request = await _read(task, request)
        await asyncio.to_thread(_checked_call, task_request, work.runner)
        try:
            outcome = await _wait(request, work.submit(task_request))
        except QueueFull:
            raise ApiError(503, "busy", "the queue is full; retry shortly",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        if outcome is None:  # the client left: nothing to answer
            return Response(status_code=499)
        if isinstance(outcome.result, (ValueError, TypeError)):
            raise ApiError(422, "invalid input", str(outcome.result))
        if isinstance(outcome.result, Exception):
            log.error("task %s failed in the model: %s", task, outcome.result)
            raise ApiError(500, "inference failed", f"{type(outcome.result).__name__}: {str(outcome.result)[:300]}")
        record, pictures = await asyncio.to_thread(render, task_request, outcome.result, work.runner.tokenizer)
        images = await asyncio.to_thread(lambda: {name: _png_base64(p) for name, p in pictures.items()})
        seconds = time.perf_counter() - started
        log.info("task=%s batch_size=%d ms=%.0f", task, outcome.batch_size, seconds * 1000)
        return UioJSON({**record, "task": task, "images": images, "batch_size": outcome.batch_size,
                        "seconds": round(seconds, 4)})

    for name in [*TASKS, RUN]:
        _add_task_route(app, name, run_task)

    @app.api_route("/v1/{name}", methods=["POST"], include_in_schema=False)
    async def unknown_task(name: str):
        raise ApiError(404, "unknown task", f"no task {name!r}; GET /v1/tasks lists the tasks")

    return app


def _add_task_route(app: FastAPI, name: str, run_task: Callable) -> None:
    from .openapi import request_body

    async def endpoint(request: Request):
        return await run_task(name, request)

    summary = "Run any prompt" if name == RUN else TASKS[name].help.capitalize()
    app.add_api_route(f"/v1/{name}", endpoint, methods=["POST"], summary=summary, name=name,
                      openapi_extra={"requestBody": request_body(name)})


async def _wait(request: Request, submitted) -> Any:
    """The outcome of ``submitted``, or None (the request dropped) when the client disconnects first."""
    task = asyncio.ensure_future(submitted)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return None


async def _read(task: str, request: Request) -> TaskRequest:
    """The task request a request's body holds, or a 4xx ApiError."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "bad request", "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "bad request", "the JSON body must be an object of fields")
            fields = Fields(body)
        elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            fields = Fields(await request.form(max_files=32, max_fields=64))
        else:
            raise ApiError(415, "unsupported media type",
                           "send multipart/form-data (an image file and fields) or application/json (base64 image)")
        return await read_request(task, fields, _read_image)
    except (ValueError, TypeError) as err:
        raise ApiError(400, "bad request", str(err)) from None


async def _read_image(reader: Callable, data: bytes, name: str):
    return await asyncio.to_thread(reader, data, name)


def _checked_call(request: TaskRequest, runner) -> None:
    """Check ``request`` as the model will take it (422 when it cannot), prompt length included."""
    try:
        call = model_call_of(request)
    except (ValueError, TypeError) as err:
        raise ApiError(422, "invalid input", str(err)) from None
    texts = [call.prompt, *(call.answer_options or [])]
    too_long = checks.long_prompts(runner.tokenizer, texts, runner.max_input_len)
    if too_long:
        index, tokens = too_long[0]
        what = "the prompt" if index == 0 else f"answer option {call.answer_options[index - 1][:40]!r}"
        raise ApiError(422, "invalid input", f"{what} is {tokens} tokens, over the model's {runner.max_input_len}")


def _static(name: str) -> bytes:
    """A file of the page (``static/``), or the bundled demo picture."""
    if name == "demo.png":
        return resources.files("uio").joinpath("assets", "demo.png").read_bytes()
    return resources.files("uio.server").joinpath("static", name).read_bytes()


def serve(load_runner: Callable[[], Any], settings: ServerSettings = ServerSettings()) -> None:
    """Serve until SIGTERM/SIGINT: uvicorn stops accepting, finishes the requests in flight, then returns."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        log.warning("listening on %s without a token: anyone who can reach it can use the model "
                    "(set --token to require one)", settings.host)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handler it found: with
    # Python's defaults that kills the process (SIGTERM) or raises KeyboardInterrupt (SIGINT) after a
    # clean drain. Handlers that ignore it let serve() return, and `uio serve` exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(create_app(load_runner, settings), host=settings.host, port=settings.port, log_level="info",
                    timeout_graceful_shutdown=None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
