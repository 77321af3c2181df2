"""Shared fixtures: the conformance oracle (../shared/conformance, or $UIO_CONFORMANCE)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "conformance"
CONFORMANCE = Path(os.environ.get("UIO_CONFORMANCE", _DEFAULT))


def pytest_sessionstart(session) -> None:
    """Build (or wait for) and load uio's CPU kernels before any test, so every test sees one state."""
    from uio.accel import cpu_kernels

    cpu_kernels.load(wait=True)


def pytest_report_header(config) -> str:
    """Whether uio's CPU kernels are built and used."""
    from uio.accel import cpu_kernels

    return "uio CPU kernels: " + ("loaded" if cpu_kernels.available() else f"not used ({cpu_kernels.failure()})")


@pytest.fixture
def without_cpu_kernel(monkeypatch):
    """Decode with torch's kernels even where uio's CPU kernel is loaded (for tests of those paths)."""
    from uio.accel import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "enabled", False)


@pytest.fixture
def fast_convolution_ops():
    """The VQGAN's operations by uio.accel.convolution's faster versions (the reference's again after)."""
    from uio.accel.convolution import FAST_OPS
    from uio.model import ops

    for name, function in FAST_OPS.items():
        ops.register(name, function)
    yield FAST_OPS
    ops.reset()


@pytest.fixture(scope="session")
def conformance() -> Path:
    """Path of the conformance folder; skips the test where it is absent."""
    if not (CONFORMANCE / "NOTES.md").is_file():
        pytest.skip(f"conformance oracle not found at {CONFORMANCE} (set UIO_CONFORMANCE to its path)")
    return CONFORMANCE


@pytest.fixture(scope="session")
def golden(conformance):
    """Load ``golden/<name>`` (.npz as a dict of arrays, .json as parsed JSON)."""
    cache = {}

    def load(name: str):
        if name not in cache:
            path = conformance / "golden" / name
            cache[name] = json.loads(path.read_text()) if name.endswith(".json") else dict(np.load(path))
        return cache[name]

    return load


@pytest.fixture(scope="session")
def test_image(conformance) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(conformance / "golden" / "test_image.png").convert("RGB"))


@pytest.fixture(scope="session")
def tiny_model(conformance):
    """The reference's tiny random checkpoint loaded into our model (fp32, CPU)."""
    import torch

    from uio.runner import build_model

    torch.manual_seed(0)
    return build_model(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin")



@pytest.fixture(scope="session")
def tiny_runner_options(conformance) -> dict:
    """``ModelRunner.from_pretrained`` arguments for the tiny checkpoint on the CPU."""
    return {"size": str(conformance / "tiny" / "config.json"), "weights": str(conformance / "tiny" / "tiny.bin"),
            "tokenizer": str(conformance / "tokenizer" / "spiece.model"), "device": "cpu", "log_inputs": False}


@pytest.fixture(scope="module")
def model_args(tiny_runner_options) -> list[str]:
    """CLI options selecting the tiny checkpoint, the synthetic vocabulary and the CPU."""
    return [arg for key in ("model", "weights", "tokenizer", "device")
            for arg in (f"--{key}", tiny_runner_options["size" if key == "model" else key])]


@pytest.fixture(scope="module")
def tiny_runner(tiny_runner_options):
    """A ModelRunner of the tiny checkpoint (one per test module)."""
    from uio.runner import ModelRunner

    return ModelRunner.from_pretrained(**tiny_runner_options)
