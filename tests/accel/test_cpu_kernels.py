"""uio's CPU kernels (uio.accel.cpu_kernels) against torch: a product, a decoder layer's step, and decoding."""
from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from uio.accel import cpu_kernels, layout, packing, transformer_ops
from uio.accel.hardware import cpu_has_bf16_kernels


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; skips where this machine cannot run it or has no C++ compiler to build it."""
    reason = cpu_kernels.unsupported_reason()
    if reason is not None:
        pytest.skip(f"uio's CPU kernel is not used here: {reason}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build uio's CPU kernel")
    assert cpu_kernels.load(wait=True), f"uio's CPU kernel did not build: {cpu_kernels.failure()}"
    return cpu_kernels.gemv


def stored_in_out(out_features: int, in_features: int) -> torch.Tensor:
    """An (out, in) weight stored as an (in, out) matrix, as float32 weights are."""
    return torch.randn(in_features, out_features).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
# A row at a time (1-2 rows); tiles of 4 rows, then one of 1-3 (5, 6, 7) or none (8, 16, 32).
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 16, 32])
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


@pytest.mark.parametrize("rows", [1, 3, 5])  # a row at a time; tiles of rows
@pytest.mark.parametrize("out_features, in_features", [(13, 37), (9, 5), (1, 3), (40, 70)])
def test_kernel_handles_sizes_off_its_vector_width(kernel, out_features, in_features, rows):
    x = torch.randn(rows, in_features)
    for weight in (stored_in_out(out_features, in_features), torch.randn(out_features, in_features)):
        torch.testing.assert_close(kernel(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 32])
def test_an_output_is_summed_alike_wherever_its_weight_row_lies(kernel, rows):
    """Products read weight rows from three parts of a thread's outputs at once (in tiles of 4 rows
    from 4 rows on): each output gets the same bits as when its weight row is multiplied alone."""
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 100), torch.randn(61, 100)
    alone = torch.cat([kernel(x, weight[o:o + 1]) for o in range(61)], dim=1)
    assert torch.equal(kernel(x, weight), alone)


def test_kernel_serves_only_what_it_computes(kernel, monkeypatch):
    weight, x = stored_in_out(64, 32), torch.randn(8, 32)
    assert cpu_kernels.serves(x, weight) and cpu_kernels.serves(x[:1], weight.T.contiguous().T)
    assert cpu_kernels.serves(torch.randn(cpu_kernels.MAX_ROWS, 32), weight)
    assert not cpu_kernels.serves(torch.randn(cpu_kernels.MAX_ROWS + 1, 32), weight)
    assert cpu_kernels.serves(x.bfloat16(), weight.bfloat16()) != cpu_has_bf16_kernels()  # oneDNN's serve there
    assert not cpu_kernels.serves(x.double(), weight.double())
    assert not cpu_kernels.serves(x, torch.randn(64, 64)[:, ::2])  # neither rows nor columns contiguous
    trained = torch.nn.Parameter(weight.detach().clone())
    assert not cpu_kernels.serves(x, trained)  # gradients wanted: the kernel has no backward
    with torch.no_grad():
        assert cpu_kernels.serves(x, trained)
    transformer_ops.linear(x, trained).sum().backward()
    torch.testing.assert_close(trained.grad, x.sum(0).expand(64, 32))
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not cpu_kernels.serves(x, weight)
    with pytest.raises(RuntimeError, match=f"at most {cpu_kernels.MAX_ROWS} rows"):
        torch.ops.uio_cpu.gemv(torch.randn(cpu_kernels.MAX_ROWS + 1, 32), weight)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        torch.ops.uio_cpu.gemv(x.double(), weight.double())


def packed_copies(model) -> list[torch.Tensor]:
    """The packed copies of ``model``'s decoding-step weights made so far (uio.accel.derived.FORMS)."""
    copies = []
    for weights, rows in transformer_ops.step_weight_groups(model):
        matrix = transformer_ops.fused(weights)
        packed = None if matrix is None else transformer_ops.packed_copy(weights, matrix[slice(*rows or (None,))], rows)
        copies += [] if packed is None else [packed]
    return copies


