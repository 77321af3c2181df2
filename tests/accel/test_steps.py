"""Faster decoding steps (uio.accel.steps): traced, graphed and compiled steps decode exactly what
eager steps decode; graphed caches kept for later calls; the attention state's dtype; options
scored by uio's CPU kernel."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from small_models import (
    assert_generations_equal,
    assert_generations_match,
    generations,
    on_one_thread,
    random_encoding,
    random_model,
    traces_of,
)

from uio import accel, generate
from uio.accel import cpu_kernels, packing, policy, steps
from uio.accel.derived import FORMS
from uio.accel.steps import AcceleratedDecoding, StepGraphs, StepTraces
from uio.model import ops
from uio.model.decoding import DecoderCache, decode_step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with on_one_thread():
        yield


def graphed_caches(model) -> steps.GraphedCaches:
    """The graphed caches kept for ``model``'s current step weights."""
    return FORMS.get("graphed caches", steps.step_weights(model), steps.GraphedCaches)


needs_tracing = pytest.mark.skipif(not StepTraces.available, reason="torch.jit.trace is unsupported on this Python")
PACKED = [pytest.param(dtype, True, False, id=f"{name}-packed", marks=pytest.mark.skipif(
    not packing.packed_matmul_supported(dtype), reason=f"this CPU has no oneDNN packed matmul for {name}"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]
KERNEL = pytest.param(torch.float32, False, True, id="fp32-cpu-kernel", marks=pytest.mark.skipif(
    cpu_kernels.unsupported_reason() is not None,
    reason=f"uio's CPU kernels are not used here: {cpu_kernels.unsupported_reason()}"))


@needs_tracing
@pytest.mark.parametrize("dtype, packed, kernel", [(torch.float32, False, False), KERNEL, *PACKED])
def test_traced_steps_decode_exactly_what_eager_steps_decode(dtype, packed, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    elif not cpu_kernels.load():
        pytest.fail("uio's CPU kernel did not build on a CPU that can run it (see the warning logged)")
    model = random_model(dtype, packed)
    eager = generations(model, traced=False)
    traced = generations(model, traced=True)
    assert_generations_equal(traced, eager)
    # One trace per step kind, decoded rows and examples they belong to: prompt lengths share them.
    kinds = [(1, 1), (2, 1), (2, 2), (4, 2)]  # (rows, examples)
    traces = traces_of(model).traces
    assert sorted(key[:3] for key in traces) == [(image, *kind) for image in (False, True) for kind in kinds]
    assert {key[-1] for key in traces} == {packed}
    for trace in traces.values():  # the kernels, or the packed copies, not the plain weights
        graph = str(trace.inlined_graph)
        assert ("uio_cpu::gemv" in graph, "mkldnn::_linear_pointwise" in graph) == (kernel, packed)
        # Every layer in one call; the output rows by the product kernel.
        layers = model.decoder.layers
        assert graph.count("uio_cpu::decoder_layer_step") == (len(layers) if kernel else 0)


@needs_tracing
def test_steps_under_autograd_run_eagerly():
    """Steps that may be differentiated run eagerly; the same steps without autograd are traced."""
    model = random_model()
    accel.settings(model).step_traces = True
    enc = model.encode(torch.tensor([[5, 6, 7]]), torch.zeros(1, 32, 32, 3))
    length = policy.MIN_TRACED_STEPS  # enough steps to pay for a trace
    decoding = ops.decoding(model, enc, length, 0, 1)
    assert isinstance(decoding, AcceleratedDecoding)
    logits = decoding.step(torch.tensor([0]), 0, torch.tensor([True]))
    assert logits.shape == (1, 96) and not traces_of(model).traces
    with torch.no_grad():
        ops.decoding(model, enc, length, 0, 1).step(torch.tensor([0]), 0, torch.tensor([True]))
    assert len(traces_of(model).traces) == 1


@needs_tracing
def test_steps_too_few_to_pay_for_a_trace_run_eagerly():
    model = random_model()
    accel.settings(model).step_traces = True
    generate.beam_search(model, random_encoding(model, 1, 5), 1, 8)  # one text step, then 8 image steps
    assert [key[0] for key in traces_of(model).traces] == [True]


@needs_tracing
def test_steps_of_weights_that_want_gradients_run_eagerly(caplog):
    """A trace holds the weights as constants, which cannot want gradients: such a model's steps run
    eagerly (decoding what they decode), without a failed trace, and are traced once it is frozen."""
    model = random_model()
    eager = generations(model, traced=False)
    model.requires_grad_(True)
    assert_generations_equal(generations(model, traced=True), eager)
    assert traces_of(model) is None and "tracing" not in caplog.text
    model.requires_grad_(False)
    assert_generations_equal(generations(model, traced=True), eager)
    assert traces_of(model).traces


@needs_tracing
def test_a_failed_trace_falls_back_to_eager_steps(monkeypatch, caplog):
    model = random_model()
    eager = generations(model, traced=False)

    def failing_trace(fn, args, **kwargs):
        fn(*args)  # fail after the step ran, as a tracer error at the end would
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(torch.jit, "trace", failing_trace)
    traced = generations(model, traced=True)
    assert_generations_equal(traced, eager)
    assert traces_of(model).failed and not traces_of(model).traces
    assert "tracing a decoding step failed (RuntimeError: unsupported operation)" in caplog.text


def traced_recording(replays: list) -> Callable:
    """A CPU stand-in for ``record_cuda_graph`` with a CUDA graph's semantics: replays run the
    recorded operations on the recorded tensors (the trace holds them as constants), and the
    Python values of the recorded step are fixed. Appends to ``replays`` at each replay."""
    def record(run):
        output = run()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = torch.jit.trace(run, (), check_trace=False)

        def replay():
            with torch.jit.optimized_execution(False):  # the optimiser would fold the constants' operations
                replays.append(output.copy_(trace()))
        return replay, output
    return record


@needs_tracing
def test_graphed_steps_decode_exactly_what_eager_steps_decode(monkeypatch):
    """Every step input that changes reaches the recorded step through its buffers, and beam
    search reorders the caches in place, where the recorded step reads them."""
    model = random_model()
    eager = generations(model, traced=False)
    replays = []
    monkeypatch.setattr(StepGraphs, "record", staticmethod(traced_recording(replays)))
    accel.settings(model).cuda_graphs = True
    graphed = generations(model, traced=False)
    assert_generations_equal(graphed, eager)
    assert len(replays) == 12 * (8 + 9)  # 12 calls of 8 text and 9 image steps: every step replayed
    assert_generations_equal(generations(model, traced=False), eager)  # on kept caches and graphs too


@needs_tracing
def test_graphs_are_kept_for_later_calls_of_the_same_shapes(monkeypatch):
    replays, recorded = [], []
    record = traced_recording(replays)
    monkeypatch.setattr(StepGraphs, "record", staticmethod(lambda run: recorded.append(1) or record(run)))
    model = random_model()
    eager = [generate.beam_search(model, random_encoding(model, 1, length), 3, 4, num_beams=2) for length in (5, 6)]
    accel.settings(model).cuda_graphs = True
    kept = graphed_caches(model)
    first = generate.beam_search(model, random_encoding(model, 1, 5), 3, 4, num_beams=2)
    assert len(recorded) == 1 and len(replays) == 4  # 3 text steps: too few to pay for recording them
    again = generate.beam_search(model, random_encoding(model, 1, 5), 3, 4, num_beams=2)
    assert len(recorded) == 2 and len(replays) == 4 + 7  # the image graph replayed; now worth recording text
    other = generate.beam_search(model, random_encoding(model, 1, 6), 3, 4, num_beams=2)  # another encoder length
    assert len(recorded) == 3 and len(kept) == 2
    for got, expected in zip([first, again, other], [eager[0], eager[0], eager[1]]):
        assert_generations_equal([got.tokens, got.scores], [expected.tokens, expected.scores])
    mlp = model.decoder.layers[0].mlp
    mlp.wo.weight = torch.nn.Parameter(mlp.wo.weight.clone(), requires_grad=False)
    # Graphs read the weights where they were recorded: a replaced weight gets caches (and graphs) of its own.
    replaced = generate.beam_search(model, random_encoding(model, 1, 5), 3, 4, num_beams=2)
    assert_generations_equal([replaced.tokens, replaced.scores], [eager[0].tokens, eager[0].scores])
    assert graphed_caches(model) is not kept and len(graphed_caches(model)) == 1 and len(recorded) == 4
    kept = graphed_caches(model)
    for length in range(7, 7 + policy.MAX_IDLE_GRAPHED_CACHES):
        generate.beam_search(model, random_encoding(model, 1, length), 3, 4, num_beams=2)
    assert len(kept) == policy.MAX_IDLE_GRAPHED_CACHES
    model.to(torch.float64)
    assert graphed_caches(model) is not kept and len(graphed_caches(model)) == 0


@needs_tracing
def test_a_generation_takes_a_kept_cache_only_when_no_other_holds_it():
    model = random_model()
    accel.settings(model).cuda_graphs = True
    enc, pool = random_encoding(model, 1, 5), graphed_caches(model)
    first, second = (pool.take(model, enc, 8, 0, 1, torch.float32) for _ in range(2))
    assert first is not second  # both in use at once
    first.graphs.graphs[False] = "recorded"  # only caches with graphs are kept
    pool.put_back(first)
    assert pool.take(model, enc, 8, 0, 1, torch.float32) is first
    assert pool.take(model, enc, 8, 0, 1, torch.float32) is not first


@needs_tracing
def test_kept_graphed_caches_stay_within_their_memory_bound(monkeypatch):
    model = random_model()
    accel.settings(model).cuda_graphs = True
    kept = graphed_caches(model)
    caches = [kept.take(model, random_encoding(model, 1, length), 8, 0, 1, torch.float32) for length in (5, 6, 7)]
    for cache in caches:
        cache.graphs.graphs[False] = "recorded"
    monkeypatch.setattr(steps, "MAX_IDLE_GRAPHED_BYTES", caches[0].nbytes() + caches[1].nbytes())
    for cache in caches:
        kept.put_back(cache)
    assert len(kept) == 1 and kept.nbytes() == caches[2].nbytes()  # the most recent; two would not fit
    assert caches[0].nbytes() < caches[1].nbytes() < caches[2].nbytes()  # longer prompts, more cross keys


@needs_tracing
def test_graphs_of_a_compiled_model_record_its_compiled_step(monkeypatch):
    replays, compiled_calls = [], []
    monkeypatch.setattr(StepGraphs, "record", staticmethod(traced_recording(replays)))
    model = random_model()
    eager = generate.beam_search(model, random_encoding(model, 1, 5), 8, 9)

    def compiled_step(*args):  # stands for torch.compile(decode_step)
        compiled_calls.append(args[-1])
        return decode_step(*args)

    monkeypatch.setattr(steps, "_compiled_step", lambda: compiled_step)
    chosen = accel.settings(model)
    chosen.compiled, chosen.cuda_graphs = True, True
    graphed = generate.beam_search(model, random_encoding(model, 1, 5), 8, 9)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.scores, eager.scores)
    assert len(replays) == 8 + 9
    assert compiled_calls == [False, False, True, True]  # only while recording (the stand-in runs it twice)


@needs_tracing
def test_a_failed_graph_recording_falls_back_to_eager_steps(monkeypatch, caplog):
    model = random_model()
    eager = generations(model, traced=False)

    def failing_record(run):
        run()  # fail after the step ran, as an error at the end of a recording would
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "record", staticmethod(failing_record))
    accel.settings(model).cuda_graphs = True
    assert_generations_equal(generations(model, traced=False), eager)
    assert not accel.settings(model).cuda_graphs
    assert caplog.text.count("recording a decoding step as a CUDA graph failed (RuntimeError: operation not") == 1


@needs_tracing
def test_a_model_converted_on_the_cpu_traces_its_steps_instead_of_graphing_them():
    model = random_model()
    accel.settings(model).cuda_graphs = True
    model.to(torch.float64)
    assert not accel.settings(model).cuda_graphs and accel.settings(model).step_traces


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_decode_what_eager_cuda_steps_decode(dtype):
    model = random_model(dtype)
    accel.settings(model).step_traces = True
    model.to("cuda")  # a traced CPU model records CUDA graphs once on a GPU
    assert accel.settings(model).cuda_graphs and not accel.settings(model).step_traces
    graphed = generations(model, traced=False)
    again = generations(model, traced=False)  # on the caches and graphs kept from the first calls
    accel.settings(model).cuda_graphs = False
    eager = generations(model, traced=False)
    for got in (graphed, again):
        assert_generations_match(got, eager, tolerance=1e-5)


def step_logits(model, enc, tokens: torch.Tensor) -> tuple[DecoderCache, torch.Tensor]:
    """The logits of eager decoding steps feeding ``tokens`` (rows, steps) one at a time, and their cache."""
    rows, steps_ = tokens.shape
    with torch.inference_mode():
        decoding = ops.decoding(model, enc, steps_, 0, rows // enc.hidden.shape[0])
        logits = [decoding.step(tokens[:, i], i, torch.ones(rows, dtype=torch.bool)) for i in range(steps_)]
    return decoding.cache, torch.stack(logits, dim=1)


def attention_dtypes(cache: DecoderCache) -> set[torch.dtype]:
    return {cache.keys[0].dtype, cache.cross_kv[0][0].dtype, cache.self_bias.dtype, cache.cross_bias.dtype}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_steps_attend_in_float32(dtype, monkeypatch):
    """Half-precision models keep a CPU step's attention state (caches, biases) in fp32 for torch's
    attention, which holds the half-precision values exactly: steps compute what steps on
    half-precision state and the teacher-forced pass compute, up to the rounding of accumulations
    (a logit's last bit)."""
    monkeypatch.setattr(cpu_kernels, "enabled", False)  # the layer kernel keeps bf16 state (below)
    model = random_model(dtype)
    enc = random_encoding(model, 2, 5)
    tokens = torch.randint(2, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    cache, wide = step_logits(model, enc, tokens)
    assert attention_dtypes(cache) == {torch.float32}
    with torch.inference_mode():
        forced = model.decode(enc, tokens, tokens[:, :0], torch.ones_like(tokens, dtype=torch.bool), tokens[:, :0])
    monkeypatch.setattr(steps, "attention_dtype", lambda model, hidden, rows: hidden.dtype)
    cache, narrow = step_logits(model, enc, tokens)
    assert cache.keys[0].dtype == dtype
    ulps = 2 * torch.finfo(dtype).eps  # the logits come out of a half-precision matmul
    torch.testing.assert_close(wide, narrow, rtol=ulps, atol=ulps)
    torch.testing.assert_close(wide, forced[..., :model.cfg.vocab_size], rtol=ulps, atol=ulps)


def test_answer_options_are_scored_by_the_cross_entropy_kernel_only_where_it_serves(monkeypatch):
    """Ranking options computes its losses with the kernel (and with torch where kernels are off,
    within float32 rounding of each other); logits that want gradients go to torch."""
    if cpu_kernels.unsupported_reason() is not None or not cpu_kernels.load():
        pytest.skip("uio's CPU kernels are not used here")
    calls = []
    by_kernel = cpu_kernels.scaled_cross_entropy
    monkeypatch.setattr(cpu_kernels, "scaled_cross_entropy", lambda *args: calls.append(args) or by_kernel(*args))
    model = random_model()
    enc = random_encoding(model, 2, 5)
    options = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 1]])
    served = generate.score_text_options(model, enc, options)
    assert len(calls) == 1  # one chunk of logits
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    by_torch = generate.score_text_options(model, enc, options)
    monkeypatch.setattr(cpu_kernels, "enabled", True)
    torch.testing.assert_close(served, by_torch, rtol=1e-6, atol=1e-6)
    hidden = torch.randn(3, model.cfg.emb_dim, requires_grad=True)
    loss = ops.negative_log_likelihood(hidden, model.token_embedder.weight, slice(0, 50), torch.tensor([1, 2, 3]))
    loss.sum().backward()
    assert len(calls) == 1 and hidden.grad is not None


