"""uio's CPU matrix-vector kernel (uio.model.gemv) against torch's matmul, alone and in decoding."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from uio.model import gemv
from uio.model.hardware import cpu_has_bf16_kernels


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; skips where this machine cannot run it or has no C++ compiler to build it."""
    reason = gemv.unsupported_reason()
    if reason is not None:
        pytest.skip(f"uio's CPU kernel is not used here: {reason}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build uio's CPU kernel")
    assert gemv.load(), f"uio's CPU kernel did not build: {gemv.failure()}"
    return gemv.gemv


def stored_in_out(out_features: int, in_features: int) -> torch.Tensor:
    """An (out, in) weight stored as an (in, out) matrix, as float32 weights are."""
    return torch.randn(in_features, out_features).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("layout", ["in-out", "out-in", "in-out rows of a wider matrix", "out-in rows of a table"])
def test_kernel_computes_x_times_weight_transposed(kernel, layout, rows, threads, dtype):
    torch.manual_seed(rows)
    weight = {"in-out": stored_in_out(1152, 512), "out-in": torch.randn(384, 1024),
              "in-out rows of a wider matrix": stored_in_out(1152, 512)[384:768],  # a fused matrix's key rows
              "out-in rows of a table": torch.randn(500, 64)[100:300]}[layout]
    weight = weight.to(dtype) if dtype == torch.float32 else weight.T.to(dtype).T  # .to keeps the strides
    x = torch.randn(rows, 1, weight.shape[1], dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(x, weight)
    finally:
        torch.set_num_threads(before)
    expected = (x.double() @ weight.double().T).to(dtype)  # the exact products of the dtype's values, rounded
    assert got.shape == (rows, 1, weight.shape[0]) and got.dtype == dtype
    # Sums of 64-1024 products of N(0, 1) values (magnitude ~8-32): float32 rounding, as torch's own,
    # then (bf16) one rounding of the float32 sum, which can land one bf16 step away.
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-2}
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("out_features, in_features", [(13, 37), (9, 5), (1, 3), (40, 70)])
def test_kernel_handles_sizes_off_its_vector_width(kernel, out_features, in_features):
    x = torch.randn(3, in_features)
    for weight in (stored_in_out(out_features, in_features), torch.randn(out_features, in_features)):
        torch.testing.assert_close(kernel(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_kernel_serves_only_what_it_computes(kernel, monkeypatch):
    weight, x = stored_in_out(64, 32), torch.randn(8, 32)
    assert gemv.serves(x, weight) and gemv.serves(x[:1], weight.T.contiguous().T)
    assert not gemv.serves(torch.randn(9, 32), weight)  # more rows than a decoding step's
    assert gemv.serves(x.bfloat16(), weight.bfloat16()) != cpu_has_bf16_kernels()  # oneDNN's serve there
    assert not gemv.serves(x.double(), weight.double())
    assert not gemv.serves(x, torch.randn(64, 64)[:, ::2])  # neither rows nor columns contiguous
    monkeypatch.setattr(gemv, "enabled", False)
    assert not gemv.serves(x, weight)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        torch.ops.uio_cpu.gemv(torch.randn(9, 32), weight)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        torch.ops.uio_cpu.gemv(x.double(), weight.double())


def test_decoding_with_the_kernel_gives_torchs_results(kernel, conformance, test_image, monkeypatch):
    from uio.runner import ModelRunner

    def run() -> dict:
        runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                             tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False)
        return runner.run([test_image] * 2, ["what is on the left ?", "describe"], output_text_len=6,
                          generate_image=True, num_decodes=2)

    with_kernel = run()
    monkeypatch.setattr(gemv, "enabled", False)
    without = run()
    for key in ("text_tokens", "image_tokens"):
        np.testing.assert_array_equal(with_kernel[key], without[key])
    np.testing.assert_allclose(with_kernel["score"], without["score"], rtol=1e-5)


@pytest.fixture
def never_loaded(monkeypatch):
    """The module as before any load, on a machine that can run the kernel (builds are stood in for)."""
    for name, value in (("_loaded", False), ("_failure", None), ("unsupported_reason", lambda: None)):
        monkeypatch.setattr(gemv, name, value)


def test_a_kernel_that_cannot_build_leaves_torchs_kernels(monkeypatch, caplog, never_loaded):
    import torch.utils.cpp_extension

    def failing_build(*args, **kwargs):
        raise RuntimeError("Error building extension 'uio_cpu_gemv'\nc++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    with caplog.at_level(logging.WARNING):
        assert not gemv.load() and not gemv.load()  # tried once
    assert gemv.failure() == "RuntimeError: c++: command not found"
    assert caplog.text.count("could not build uio's CPU matrix-vector kernel (RuntimeError: c++: command") == 1
    assert not gemv.serves(torch.randn(1, 4), torch.randn(4, 4))


@pytest.mark.parametrize("build_seconds, noticed", [(0.3, True), (0.0, False)])
def test_a_load_that_compiles_says_so(monkeypatch, caplog, build_seconds, noticed, never_loaded):
    import time

    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *args, **kwargs: time.sleep(build_seconds))
    monkeypatch.setattr(gemv, "COMPILING_NOTICE_AFTER_S", 0.1)
    with caplog.at_level(logging.WARNING):
        assert gemv.load()
    time.sleep(0.2)  # a notice still pending would have fired by now
    assert ("compiling uio's CPU matrix-vector kernel (once per machine" in caplog.text) == noticed


def test_the_environment_can_turn_the_kernel_off(monkeypatch):
    monkeypatch.setenv("UIO_CPU_KERNEL", "0")
    assert gemv.unsupported_reason() == "UIO_CPU_KERNEL=0"