@pytest.mark.parametrize("examples", [2, 5])  # 4 and 10 rows a step
def test_decoding_with_the_kernel_gives_torchs_results(kernel, conformance, test_image, monkeypatch, examples):
    """Same outputs; and runners keep packed weight copies by default only where the kernels do not
    serve their steps."""
    from uio.runner import ModelRunner

    def run(**kwargs) -> tuple[dict, bool]:
        runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                             tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False, **kwargs)
        prompts = ["what is on the left ?", "describe"] * examples
        return (runner.run([test_image] * examples, prompts[:examples], output_text_len=6, generate_image=True,
                           num_decodes=2), bool(packed_copies(runner.model)))

    with_kernel, packed = run()
    assert not packed
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    without, packed = run()
    assert packed == packing.packed_matmul_supported(torch.float32)
    monkeypatch.setattr(cpu_kernels, "enabled", True)
    assert run(prepack=True)[1] == packing.packed_matmul_supported(torch.float32)
    for key in ("text_tokens", "image_tokens"):
        np.testing.assert_array_equal(with_kernel[key], without[key])
    np.testing.assert_allclose(with_kernel["score"], without["score"], rtol=1e-5)


def test_a_cpu_without_avx2_builds_nothing_and_decodes_as_the_kernels_do(kernel, conformance, test_image,
                                                                           monkeypatch, tmp_path):
    """Where torch finds no AVX2 (as on ARM CPUs), no build starts and models decode on torch's
    kernels without oneDNN's packed copies: the same outputs as the kernels'."""
    from uio.runner import ModelRunner

    def run() -> dict:
        runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                             tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False)
        assert packed_copies(runner.model) == [] and cpu_kernels.in_use(torch.float32) == with_kernels
        return runner.run([test_image] * 2, ["what is on the left ?", "describe"], output_text_len=6,
                          generate_image=True, num_decodes=2)

    with_kernels = True
    expected = run()
    forget_loading(monkeypatch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with_kernels = False
    assert not cpu_kernels.load() and "no AVX2" in cpu_kernels.failure() and list(tmp_path.iterdir()) == []
    got = run()
    for key in ("text_tokens", "image_tokens"):
        np.testing.assert_array_equal(got[key], expected[key])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5)


def test_bf16_decoding_with_the_layer_kernel_gives_torchs_bf16_layers_results(kernel, conformance, test_image,
                                                                              monkeypatch):
    """bf16 steps run the layer kernel, rounding as torch's bf16 layers do: the same beams' text.
    (Sampled image tokens may part where a rare bf16 ulp of difference moves a draw: 0.6% of them.)"""
    from uio.runner import ModelRunner

    skip_unless_layer_kernel_serves(torch.bfloat16)
    layer_step, serves_layer = cpu_kernels.decoder_layer_step, cpu_kernels.serves_decoder_layer
    kernel_steps = []
    monkeypatch.setattr(cpu_kernels, "decoder_layer_step", lambda x, *args: kernel_steps.append(x.dtype)
                        or layer_step(x, *args))

    def run() -> dict:
        runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin", dtype="bf16",
                             tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False)
        return runner.run([test_image] * 3, ["what is on the left ?", "describe", "what is it ?"], output_text_len=12,
                          num_decodes=2)

    with_kernel = run()
    assert kernel_steps and set(kernel_steps) == {torch.bfloat16}
    monkeypatch.setattr(cpu_kernels, "serves_decoder_layer", lambda x, *args: x.dtype == torch.float32
                        and serves_layer(x, *args))
    kernel_steps.clear()
    with_torch = run()
    assert not kernel_steps
    np.testing.assert_array_equal(with_kernel["text_tokens"], with_torch["text_tokens"])
    np.testing.assert_allclose(with_kernel["score"], with_torch["score"], rtol=1e-2)


