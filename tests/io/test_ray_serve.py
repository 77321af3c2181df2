"""``uio serve`` on Ray Serve: two replicas on a local Ray answer concurrent requests on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
pytest.importorskip("fastapi", reason="the server is an optional extra: pip install '.[serve]'")

from ray import serve  # noqa: E402

from uio import ray_serve  # noqa: E402
from uio.runner import ModelRunner  # noqa: E402
from uio.server import ServerSettings  # noqa: E402

QUESTIONS = [f"what is on the {place} ?" for place in ("left", "right", "table", "wall", "floor", "sofa")]
READY_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except (urllib.error.URLError, ConnectionError):
        return 0


@pytest.fixture(scope="module")
def server_url(tiny_runner_options):
    """Two replicas of the server app on a local Ray, served on 127.0.0.1; stopped after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServerSettings(max_batch=4, max_wait_ms=300)
        serve.run(ray_serve.deployment(tiny_runner_options, 0, settings, replicas=2), name="uio", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline, ready_in_a_row = time.monotonic() + READY_TIMEOUT_S, 0
        while ready_in_a_row < 8 and time.monotonic() < deadline:  # requests spread over both replicas
            ready_in_a_row = ready_in_a_row + 1 if _get(f"{url}/readyz") == 200 else 0
            time.sleep(0.2)
        assert ready_in_a_row == 8, "the replicas did not get ready"
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _vqa(url: str, image_bytes: bytes, question: str) -> dict:
    body = json.dumps({"image": base64.b64encode(image_bytes).decode(), "question": question}).encode()
    request = urllib.request.Request(f"{url}/v1/vqa", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def test_two_replicas_answer_concurrent_requests(server_url, tiny_runner_options, test_image):
    buffer = io.BytesIO()
    Image.fromarray(test_image).save(buffer, format="PNG")
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: _vqa(server_url, buffer.getvalue(), q), QUESTIONS))
    replicas = serve.status().applications["uio"].deployments["uio"].replica_states
    assert replicas.get("RUNNING") == 2
    assert max(answer["batch_size"] for answer in answers) > 1  # @serve.batch grouped requests
    runner = ModelRunner.from_pretrained(**tiny_runner_options)
    for question, answer in zip(QUESTIONS, answers):
        assert answer["text"] == runner.vqa(test_image, question)["text"], question