def test_bf16_cpu_steps_of_the_layer_kernel_keep_bf16_attention_state(monkeypatch):
    """Where uio's CPU kernel runs a bf16 model's decoder layers, steps keep their attention state in
    bf16 (the kernel reads it at half the bytes): the logits of float32 state, exactly."""
    if cpu_kernels.unsupported_reason() is not None or not cpu_kernels.load():
        pytest.skip("uio's CPU kernels are not used here")
    if not cpu_kernels.serves_dtype(torch.bfloat16):
        pytest.skip("this CPU has bf16 kernels of its own: uio's kernels do not serve bf16 steps")
    model = random_model(torch.bfloat16)
    enc = random_encoding(model, 2, 5)
    tokens = torch.randint(2, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    cache, narrow = step_logits(model, enc, tokens)
    assert attention_dtypes(cache) == {torch.bfloat16}
    rows_beyond = policy.KERNEL_MAX_ROWS + 1
    assert steps.attention_dtype(model, enc.hidden, rows_beyond) == torch.float32
    monkeypatch.setattr(steps, "attention_dtype", lambda model, hidden, rows: torch.float32)
    cache, wide = step_logits(model, enc, tokens)
    assert attention_dtypes(cache) == {torch.float32}
    assert torch.equal(narrow, wide)