@pytest.fixture
def never_loaded(monkeypatch, tmp_path):
    """The module as before any load, on a machine that can run the kernel, building into an empty
    ``tmp_path`` (builds are stood in for by the tests that use it)."""
    for name, value in (("_loaded", False), ("_failure", None), ("_building", False),
                        ("unsupported_reason", lambda: None)):
        monkeypatch.setattr(cpu_kernels, name, value)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))


def forget_loading(monkeypatch) -> None:
    """What a new process knows: nothing loaded or tried."""
    for name, value in (("_loaded", False), ("_failure", None), ("_building", False)):
        monkeypatch.setattr(cpu_kernels, name, value)


def test_a_failed_build_is_remembered_until_the_compiler_changes(monkeypatch, caplog, tmp_path, never_loaded):
    """A build that fails leaves torch's kernels, with one short warning naming its log; later
    processes neither build again nor repeat torch's output, until what the build depends on changes."""
    import warnings

    import torch.utils.cpp_extension

    builds = []

    def failing_build(*args, **kwargs):
        builds.append(kwargs["build_directory"])
        raise RuntimeError("Error building extension 'uio_cpu_kernels'\n" + "compiler output\n" * 100
                           + "c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    with caplog.at_level(logging.WARNING):
        assert not cpu_kernels.load(wait=True) and not cpu_kernels.load(wait=True)  # tried once
    assert cpu_kernels.failure() == "RuntimeError: c++: command not found" and len(builds) == 1
    assert not cpu_kernels.serves(torch.randn(1, 4), torch.randn(4, 4))
    log_file = cpu_kernels.build_folder().with_name(cpu_kernels.build_folder().name + ".failed")
    assert "compiler output" in log_file.read_text() and "compiler output" not in caplog.text
    assert caplog.text.count(f"could not build uio's CPU kernels (RuntimeError: c++: command not found; log: "
                             f"{log_file}") == 1
    for wait in (False, True):  # later processes, in the background or not
        forget_loading(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as python_warnings:
            assert not cpu_kernels.load(wait=wait)
        assert len(builds) == 1 and not python_warnings and len(caplog.records) == 1
        assert "failed to build here before (RuntimeError: c++: command not found" in caplog.text
    other_compiler = tmp_path / "c++"
    other_compiler.write_text("#!/bin/sh\nexec c++ \"$@\"\n")
    other_compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(other_compiler))
    forget_loading(monkeypatch)
    assert not cpu_kernels.load(wait=True) and len(builds) == 2


def test_a_build_says_so_once_and_later_loads_load_what_it_built(monkeypatch, caplog, never_loaded):
    """The build compiles into a folder of its own, renamed when complete; a later process loads
    the library from it without compiling."""
    import torch.utils.cpp_extension

    built, loaded = [], []

    def build(name, *args, build_directory, **kwargs):
        built.append(build_directory)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    folder = cpu_kernels.build_folder()
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.load(wait=True)
    assert caplog.text.count("compiling uio's CPU kernels (once per environment") == 1
    assert built == [str(folder.with_name(f"{folder.name}.part-{os.getpid()}"))]
    assert (folder / "uio_cpu_kernels.so").is_file() and not loaded
    forget_loading(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.load()
    assert loaded == [str(folder / "uio_cpu_kernels.so")] and len(built) == 1 and not caplog.text


def test_the_environment_can_turn_the_kernel_off(monkeypatch):
    monkeypatch.setenv("UIO_CPU_KERNEL", "0")
    assert cpu_kernels.unsupported_reason() == "UIO_CPU_KERNEL=0"


@pytest.mark.parametrize("shape", [(2048, 640), (48, 40), (37, 1001), (17, 33), (3, 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_transposing_copy_lays_out_a_transposed_view_as_rows(kernel, shape, threads):
    """How loading lays the decoder's (in, out) kernels out as (out, in) rows: sizes on and off
    its 16 x 8 blocks."""
    source = torch.randn(shape[::-1]).T
    target = torch.full(shape, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_kernels.copy(target, source) is target
    finally:
        torch.set_num_threads(before)
    assert torch.equal(target, source)


def test_copy_leaves_other_layouts_and_dtypes_to_torch(kernel):
    plain, rows = torch.randn(40, 24), torch.empty(40, 24)
    assert torch.equal(cpu_kernels.copy(rows, plain), plain)  # not a transposed view
    half = torch.randn(24, 40, dtype=torch.bfloat16).T
    assert torch.equal(cpu_kernels.copy(torch.empty(40, 24, dtype=torch.bfloat16), half), half)
    assert torch.equal(cpu_kernels.copy(torch.empty(24, 40).T, plain), plain)  # into a transposed view
    with pytest.raises(RuntimeError, match="transposed_copy: dst"):
        torch.ops.uio_cpu.transposed_copy(torch.empty(40, 24), plain)


def random_decoder_layer(emb_dim: int, heads: int, head_dim: int, mlp_dim: int, seed: int,
                         dtype: torch.dtype = torch.float32, decoder: bool = True):
    """A DecoderLayer with random weights in ``dtype``, its projections fused as models keep them:
    as a decoder's (``decoder``) or as an encoder's (fp32: (in, out) views; see stores_transposed)."""
    from uio.config import UnifiedIOConfig
    from uio.model.transformer import DecoderLayer

    torch.manual_seed(seed)
    layer = DecoderLayer(UnifiedIOConfig(emb_dim=emb_dim, num_heads=heads, head_dim=head_dim, mlp_dim=mlp_dim))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape) if "norm" in name else torch.randn(p.shape) / p.shape[-1] ** 0.5)
        layer.to(dtype)
    attention, cross, mlp = layer.self_attention, layer.encoder_decoder_attention, layer.mlp
    for linears, as_rows in (([attention.query, attention.key, attention.value], False),
                             ([cross.query, cross.key, cross.value], True), ([mlp.wi_0, mlp.wi_1], False)):
        layout.fuse_weights(linears, "cpu", dtype, decoder, as_rows)
    return layer.requires_grad_(False)


def kernel_takes_step(layer, x: torch.Tensor, cross_kv: list[torch.Tensor],
                      cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """The step of ``layer`` by uio's layer kernel (on copies of the caches, unmasked), where the
    fast decoder_layer_step gives it to the kernel; None where it leaves the step to torch."""
    keys, values, index = cache
    self_bias, cross_bias = torch.zeros(1, 1, 1, keys.shape[2]), torch.zeros(1, 1, 1, cross_kv[0].shape[2])
    return transformer_ops.decoder_layer_step(layer, x, (keys.clone(), values.clone(), index), self_bias, cross_kv,
                                              cross_bias)


def skip_unless_layer_kernel_serves(dtype: torch.dtype) -> None:
    if not cpu_kernels.serves_dtype(dtype):
        pytest.skip(f"this CPU has {dtype} kernels of its own: uio's kernels do not serve {dtype} steps")


@pytest.mark.parametrize("dtype, decoder", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "fp32-in-out", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows, examples", [(1, 1), (3, 3), (4, 2), (8, 8), (8, 1), (32, 16)])
@pytest.mark.parametrize("sizes", [(64, 3, 32, 128), (40, 2, 12, 36)], ids=["tiny", "off-vector-width"])
def test_decoder_layer_kernel_computes_torchs_step(kernel, sizes, rows, examples, threads, dtype, decoder):
    """One decoding step of a layer, by the kernel and by torch, on copies of the same caches: with
    masked cached keys and encoder positions, a row whose keys are all masked (it attends to all of
    them uniformly), and keys shared by an example's rows. In bf16 (float32 caches, as models keep
    them for torch's layers; bf16 ones give the kernel the same results, tested below) both round
    each operation's output to bf16: they agree up to a rare bf16 ulp where float32 roundings before
    it differ (the norm's, the attention's)."""
    from uio.model.masks import masked

    skip_unless_layer_kernel_serves(dtype)
    emb_dim, heads, head_dim, _ = sizes
    layer = random_decoder_layer(*sizes, seed=rows + examples, dtype=dtype, decoder=decoder)
    length, encoded, position = 11, 13, 6
    x = (3 * torch.randn(rows, 1, emb_dim)).to(dtype)
    keys, values = (torch.randn(rows, heads, length, head_dim) for _ in range(2))
    cross_kv = [torch.randn(examples, heads, encoded, head_dim) for _ in range(2)]
    key_valid = (torch.rand(rows, length) > 0.3) & (torch.arange(length) <= position)
    key_valid[0] = False  # every key masked
    self_bias = masked(torch.randn(1, heads, 1, length), key_valid[:, None, None, :])
    encoder_valid = torch.rand(examples, encoded) > 0.2
    cross_bias = masked(torch.zeros(()), encoder_valid[:, None, None, :])
    index = torch.tensor([position])

    def step(enabled: bool) -> tuple[torch.Tensor, ...]:
        cache = (keys.clone(), values.clone(), index)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        cpu_kernels.enabled = enabled
        try:
            assert (kernel_takes_step(layer, x, cross_kv, cache) is not None) == enabled
            return layer(x, self_bias, cross_kv, cross_bias, cache), *cache[:2]
        finally:
            cpu_kernels.enabled = True
            torch.set_num_threads(before)

    for got, expected in zip(step(True), step(False)):
        assert got.dtype == expected.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:  # at most a bf16 ulp (2^-8 to 2^-7 of the value), at a few positions
            torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=1e-6)
            assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("rows, examples", [(1, 1), (4, 2), (8, 8)])
def test_bf16_caches_give_what_float32_caches_of_the_same_values_give(kernel, rows, examples):
    """A bf16 layer's keys and values are bf16 values: kept in bf16 caches, the kernel reads them
    (half the bytes) and writes this step's exactly as it does with float32 caches."""
    skip_unless_layer_kernel_serves(torch.bfloat16)
    layer = random_decoder_layer(64, 3, 32, 128, seed=rows, dtype=torch.bfloat16)
    x = (3 * torch.randn(rows, 1, 64)).bfloat16()
    keys, values = (torch.randn(rows, 3, 11, 32).bfloat16() for _ in range(2))
    cross_kv = [torch.randn(examples, 3, 13, 32).bfloat16() for _ in range(2)]
    self_bias, cross_bias = torch.randn(1, 3, 1, 11), torch.zeros(examples, 1, 1, 13)
    self_bias[..., 8:] = -1e10  # keys not written yet

    def step(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        cache = (keys.to(dtype), values.to(dtype), torch.tensor([7]))
        caches = [t.to(dtype) for t in cross_kv]
        assert kernel_takes_step(layer, x, caches, cache) is not None
        return layer(x, self_bias, caches, cross_bias, cache), *cache[:2]

    for narrow, wide in zip(step(torch.bfloat16), step(torch.float32)):
        assert torch.equal(narrow.float(), wide.float())
    mixed = (keys, values, torch.tensor([7]))
    assert kernel_takes_step(layer, x, cross_kv[:1] + [cross_kv[1].float()], mixed) is None
    with pytest.raises(RuntimeError, match=r"cross_values must be BFloat16 \(as the keys\)"):
        cpu_kernels.decoder_layer_step(x, transformer_ops.kernel_weights(layer), mixed, self_bias, (cross_kv[0], cross_kv[1].float()),
                                       cross_bias, 1e-6)


def test_decoder_layer_kernel_leaves_steps_that_want_gradients_to_torch(kernel):
    layer = random_decoder_layer(64, 3, 32, 128, seed=0)
    x, keys, cross_kv = torch.randn(1, 1, 64), torch.zeros(1, 3, 4, 32), [torch.zeros(1, 3, 5, 32)] * 2
    cache = (keys, keys.clone(), torch.tensor([0]))
    assert kernel_takes_step(layer, x, cross_kv, cache) is not None
    layer.mlp.wo.weight.requires_grad_(True)
    assert kernel_takes_step(layer, x, cross_kv, cache) is None  # the kernel has no backward
    with torch.no_grad():
        assert kernel_takes_step(layer, x, cross_kv, cache) is not None
    assert kernel_takes_step(layer, x.double(), cross_kv, cache) is None
    assert kernel_takes_step(layer, x.bfloat16(), cross_kv, cache) is None  # weights in another dtype
    assert kernel_takes_step(layer, torch.randn(9, 1, 64), cross_kv, cache) is None  # more rows than it takes
    layer.mlp.wo.weight = torch.nn.Parameter(torch.randn(64, 256)[:, ::2], requires_grad=False)
    assert kernel_takes_step(layer, x, cross_kv, cache) is None  # neither its rows nor columns contiguous


def test_decoder_layer_kernel_refuses_what_it_does_not_compute(kernel):
    layer = random_decoder_layer(64, 3, 32, 128, seed=0)
    keys, cross = torch.zeros(2, 3, 4, 32), torch.zeros(1, 3, 5, 32)
    bias, first_position = torch.zeros(1, 1, 1, 4), torch.tensor([0])

    def call(x, keys=keys, index=first_position):
        return cpu_kernels.decoder_layer_step(x, transformer_ops.kernel_weights(layer), (keys, keys.clone(), index), bias,
                                              (cross, cross), torch.zeros(1, 1, 1, 5), 1e-6)

    assert call(torch.randn(2, 1, 64)).shape == (2, 1, 64)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        call(torch.randn(2, 1, 64).double())
    with pytest.raises(RuntimeError, match=r"qkv must be BFloat16 \(as x\)"):
        call(torch.randn(2, 1, 64).bfloat16())
    with pytest.raises(RuntimeError, match="position 4 outside the cache"):
        call(torch.randn(2, 1, 64), index=torch.tensor([4]))
    with pytest.raises(RuntimeError, match=r"keys must be .* \(1 or a divisor of it, 3, length, 32\), got \[2, 3, "):
        call(torch.randn(1, 1, 64))
    with pytest.raises(RuntimeError, match=r"got \[2, 3, 4, 32\] \(not contiguous\)"):
        call(torch.randn(2, 1, 64), keys=torch.zeros(2, 3, 32, 4).transpose(2, 3))
    with pytest.raises(RuntimeError, match="a row of keys per row of x"):
        call(torch.randn(4, 1, 64))
    with pytest.raises(RuntimeError, match=r"got \[0, 3, 4, 32\]"):  # not a division by zero
        call(torch.randn(0, 1, 64), keys=torch.zeros(0, 3, 4, 32))
    with pytest.raises(RuntimeError, match="caches must be float32 or x's dtype, got BFloat16"):
        call(torch.randn(2, 1, 64), keys=keys.bfloat16())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3520, 2048), (5, 2, 74), (1, 16), (33, 2)])
def test_gated_gelu_kernel_is_within_two_ulps_as_torchs_float32_is(kernel, shape, threads):
    """gelu(gate) * up (tanh approximation) of [gate | up] rows against float64: within 2 float32
    ulps of |gate * up| (the scale of the formula's rounding, where 1 + tanh cancels), as torch's
    float32 operations are (up to 1.3-1.5 ulps measured), for hidden sizes on and off the vector
    width, rows split between 1-3 threads, and inputs of more than two dimensions."""
    import torch.nn.functional as F

    torch.manual_seed(threads)
    x = torch.randn(shape) * 4
    gate, up = x.chunk(2, dim=-1)
    expected = F.gelu(gate.double(), approximate="tanh") * up.double()
    by_torch = F.gelu(gate, approximate="tanh") * up
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.gated_gelu(x)
    finally:
        torch.set_num_threads(before)
    assert got.shape == by_torch.shape and got.dtype == torch.float32
    two_ulps = 2 * torch.finfo(torch.float32).eps * (gate.double() * up.double()).abs()
    for result in (by_torch, got):
        assert ((result.double() - expected).abs() <= two_ulps).all()


def test_mlps_run_the_gated_gelu_kernel_only_where_it_serves(kernel, monkeypatch):
    from uio.model.transformer import MlpBlock

    calls = []
    gated_gelu = cpu_kernels.gated_gelu
    monkeypatch.setattr(cpu_kernels, "gated_gelu", lambda gate_up: calls.append(gate_up) or gated_gelu(gate_up))
    torch.manual_seed(0)
    mlp = MlpBlock(16, 24)
    x = torch.randn(3, 40, 16)
    by_torch = mlp(x)  # not fused: wi_0 and wi_1 apart
    layout.fuse_weights([mlp.wi_0, mlp.wi_1], "cpu", torch.float32, False, False)
    half = copy.deepcopy(mlp).to(torch.bfloat16)
    layout.fuse_weights([half.wi_0, half.wi_1], "cpu", torch.bfloat16, False, False)
    with torch.no_grad():
        served = mlp(x)
        assert len(calls) == 1
        half(x.bfloat16())
        monkeypatch.setattr(cpu_kernels, "enabled", False)
        fused_by_torch = mlp(x)
        monkeypatch.setattr(cpu_kernels, "enabled", True)
    mlp(x.requires_grad_())  # gradients wanted: the kernel has no backward
    assert len(calls) == 1
    for result in (served, fused_by_torch):
        torch.testing.assert_close(result, by_torch.detach(), rtol=1e-5, atol=1e-6)


def test_gated_gelu_kernel_refuses_what_it_does_not_compute(kernel):
    with pytest.raises(RuntimeError, match="contiguous float32 tensor with an even last dimension"):
        cpu_kernels.gated_gelu(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu_kernels.gated_gelu(torch.randn(8, 4).T)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu_kernels.gated_gelu(torch.randn(4, 8).bfloat16())


def cross_entropy_by_float64(logits: torch.Tensor, targets: torch.Tensor, divisor: float) -> tuple:
    """(loss in float64, the scale of float32's rounding of it: an ulp of the largest term it sums)."""
    import torch.nn.functional as F

    scaled = logits.double() / divisor
    loss = F.cross_entropy(scaled, targets, reduction="none")
    largest = scaled.amax(-1).abs() + scaled.gather(1, targets[:, None])[:, 0].abs() + loss.abs()
    return loss, torch.finfo(torch.float32).eps * largest


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows, classes", [(253, 33152), (7, 16384), (5, 13), (3, 1)])
def test_cross_entropy_kernel_is_as_close_to_float64_as_torchs(kernel, rows, classes, threads):
    """-log softmax(logits / divisor)[target] against float64: within 4 float32 ulps of its largest
    term, as torch's float32 F.cross_entropy of the divided logits is, for class counts on and off
    the vector width, rows split between 1-3 threads."""
    import torch.nn.functional as F

    torch.manual_seed(threads)
    logits, targets, divisor = torch.randn(rows, classes) * 30, torch.randint(0, classes, (rows,)), 512 ** 0.5
    expected, ulp = cross_entropy_by_float64(logits, targets, divisor)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.scaled_cross_entropy(logits, targets, divisor)
    finally:
        torch.set_num_threads(before)
    by_torch = F.cross_entropy(logits / divisor, targets, reduction="none")
    assert got.shape == (rows,) and got.dtype == torch.float32
    for result in (by_torch, got):
        assert ((result.double() - expected).abs() <= 4 * ulp).all()


def test_cross_entropy_kernel_gives_torchs_losses_for_masked_and_nan_logits(kernel):
    """Logits of -inf (masked classes) add nothing, as in torch; a NaN logit makes its row's loss
    NaN, as in torch, where the kernel's exp alone would turn it into a number."""
    import torch.nn.functional as F

    logits = torch.randn(4, 40)
    logits[0, 20:] = -float("inf")
    logits[1, 3] = float("nan")
    logits[2, 39] = float("nan")  # past the last full vector
    targets = torch.tensor([2, 0, 5, 7])
    got = cpu_kernels.scaled_cross_entropy(logits, targets, 3.0)
    by_torch = F.cross_entropy(logits / 3.0, targets, reduction="none")
    assert got[1:3].isnan().all() and by_torch[1:3].isnan().all()
    torch.testing.assert_close(got[[0, 3]], by_torch[[0, 3]], rtol=1e-6, atol=1e-6)


def test_cross_entropy_kernel_refuses_what_it_does_not_compute(kernel):
    targets = torch.tensor([0, 1])
    for logits in (torch.randn(2, 8).bfloat16(), torch.randn(8, 2).T, torch.randn(2, 0)):
        with pytest.raises(RuntimeError, match="contiguous float32"):
            cpu_kernels.scaled_cross_entropy(logits, targets, 2.0)
    with pytest.raises(RuntimeError, match="target 8 out of range for 8 classes"):
        cpu_kernels.scaled_cross_entropy(torch.randn(2, 8), torch.tensor([0, 8]), 2.0)
    with pytest.raises(RuntimeError, match="one per row"):
        cpu_kernels.scaled_cross_entropy(torch.randn(2, 8), torch.tensor([0]), 2.0)
    with pytest.raises(RuntimeError, match="divisor must be positive"):
        cpu_kernels.scaled_cross_entropy(torch.randn(2, 8), targets, 0.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape, groups", [((2, 64, 9, 7), 32), ((1, 40, 5, 7), 8), ((1, 512, 16, 16), 32)])
@pytest.mark.parametrize("swish", [False, True])
def test_group_norm_kernel_computes_the_vqgans_norm(kernel, shape, groups, swish, threads):
    """Against float64: channels on and off the vector width, a large mean (where E[x^2] - E[x]^2
    would cancel), with and without swish; in place or into a new tensor."""
    import torch.nn.functional as F

    torch.manual_seed(threads)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 30).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    expected = F.group_norm(x, groups, weight.double(), bias.double(), 1e-6)
    expected = F.silu(expected) if swish else expected
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.group_norm(x.float(), groups, weight, bias, 1e-6, swish, torch.empty_like(x.float()))
        in_place = x.float()
        cpu_kernels.group_norm(in_place, groups, weight, bias, 1e-6, swish, in_place)
    finally:
        torch.set_num_threads(before)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, in_place)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_group_norm_kernel_refuses_what_it_does_not_compute(kernel):
    x, weight = torch.randn(1, 64, 4, 4).to(memory_format=torch.channels_last), torch.ones(64)
    with pytest.raises(RuntimeError, match="x must be a channels-last float32"):
        cpu_kernels.group_norm(x.contiguous(), 32, weight, weight, 1e-6, False, x)
    with pytest.raises(RuntimeError, match="out must be channels-last float32 of x's shape"):
        cpu_kernels.group_norm(x, 32, weight, weight, 1e-6, False, torch.empty(1, 64, 4, 4))
    with pytest.raises(RuntimeError, match="64 channels in 24 groups"):
        cpu_kernels.group_norm(x, 24, weight, weight, 1e-6, False, x)
    with pytest.raises(RuntimeError, match=r"weight and bias must be contiguous float32 \(channels,\)"):
        cpu_kernels.group_norm(x, 32, weight[:32], weight, 1e-6, False, x)
