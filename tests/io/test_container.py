"""The Dockerfile: build the image and answer a question in a container (opt-in: ``UIO_TEST_CONTAINER=1``).

Building installs torch into an image (minutes, and downloads), so the default suite skips this. It
needs a working engine (``docker``, else ``podman``; or ``UIO_TEST_CONTAINER_ENGINE``). Where the
registry or torch's index cannot be reached, ``UIO_TEST_PYTHON_IMAGE`` and ``UIO_TEST_TORCH_INDEX_URL``
replace the base image and the index, and ``UIO_TEST_CONTAINER_BUILD_ARGS`` / ``_RUN_ARGS`` add engine
options. On a machine without registry access, with Debian's podman as root (docs/container.md):

    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \\
        bookworm rootfs http://deb.debian.org/debian
    tar -C rootfs -c . | podman import - localhost/uio-python:bookworm
    UIO_TEST_CONTAINER=1 UIO_TEST_CONTAINER_ENGINE=podman UIO_TEST_PYTHON_IMAGE=localhost/uio-python:bookworm \\
        UIO_TEST_TORCH_INDEX_URL=http://127.0.0.1:8765/simple \\
        UIO_TEST_CONTAINER_BUILD_ARGS="--isolation=chroot --network=host" \\
        UIO_TEST_CONTAINER_RUN_ARGS="--ulimit nofile=1024:1024 --ulimit nproc=1000:1000" \\
        python -m pytest -q tests/test_container.py

(with a local torch wheel served as ``simple/torch/`` at that address, ``runtime = "runc"`` in
containers.conf, and the machine's CA bundle and a pip.conf using it added to ``rootfs``.)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/unified-io:test"


def engine_works(engine: str) -> bool:
    if shutil.which(engine) is None:
        return False
    return subprocess.run([engine, "info"], capture_output=True, check=False, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def engine() -> str:
    if os.environ.get("UIO_TEST_CONTAINER") != "1":
        pytest.skip("builds a container image with torch (minutes, downloads): set UIO_TEST_CONTAINER=1")
    candidates = [os.environ["UIO_TEST_CONTAINER_ENGINE"]] if os.environ.get("UIO_TEST_CONTAINER_ENGINE") else [
        "docker", "podman"]
    for name in candidates:
        if engine_works(name):
            return name
    pytest.skip(f"no working container engine ({', '.join(candidates)}: missing, or `info` fails)")


@pytest.fixture(scope="module")
def image(engine) -> str:
    build_args = {"PYTHON_IMAGE": os.environ.get("UIO_TEST_PYTHON_IMAGE"),
                  "TORCH_INDEX_URL": os.environ.get("UIO_TEST_TORCH_INDEX_URL")}
    command = [engine, "build", "-t", TAG, *shlex.split(os.environ.get("UIO_TEST_CONTAINER_BUILD_ARGS", ""))]
    for name, value in build_args.items():
        if value:
            command += ["--build-arg", f"{name}={value}"]
    subprocess.run([*command, str(ROOT)], check=True, timeout=3600)
    return TAG


def run_in_container(engine: str, image: str, *command: str, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    options = shlex.split(os.environ.get("UIO_TEST_CONTAINER_RUN_ARGS", ""))
    volumes = [arg for mount in mounts for arg in ("-v", mount)]
    return subprocess.run([engine, "run", "--rm", "--network=none", *options, *volumes, image, *command],
                          capture_output=True, text=True, check=False, timeout=600)


def test_container_answers_as_a_user_with_the_kernels_built(engine, image, conformance):
    tiny = "/conformance/tiny"
    result = run_in_container(
        engine, image, "uio", "vqa", "/conformance/golden/test_image.png", "what is on the left ?", "--json",
        "--model", f"{tiny}/config.json", "--weights", f"{tiny}/tiny.bin",
        "--tokenizer", "/conformance/tokenizer/spiece.model", "--device", "cpu",
        mounts=(f"{conformance}:/conformance:ro",))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["command"] == "vqa"
    assert "compiling uio's CPU kernels" not in result.stderr

    # The cache volume must be writable by the image's user (a new volume copies the image's folder).
    probe = ("import os; from uio import hub; from uio.accel import cpu_kernels as k; "
             "(hub.cache_dir() / 'written').touch(); "
             "print(os.getuid(), hub.cache_dir(), k.load() or k.unsupported_reason())")
    result = run_in_container(engine, image, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    uid, cache, kernels = result.stdout.split(maxsplit=2)
    assert uid != "0" and cache == "/cache" and kernels.strip() != "False"
    assert "compiling uio's CPU kernels" not in result.stderr
