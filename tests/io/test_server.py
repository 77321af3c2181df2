"""``uio serve``: a real server process on 127.0.0.1 with the tiny checkpoint, every task over HTTP
(multipart and JSON) against direct ModelRunner calls, batching, bad input, the page in Chromium,
and draining on SIGTERM. Needs the serve extra; the page test also needs Playwright and chromium."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install '.[serve,test]')")

from uio import images  # noqa: E402
from uio.requests import RUN, TaskRequest, render, run_requests  # noqa: E402
from uio.runner import ModelRunner  # noqa: E402
from uio.tasks import TASKS  # noqa: E402

MAX_BODY_MB = 2
STARTUP_S = 600  # loading on a busy machine may build uio's CPU kernels first
QUESTIONS = ["what is it ?", "what color is the sofa on the left of the room ?", "why ?", "where is the car ?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``uio serve`` in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, conformance: Path, log: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [sys.executable, "-m", "uio.cli", "serve", "--model", str(conformance / "tiny" / "config.json"),
                "--weights", str(conformance / "tiny" / "tiny.bin"), "--tokenizer",
                str(conformance / "tokenizer" / "spiece.model"), "--device", "cpu", "--port", str(self.port), *extra]
        self.process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server was not ready after {STARTUP_S} s: {log.read_text()[-2000:]}")

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def server(conformance, tmp_path_factory):
    running = ServerProcess(conformance, tmp_path_factory.mktemp("server") / "server.log", "--max-wait-ms", "150",
                            "--max-batch", "4", "--max-queue", "16", "--max-body-mb", str(MAX_BODY_MB))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as http:
        yield http


@pytest.fixture(scope="module")
def image_bytes(conformance) -> bytes:
    return (conformance / "golden" / "test_image.png").read_bytes()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_pngs() -> list[bytes]:
    left = np.zeros((120, 160), np.uint8)
    left[:, :80] = 255
    return [_png(left), _png(255 - left)]


def _fields(task: str) -> dict:
    """Non-image fields of a request for ``task`` (as the page would send them)."""
    fields = {"question": "what is on the left ?", "description": "a red bus", "replace_with": "a dog",
              "object_name": "car", "expression": "the red car", "location": [100.0, 50.0, 300.0, 200.0],
              "answer_options": ["cat", "dog", "bus"], "labels": ["sky", "grass"], "prompt": "what is this ?",
              "text_len": 6}
    names = {arg.keyword for arg in TASKS[task].args} if task != RUN else {"prompt", "text_len"}
    if "binary_masks" in names:
        names.add("labels")
    return {key: value for key, value in fields.items() if key in names}


def _takes_image(task: str) -> bool:
    return task == RUN or any(arg.kind == "image" for arg in TASKS[task].args)


def _multipart(task: str, image_bytes: bytes, extra: dict | None = None) -> tuple[dict, list]:
    data, files = {}, []
    for key, value in {**_fields(task), **(extra or {})}.items():
        data[key] = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(
            value, list) else str(value)
    if _takes_image(task):
        files.append(("image", ("image.png", image_bytes, "image/png")))
    if task == "segmentation_based_generation":
        files += [("binary_masks", (f"m{i}.png", png, "image/png")) for i, png in enumerate(_mask_pngs())]
    return data, files


def _json_body(task: str, image_bytes: bytes, extra: dict | None = None) -> dict:
    body = {**_fields(task), **(extra or {})}
    if _takes_image(task):
        body["image"] = base64.b64encode(image_bytes).decode()
    if task == "segmentation_based_generation":
        body["binary_masks"] = [base64.b64encode(png).decode() for png in _mask_pngs()]
    return body


def _direct(runner: ModelRunner, task: str, image_bytes: bytes, extra: dict | None = None) -> tuple[dict, dict]:
    """The record and images (as arrays) a direct ModelRunner call gives, as the server should answer."""
    inputs = {**_fields(task), **(extra or {})}
    decoding = {key: inputs.pop(key) for key in ("num_decodes", "beam_search") if key in inputs}
    if _takes_image(task):
        inputs["image"] = images.read_image(image_bytes)
    if task == "segmentation_based_generation":
        inputs["binary_masks"] = [images.read_mask(png) for png in _mask_pngs()]
    request = TaskRequest(task, inputs, **decoding)
    if task == RUN:
        result = run_requests(runner, [request])[0]
    else:
        result = getattr(runner, task)(**inputs, **decoding)
    record, pictures = render(request, result, runner.tokenizer)
    record = json.loads(json.dumps(record, default=lambda v: v.tolist() if hasattr(v, "tolist") else v))
    return record, {name: np.asarray(picture) for name, picture in pictures.items()}


def _scores(record: dict) -> tuple[dict, list[float]]:
    """``record`` without its scores, and the scores (best decode's, then each decode's)."""
    decodes = record.get("decodes", [])
    rest = {k: v for k, v in record.items() if k not in ("score", "decodes")}
    rest["decodes"] = [{k: v for k, v in d.items() if k != "score"} for d in decodes]
    return rest, [record["score"], *(d["score"] for d in decodes)]


def assert_answer_equals(answer: dict, expected: tuple[dict, dict], batched: bool = False) -> None:
    """The answer is the expected record and images; in a batch, scores may round differently in float32."""
    record, pictures = expected
    got = {k: v for k, v in answer.items() if k not in ("task", "images", "batch_size", "seconds")}
    if batched:
        (got, got_scores), (record, scores) = _scores(got), _scores(record)
        assert got_scores == pytest.approx(scores, rel=1e-5)
    assert got == record
    assert set(answer["images"]) == set(pictures)
    for name, picture in pictures.items():
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][name]))))
        np.testing.assert_array_equal(got, picture)


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, flags=re.M))


def test_health_and_task_table(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    table = client.get("/v1/tasks").json()
    assert [task["name"] for task in table] == [*TASKS, RUN]
    vqa = next(task for task in table if task["name"] == "vqa")
    assert [(a["name"], a["type"], a["required"]) for a in vqa["arguments"]] == [
        ("image", "image", True), ("question", "string", True), ("num_decodes", "integer", False),
        ("beam_search", "boolean", False)]
    schema = client.get("/openapi.json").json()
    assert "/v1/region_classification" in schema["paths"] and client.get("/docs").status_code == 200


@pytest.mark.parametrize("task", [*TASKS, RUN])
def test_every_task_over_http_equals_a_direct_call(client, tiny_runner, image_bytes, task):
    expected = _direct(tiny_runner, task, image_bytes)
    data, files = _multipart(task, image_bytes)
    answer = client.post(f"/v1/{task}", data=data, files=files)
    assert answer.status_code == 200, answer.text
    assert_answer_equals(answer.json(), expected)
    answer = client.post(f"/v1/{task}", json=_json_body(task, image_bytes))
    assert answer.status_code == 200, answer.text
    assert_answer_equals(answer.json(), expected)


def test_decoding_options_over_http(client, tiny_runner, image_bytes):
    extra = {"num_decodes": 2, "beam_search": True}
    expected = _direct(tiny_runner, "depth", image_bytes, extra)
    answer = client.post("/v1/depth", json=_json_body("depth", image_bytes, extra))
    assert answer.status_code == 200, answer.text
    assert_answer_equals(answer.json(), expected)
    assert len(answer.json()["decodes"]) == 2 and len(answer.json()["images"]) == 2


def _vqa_concurrently(client, image_bytes, questions: list[str]) -> list:
    answers = [None] * len(questions)

    def ask(i: int) -> None:
        answers[i] = client.post("/v1/vqa", data={"question": questions[i]},
                                 files=[("image", ("image.png", image_bytes, "image/png"))])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, tiny_runner, image_bytes):
    expected = {q: _direct(tiny_runner, "vqa", image_bytes, {"question": q}) for q in QUESTIONS}
    batches_before = _metric(client, "uio_batch_size_count")
    examples_before = _metric(client, "uio_batch_size_sum")
    answers = _vqa_concurrently(client, image_bytes, QUESTIONS * 2)
    for question, answer in zip(QUESTIONS * 2, answers):
        assert answer.status_code == 200, answer.text
        assert_answer_equals(answer.json(), expected[question], batched=True)
    batches = _metric(client, "uio_batch_size_count") - batches_before
    examples = _metric(client, "uio_batch_size_sum") - examples_before
    assert examples == 8 and batches < 8  # some run() calls held several requests
    assert max(answer.json()["batch_size"] for answer in answers) > 1


def test_bounded_load_loses_nothing_and_memory_stays(server, client, tiny_runner, image_bytes):
    expected = {q: _direct(tiny_runner, "vqa", image_bytes, {"question": q})[0]["text"] for q in QUESTIONS}
    _vqa_concurrently(client, image_bytes, QUESTIONS * 2)  # warm: buffers and caches reach their size
    before = server.rss_bytes()
    start = time.monotonic()
    answered = []
    for _ in range(3):
        answers = _vqa_concurrently(client, image_bytes, QUESTIONS * 2)
        answered += [(q, a.status_code, a.json().get("text")) for q, a in zip(QUESTIONS * 2, answers)]
    assert time.monotonic() - start < 300
    assert [(q, 200, expected[q]) for q, _, _ in answered] == answered
    assert server.rss_bytes() - before < 64 << 20


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # ~10 kB on disk, 81 M pixels decoded
    return buffer.getvalue()


BAD_REQUESTS = [  # (task, multipart fields, files or JSON body, status, words of the detail)
    ("vqa", {"question": "q"}, {"image": b"not an image at all"}, 400, "image"),
    ("vqa", {"question": "q"}, {"image": "TRUNCATED"}, 400, "image"),
    ("vqa", {"question": "q"}, {"image": b""}, 400, "empty"),
    ("vqa", {"question": "q"}, {"image": "BOMB"}, 400, "pixels"),
    ("vqa", {"question": "q"}, {"image": b"x" * (MAX_BODY_MB << 20) + b"x"}, 413, "bytes"),
    ("nonsense", {"question": "q"}, {"image": "IMAGE"}, 404, "nonsense"),
    ("vqa", {}, {"image": "IMAGE"}, 400, "question"),
    ("vqa", {"question": "q"}, {}, 400, "image"),
    ("vqa", {"question": "   "}, {"image": "IMAGE"}, 400, "question is empty"),
    ("vqa", {"question": "why " * 300}, {"image": "IMAGE"}, 422, "tokens"),
    ("vqa", {"question": "q", "num_decodes": "many"}, {"image": "IMAGE"}, 400, "num_decodes"),
    ("vqa", {"question": "q", "num_decodes": "100"}, {"image": "IMAGE"}, 400, "num_decodes"),
    ("vqa", {"question": "q", "beam_search": "maybe"}, {"image": "IMAGE"}, 400, "beam_search"),
    ("region_caption", {"location": "10,10,5,20"}, {"image": "IMAGE"}, 422, "x1 < x2"),
    ("region_caption", {"location": "10,10,900,20"}, {"image": "IMAGE"}, 422, "not inside"),
    ("region_caption", {"location": "1,2,3"}, {"image": "IMAGE"}, 400, "4 numbers"),
    ("region_caption", {"location": "a,b,c,d"}, {"image": "IMAGE"}, 400, "4 numbers"),
    ("image_classification", {"answer_options": "cat,dog", "num_decodes": "2"}, {"image": "IMAGE"}, 422,
     "cannot be combined"),
    ("image_classification", {"answer_options": "cat," + "long " * 100}, {"image": "IMAGE"}, 422, "tokens"),
    ("run", {"prompt": "p", "text_len": "1"}, {}, 422, "no room for text"),
    ("run", {"prompt": "p", "text_len": "500"}, {}, 422, "text_len"),
    ("vqa", None, {"image": "/etc/passwd", "question": "q"}, 400, "base64"),
    ("vqa", None, {"image": "aGVsbG8=", "question": "q"}, 400, "image"),
    ("vqa", None, ["a", "list"], 400, "object"),
    ("segmentation_based_generation", None, {"binary_masks": ["%%%"], "labels": ["a"]}, 400, "base64"),
]


def _bad_request(client, image_bytes, task, data, files_or_json):
    if data is None:
        return client.post(f"/v1/{task}", json=files_or_json)
    special = {"IMAGE": image_bytes, "TRUNCATED": image_bytes[: len(image_bytes) // 2], "BOMB": _bomb()}
    files = [(key, ("f.png", special.get(value, value), "image/png")) for key, value in files_or_json.items()]
    return client.post(f"/v1/{task}", data=data, files=files)


@pytest.mark.parametrize("task, data, files_or_json, status, words", BAD_REQUESTS)
def test_bad_input_is_a_clear_4xx_and_the_server_goes_on(client, image_bytes, task, data, files_or_json, status,
                                                          words):
    answer = _bad_request(client, image_bytes, task, data, files_or_json)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "detail"} and words in body["detail"] and "Traceback" not in answer.text


def test_other_bad_requests_and_then_a_good_one(client, image_bytes):
    for response, status in [
            (client.post("/v1/vqa", content=b"question=q", headers={"content-type": "text/plain"}), 415),
            (client.post("/v1/vqa", content=b"{not json", headers={"content-type": "application/json"}), 400),
            (client.get("/v1/vqa"), 405),
            (client.post("/v1/vqa", data={"question": "why " * 300},
                         files=[("image", ("i.png", image_bytes, "image/png"))]), 422),
            (client.get("/static/..%2F..%2Fetc%2Fpasswd"), 404),
            (client.get("/static/app.py"), 404),
            # A generator body goes chunked, with no content-length: the cap applies as it arrives.
            (client.post("/v1/vqa", content=(b"x" * (1 << 20) for _ in range(MAX_BODY_MB + 1)),
                         headers={"content-type": "application/json"}), 413)]:
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error", "detail"}
    answer = client.post("/v1/vqa", data={"question": "what ?"}, files=[("image", ("i.png", image_bytes, "image/png"))])
    assert answer.status_code == 200 and isinstance(answer.json()["text"], str)
    text = client.get("/metrics").text
    assert re.search(r'uio_requests_total\{status="422",task="vqa"\} [1-9]', text)
    assert "uio_request_seconds_bucket" in text and "uio_queue_depth" in text and "uio_examples_total" in text


BUSY_REQUESTS = 12


def test_a_client_that_leaves_before_its_turn_is_not_computed(client, image_bytes):
    dropped = _metric(client, "uio_requests_dropped_total")
    examples = _metric(client, "uio_examples_total")
    # Sampled requests run one at a time: a dozen keep the model busy many times longer than the
    # leaving client needs to queue and go, however fast or loaded the machine is.
    busy = [threading.Thread(target=lambda: client.post(
        "/v1/pose", data={"location": "10,10,200,300"},
        files=[("image", ("i.png", image_bytes, "image/png"))])) for _ in range(BUSY_REQUESTS)]
    for thread in busy:
        thread.start()
    time.sleep(0.3)
    body = json.dumps({"image": base64.b64encode(image_bytes).decode(), "question": "gone ?"}).encode()
    with socket.create_connection(("127.0.0.1", client.base_url.port)) as raw:
        raw.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
    for thread in busy:
        thread.join(timeout=300)
    deadline = time.monotonic() + 30
    while _metric(client, "uio_requests_dropped_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(client, "uio_requests_dropped_total") == dropped + 1
    assert _metric(client, "uio_examples_total") == examples + BUSY_REQUESTS  # only the pose requests ran


class _SlowOrFailingRunner:
    """The tiny runner, but ``run()`` fails on prompts containing "boom" and waits ``delay`` seconds first."""

    def __init__(self, runner: ModelRunner, delay: float = 0.0):
        self._runner, self.delay = runner, delay

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def run(self, input_images, input_texts, *args, **kwargs):
        time.sleep(self.delay)
        if any("boom" in text for text in input_texts):
            raise RuntimeError("the model failed")
        return self._runner.run(input_images, input_texts, *args, **kwargs)


def _in_process(runner, **settings):
    from fastapi.testclient import TestClient

    from uio.server import ServerSettings, create_app

    client = TestClient(create_app(lambda: runner, ServerSettings(**settings)), raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return client


def _vqa_form(image_bytes: bytes, question: str = "what ?") -> dict:
    return {"data": {"question": question}, "files": [("image", ("i.png", image_bytes, "image/png"))]}


def test_a_token_is_required_where_set(tiny_runner, image_bytes):
    client = _in_process(tiny_runner, token="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            answer = client.post("/v1/vqa", headers=headers, **_vqa_form(image_bytes))
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
        assert client.get("/v1/tasks").status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        answer = client.post("/v1/vqa", headers={"Authorization": "Bearer s3cret"}, **_vqa_form(image_bytes))
        assert answer.status_code == 200, answer.text
    finally:
        client.__exit__(None, None, None)


def test_a_model_failure_fails_only_its_request_and_the_worker_goes_on(tiny_runner, image_bytes):
    client = _in_process(_SlowOrFailingRunner(tiny_runner))
    try:
        answer = client.post("/v1/vqa", **_vqa_form(image_bytes, "boom ?"))
        assert answer.status_code == 500 and answer.json() == {
            "error": "inference failed", "detail": "RuntimeError: the model failed"}
        answer = client.post("/v1/vqa", **_vqa_form(image_bytes))
        assert answer.status_code == 200, answer.text
    finally:
        client.__exit__(None, None, None)


def test_a_full_queue_answers_503_with_retry_after(tiny_runner, image_bytes):
    client = _in_process(_SlowOrFailingRunner(tiny_runner, delay=2.0), max_queue=1, max_batch=1, max_wait_ms=0)
    answers = []
    try:
        threads = [threading.Thread(target=lambda: answers.append(client.post("/v1/vqa", **_vqa_form(image_bytes))))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        for thread in threads:
            thread.join(timeout=120)
    finally:
        client.__exit__(None, None, None)
    busy = [answer for answer in answers if answer.status_code == 503]
    assert busy and busy[0].headers["retry-after"] == "1" and busy[0].json()["error"] == "busy"
    assert any(answer.status_code == 200 for answer in answers)


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["laptop", "phone"])
def test_the_page_runs_vqa_and_a_region_task_in_chromium(server, chromium, tmp_path, size):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(server.url)
        expect(page.locator("#task option")).to_have_count(len(TASKS) + 1)
        page.set_input_files("#file", _image_file(tmp_path))
        expect(page.locator("#canvas")).to_be_visible()
        page.select_option("#task", "vqa")
        page.fill("#arg-question", "what color is the sofa ?")
        page.click("#submit")
        first = page.locator(".result").first
        expect(first.locator(".answer")).not_to_be_empty(timeout=120_000)
        expect(first.locator("h2")).to_have_text("vqa")

        page.select_option("#task", "region_caption")
        canvas = page.locator("#canvas").bounding_box()
        page.mouse.move(canvas["x"] + canvas["width"] * 0.2, canvas["y"] + canvas["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] * 0.6, canvas["y"] + canvas["height"] * 0.7, steps=5)
        page.mouse.up()
        box = [float(v) for v in page.input_value("#arg-location").split(",")]
        assert 0 < box[0] < box[2] and 0 < box[1] < box[3]
        page.click("#submit")
        expect(page.locator(".result")).to_have_count(2, timeout=120_000)
        region = page.locator(".result").first
        expect(region.locator("h2")).to_have_text("region caption")
        expect(region.locator("img")).to_be_visible()
        drawn = page.evaluate("""() => { const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i+1] === 204 && d[i+2] === 0) n++;
            return n; }""")
        assert drawn > 100  # the box is drawn over the image

        page.select_option("#task", "region_caption")
        page.fill("#arg-location", "5, 5, 1, 1")
        page.click("#submit")
        expect(page.locator("#error")).to_contain_text("x1 < x2", timeout=60_000)
        page.screenshot(path=str(tmp_path / f"page-{size[0]}x{size[1]}.png"), full_page=True)
        browser.close()
    assert (tmp_path / f"page-{size[0]}x{size[1]}.png").stat().st_size > 10_000


def _image_file(tmp_path: Path) -> str:
    from uio.cli import demo_image

    path = tmp_path / "demo.png"
    Image.fromarray(demo_image()).save(path)
    return str(path)


def test_sigterm_under_load_drains_and_exits_0(server, client, image_bytes):
    """Last (it stops the module's server): requests in flight when SIGTERM comes are all answered."""
    answers = [None] * 6

    def ask(i: int) -> None:
        try:
            answers[i] = client.post("/v1/vqa", data={"question": QUESTIONS[i % 4]},
                                     files=[("image", ("i.png", image_bytes, "image/png"))]).status_code
        except httpx.TransportError as err:
            answers[i] = repr(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # all sent and queued or running
    assert server.stop() == 0
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [200] * 6
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=5)
    assert "Finished server process" in server.log.read_text()
