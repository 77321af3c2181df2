"""Beam search, sampling and answer-option scoring against the reference."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pytest
import torch

from uio import generate
from uio.config import UnifiedIOConfig, VAEConfig
from uio.accel import cpu_kernels
from uio.model import transformer
from uio.model.transformer import (DecoderCache, StepGraphs, StepTraces, UnifiedIO, decode_step,
                                   packed_matmul_supported)

SCORE_ATOL = 1e-2  # sums of up to 257 log-probs (the golden README's hint)


def t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def encode(model, g, prefix, skip_padding=False):
    with torch.inference_mode():
        return model.encode(t(g[prefix + "text_encoder_inputs"]).long(), t(g[prefix + "image_encoder_inputs"]), None,
                            t(g[prefix + "image_input_masks"]), skip_padding)


# The goldens' images pad 144 of 576 patches (and "image/" pads a prompt and masks a whole image):
# generation and scoring must match the reference with padded positions computed or skipped.
skip_padding = pytest.mark.parametrize("skip", [False, True], ids=["all_positions", "skip_padding"])


@skip_padding
@pytest.mark.parametrize("num_beams", [1, 4])
def test_text_beam_search(tiny_model, golden, num_beams, skip):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "text/", skip), 32, 1, num_beams)
    np.testing.assert_array_equal(out.tokens.numpy(), g[f"text/nd{num_beams}/text_tokens"])
    np.testing.assert_allclose(out.scores.numpy(), g[f"text/nd{num_beams}/scores"], atol=SCORE_ATOL, rtol=0)
    assert (out.scores.diff(dim=1) >= 0).all(), "beams come back worst-first"


@skip_padding
def test_image_beam_search(tiny_model, golden, skip):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "image/", skip), 1, 256, 1)
    np.testing.assert_array_equal(out.tokens[..., :1].numpy(), g["image/text_tokens"])
    np.testing.assert_array_equal(out.tokens[..., 1:].numpy() - 33152, g["image/image_tokens"])
    np.testing.assert_allclose(out.scores.numpy(), g["image/scores"], atol=SCORE_ATOL, rtol=0)
    with torch.inference_mode():
        image = tiny_model.discrete_vae.decode_codes(out.tokens[:, 0, 1:] - 33152)
    np.testing.assert_allclose(((image + 1) / 2).clamp(0, 1).numpy(), g["image/image"][:, 0], atol=1e-4)


def test_sampling_is_reproducible_and_sorted(tiny_model, golden):
    g = golden("generation.npz")
    enc = encode(tiny_model, g, "text/")
    runs = [generate.sample(tiny_model, enc, 8, 1, 3, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].scores.diff(dim=1) >= 0).all()
    text, image = runs[0].tokens[..., :8], runs[0].tokens[..., 8:]
    assert (text < 33152).all() and (image >= 33152).all()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = generate._top_p_filter(logits, 0.7) > generate.BEAM_NEG_INF
    assert kept.tolist() == [[True, True, False, False]]
    kept = generate._top_p_filter(logits, 0.9) > generate.BEAM_NEG_INF
    assert kept.tolist() == [[True, True, True, False]]


def test_draw_follows_the_distribution_and_never_picks_filtered_ids():
    probs = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.2, 0.0])  # filtered ids first, between and last
    logits = torch.log(probs).clamp(min=generate.BEAM_NEG_INF).expand(40000, 6)
    drawn = generate._draw(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=6) / drawn.numel()
    np.testing.assert_allclose(frequencies.numpy(), probs.numpy(), atol=0.01)
    assert frequencies[[0, 3, 5]].sum() == 0
    rows = torch.randn(3, 50)
    assert torch.equal(generate._draw(generate._top_p_filter(rows, 1e-9), None), rows.argmax(dim=1))


def test_sorted_descending_matches_torch_sort():
    logits = torch.randn(3, 1000)
    assert torch.equal(generate._sorted_descending(logits), logits.sort(dim=-1, descending=True).values)


def test_top_matches_torch_topk_and_keeps_the_first_of_ties():
    values = torch.randn(3, 1000)
    for k in (1, 3):
        expected = values.topk(k, dim=1)
        got = generate._top(values, k)
        assert torch.equal(got[0], expected.values) and torch.equal(got[1], expected.indices)
    tied = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    top_values, top_index = generate._top(tied, 1)
    assert top_index.tolist() == [[1], [0]] and top_values.tolist() == [[2.0], [5.0]]


def test_sampling_with_tiny_top_p_is_greedy(tiny_model, golden):
    g = golden("generation.npz")
    enc = encode(tiny_model, g, "text/")
    sampled = generate.sample(tiny_model, enc, 32, 1, 1, top_p=1e-9)
    np.testing.assert_array_equal(sampled.tokens.numpy(), g["text/nd1/text_tokens"])


@skip_padding
@pytest.mark.parametrize("average", [0, 1])
def test_text_answer_options(tiny_model, golden, average, skip):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/", skip)
    options = t(a["inputs/output_options"][0]).long()
    losses = generate.score_text_options(tiny_model, enc, options, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"text/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)
    best = losses.argmin(1)
    np.testing.assert_array_equal(options[best].numpy(), a[f"text/avg{average}/text_tokens"])


def test_text_answer_options_in_chunks(tiny_model, golden, monkeypatch):
    """Two options per decoder pass, and the logits of one position at a time."""
    monkeypatch.setattr(generate, "LOGITS_CHUNK_ELEMS", 1)
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/")
    losses = generate.score_text_options(tiny_model, enc, t(a["inputs/output_options"][0]).long(), max_options=2)
    np.testing.assert_allclose(losses.numpy(), a["text/avg0_max_options2/all_scores"], atol=SCORE_ATOL, rtol=1e-4)


@skip_padding
@pytest.mark.parametrize("average", [0, 1])
def test_image_answer_options(tiny_model, golden, average, skip):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/", skip)
    with torch.inference_mode():
        codes = tiny_model.discrete_vae.encode_to_codes(t(a["inputs/image_output_options"]))
    masks = t(a["inputs/image_output_options_masks"]).long()
    losses = generate.score_image_options(tiny_model, enc, codes, masks, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"image/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)


SMALL_CONFIG = UnifiedIOConfig(vocab_size=96, image_vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                              num_encoder_layers=2, num_decoder_layers=2)
SMALL_VAE_CONFIG = VAEConfig(embed_dim=32, n_embed=64, z_channels=32, ch=32, ch_mult=(1,), num_res_blocks=1,
                             attn_resolutions=())


def random_model(dtype: torch.dtype = torch.float32, packed: bool = False) -> UnifiedIO:
    """A small randomly initialised network on the CPU, fused (and packed) like a loaded one; oracle-free."""
    torch.manual_seed(0)
    model = UnifiedIO(SMALL_CONFIG, SMALL_VAE_CONFIG).eval().requires_grad_(False)
    for table in (model.decoder.relpos_bias.rel_embedding, model.decoder.relpos_bias.image_rel_embedding):
        torch.nn.init.normal_(table)  # initialised to zeros: give the position biases a part
    model.to(dtype).fuse_projections()
    if packed:
        model.prepack_decoder()
    return model


def random_encoding(model, batch: int, prompt_length: int):
    generator = torch.Generator().manual_seed(batch * 100 + prompt_length)
    tokens = torch.randint(2, model.cfg.vocab_size, (batch, prompt_length), generator=generator)
    images = torch.randn(batch, 32, 32, 3, generator=generator)
    weight = model.token_embedder.weight
    with torch.inference_mode():
        return model.encode(tokens.to(weight.device), images.to(weight.device, weight.dtype))


def generations(model, traced: bool) -> list[torch.Tensor]:
    """Beam search (which reorders the caches), greedy search and sampling, text then image steps,
    for two prompt lengths and two batch sizes (so two examples' greedy rows and one example's two
    beams both decode two rows)."""
    model.step_traces = StepTraces() if traced else None
    outputs = []
    for prompt_length in (5, 9):
        for batch in (1, 2):
            enc = random_encoding(model, batch, prompt_length)
            beams = generate.beam_search(model, enc, 8, 9, num_beams=2)
            greedy = generate.beam_search(model, enc, 8, 9, num_beams=1)
            generator = torch.Generator(enc.hidden.device).manual_seed(1)
            samples = generate.sample(model, enc, 8, 9, num_samples=2, generator=generator)
            outputs += [beams.tokens, beams.scores, greedy.tokens, greedy.scores, samples.tokens, samples.scores]
    return outputs


def assert_generations_equal(got: list, expected: list) -> None:
    """Bit-identical token ids and scores."""
    for tensor, reference in zip(got, expected, strict=True):
        assert torch.equal(tensor, reference)


def views_fused_qkv(attention) -> bool:
    """Whether the attention's projections are still views of its fused q/k/v matrix."""
    return attention.key.weight.untyped_storage().data_ptr() == attention.fused_qkv.untyped_storage().data_ptr()


def assert_generations_match(got: list, expected: list, tolerance: float) -> None:
    """Token ids equal, scores within ``tolerance`` (relative and absolute) of ``expected``'s."""
    for tensor, reference in zip(got, expected, strict=True):
        if tensor.dtype == torch.long:
            assert torch.equal(tensor, reference)
        else:
            torch.testing.assert_close(tensor.float(), reference, rtol=tolerance, atol=tolerance)


needs_tracing = pytest.mark.skipif(not StepTraces.available, reason="torch.jit.trace is unsupported on this Python")
PACKED = [pytest.param(dtype, True, id=f"{name}-packed", marks=pytest.mark.skipif(
    not packed_matmul_supported(dtype), reason=f"this CPU has no oneDNN packed matmul for {name}"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]


KERNEL = pytest.param(torch.float32, False, True, id="fp32-cpu-kernel", marks=pytest.mark.skipif(
    cpu_kernels.unsupported_reason() is not None,
    reason=f"uio's CPU kernels are not used here: {cpu_kernels.unsupported_reason()}"))


@needs_tracing
@pytest.mark.parametrize("dtype, packed, kernel", [(torch.float32, False, False), KERNEL,
                                                   *[pytest.param(*p.values, False, id=p.id, marks=p.marks)
                                                     for p in PACKED]])
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
    assert sorted(key[:3] for key in model.step_traces.traces) == [(image, *kind) for image in (False, True)
                                                                   for kind in kinds]
    assert {key[-1] for key in model.step_traces.traces} == {packed}
    for trace in model.step_traces.traces.values():  # the kernels, or the packed copies, not the plain weights
        graph = str(trace.inlined_graph)
        assert ("uio_cpu::gemv" in graph, "mkldnn::_linear_pointwise" in graph) == (kernel, packed)
        # Every layer in one call; the output rows by the product kernel.
        layers = model.decoder.layers
        assert graph.count("uio_cpu::decoder_layer_step") == (len(layers) if kernel else 0)


@needs_tracing
def test_steps_under_autograd_run_eagerly():
    model = random_model()
    model.enable_step_traces()
    enc = model.encode(torch.tensor([[5, 6, 7]]), torch.zeros(1, 32, 32, 3))
    cache = DecoderCache(model, enc, 3, 0)
    logits = decode_step(model, cache, torch.tensor([0]), 0, torch.tensor([True]))
    assert logits.shape == (1, 96) and not model.step_traces.traces


@needs_tracing
def test_steps_too_few_to_pay_for_a_trace_run_eagerly():
    model = random_model()
    model.enable_step_traces()
    generate.beam_search(model, random_encoding(model, 1, 5), 1, 8)  # one text step, then 8 image steps
    assert [key[0] for key in model.step_traces.traces] == [True]


@needs_tracing
def test_step_traces_need_frozen_weights():
    model = random_model().requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad_"):
        model.enable_step_traces()


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
    assert model.step_traces.failed and not model.step_traces.traces
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
    model.cuda_graphs = True
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
    model.cuda_graphs = True
    kept = model.graphed_caches
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
    generate.beam_search(model, random_encoding(model, 1, 5), 3, 4, num_beams=2)
    # Graphs read the weights where they were recorded: a replaced weight drops them (the model
    # derives its forms again, see derive_again_if_replaced), and on the CPU turns to traces.
    assert len(kept) == 0 and len(recorded) == 3 and not model.cuda_graphs
    model.cuda_graphs = True
    for length in range(7, 7 + transformer.MAX_IDLE_GRAPHED_CACHES):
        generate.beam_search(model, random_encoding(model, 1, length), 3, 4, num_beams=2)
    assert len(kept) == transformer.MAX_IDLE_GRAPHED_CACHES
    model.to(torch.float64)
    assert len(model.graphed_caches) == 0


@needs_tracing
def test_a_generation_takes_a_kept_cache_only_when_no_other_holds_it():
    model = random_model()
    model.cuda_graphs = True
    enc = random_encoding(model, 1, 5)
    first, second = (model.graphed_caches.take(model, enc, 8, 0) for _ in range(2))
    assert first is not second  # both in use at once
    first.graphs.graphs[False] = "recorded"  # only caches with graphs are kept
    model.graphed_caches.put_back(first)
    assert model.graphed_caches.take(model, enc, 8, 0) is first
    assert model.graphed_caches.take(model, enc, 8, 0) is not first


@needs_tracing
def test_kept_graphed_caches_stay_within_their_memory_bound(monkeypatch):
    model = random_model()
    model.cuda_graphs = True
    kept = model.graphed_caches
    caches = [kept.take(model, random_encoding(model, 1, length), 8, 0) for length in (5, 6, 7)]
    for cache in caches:
        cache.graphs.graphs[False] = "recorded"
    monkeypatch.setattr(transformer, "MAX_IDLE_GRAPHED_BYTES", caches[0].nbytes() + caches[1].nbytes())
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

    def compiled_step(*args):  # stands for torch.compile(_decode_step)
        compiled_calls.append(args[-1])
        return transformer._decode_step(*args)

    model.compiled_step, model.cuda_graphs = compiled_step, True
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
    model.cuda_graphs = True
    assert_generations_equal(generations(model, traced=False), eager)
    assert not model.cuda_graphs
    assert caplog.text.count("recording a decoding step as a CUDA graph failed (RuntimeError: operation not") == 1


@needs_tracing
def test_a_model_converted_on_the_cpu_traces_its_steps_instead_of_graphing_them():
    model = random_model()
    model.cuda_graphs = True
    model.to(torch.float64)
    assert not model.cuda_graphs and isinstance(model.step_traces, StepTraces)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_decode_what_eager_cuda_steps_decode(dtype):
    model = random_model(dtype)
    model.enable_step_traces()
    model.to("cuda")  # a traced CPU model records CUDA graphs once on a GPU
    assert model.cuda_graphs and model.step_traces is None
    graphed = generations(model, traced=False)
    again = generations(model, traced=False)  # on the caches and graphs kept from the first calls
    model.cuda_graphs = False
    eager = generations(model, traced=False)
    for got in (graphed, again):
        assert_generations_match(got, eager, tolerance=1e-5)


def step_logits(model, enc, tokens: torch.Tensor) -> tuple[DecoderCache, torch.Tensor]:
    """The logits of decoding steps feeding ``tokens`` (rows, steps) one at a time, and their cache."""
    rows, steps = tokens.shape
    cache = DecoderCache(model, enc, steps, 0)
    with torch.inference_mode():
        return cache, torch.stack([decode_step(model, cache, tokens[:, i], i, torch.ones(rows, dtype=torch.bool))
                                   for i in range(steps)], dim=1)


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
    monkeypatch.setattr(transformer, "step_attention_dtype", lambda model, hidden, rows: hidden.dtype)
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
    loss = transformer.negative_log_likelihood(hidden, model.token_embedder, slice(0, 50), torch.tensor([1, 2, 3]))
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
    rows_beyond = cpu_kernels.MAX_ROWS + 1
    assert transformer.step_attention_dtype(model, enc.hidden, rows_beyond) == torch.float32
    monkeypatch.setattr(transformer, "step_attention_dtype", lambda model, hidden, rows: torch.float32)
    cache, wide = step_logits(model, enc, tokens)
    assert attention_dtypes(cache) == {torch.float32}
    assert torch.equal(narrow, wide)


@needs_tracing
def test_converting_a_model_derives_its_fused_and_traced_forms_again():
    """``.to()`` converts each parameter on its own; the fused matrices and step traces follow:
    in float64 the model decodes what it decoded in float32, and back in float32 exactly that."""
    model = random_model().to(torch.float64).to(torch.float32)  # fp32's layout for every weight
    before = generations(model, traced=True)
    assert model.to(torch.float64) is model
    attention = model.decoder.layers[0].self_attention
    assert attention.fused_qkv.dtype == torch.float64 and attention.fused_qkv.is_contiguous()
    assert views_fused_qkv(attention)
    assert not model.step_traces.traces  # the float32 traces held the float32 weights
    model.step_traces = None
    wide = generations(model, traced=False)
    assert_generations_match(wide, before, tolerance=1e-4)
    model.to(torch.float32)
    # fp32's layout: (in, out) views, but (out, in) rows for the decoder where uio's CPU kernels stream them
    decoder_rows = attention.fused_qkv if cpu_kernels.in_use(torch.float32) else attention.fused_qkv.T
    assert attention.fused_qkv.dtype == torch.float32 and decoder_rows.is_contiguous()
    assert model.encoder.layers[0].attention.fused_qkv.T.is_contiguous()
    assert views_fused_qkv(attention)
    assert_generations_equal(generations(model, traced=True), before)


def test_converting_a_packed_model_packs_it_again_where_it_can(without_cpu_kernel):
    if not packed_matmul_supported(torch.float32):
        pytest.skip("this CPU has no oneDNN packed matmul for fp32")
    model = random_model(packed=True)
    packed = model.packed_weights()
    assert [id(w) for w in model.to(torch.float32).packed_weights()] == [id(w) for w in packed]  # nothing to do
    model.to(torch.bfloat16)
    expected = [torch.bfloat16] * len(packed) if packed_matmul_supported(torch.bfloat16) else []
    assert [w.dtype for w in model.packed_weights()] == expected
    linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() for m in linears)
    model.to(torch.float32)  # packed again, from the converted weights
    assert [w.dtype for w in model.packed_weights()] == [torch.float32] * len(packed)
    mlp, x = model.decoder.layers[0].mlp, torch.randn(1, model.cfg.emb_dim)
    torch.testing.assert_close(transformer.linear(x, mlp.fused_wi, mlp.packed["wi"]), x @ mlp.fused_wi.T)


@needs_tracing
def test_copies_of_a_model_derive_its_packed_and_traced_forms_again():
    """Packed copies and traces cannot be copied or pickled: a deep copy, or a model saved whole
    with torch.save and loaded, makes them again from its own weights and decodes exactly as the
    original does."""
    import copy
    import io

    # In fp32's layout for every weight, which copies lay their weights out in (see stores_transposed).
    model = random_model(packed=packed_matmul_supported(torch.float32)).to(torch.float64).to(torch.float32)
    model.enable_step_traces()
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    before = generations(model, traced=True)
    for duplicate in (copy.deepcopy(model), torch.load(saved, weights_only=False)):
        assert len(duplicate.packed_weights()) == len(model.packed_weights())
        assert duplicate.step_traces is not None and not duplicate.step_traces.traces
        attention = duplicate.decoder.layers[0].self_attention
        assert views_fused_qkv(attention)
        assert_generations_equal(generations(duplicate, traced=True), before)


def force_eos(monkeypatch, steps: list[int]) -> list[int]:
    """Make row ``r`` of every step's logits pick EOS at step ``steps[r]``; returns the list of
    steps run, which grows as decoding goes."""
    run, real_step = [], generate.decode_step

    def step_forcing_eos(model, cache, tokens, step, valid):
        logits = real_step(model, cache, tokens, step, valid)
        run.append(step)
        for row, at in enumerate(steps):
            if step == at:
                logits[row, generate.EOS] = 1e4
        return logits

    monkeypatch.setattr(generate, "decode_step", step_forcing_eos)
    return run


@pytest.mark.parametrize("decoding", ["greedy", "sampling"])
def test_stop_at_eos_skips_the_steps_after_every_sequence_ended(monkeypatch, decoding):
    """Row 0 ends at step 2, row 1 at step 4: decoding stops after step 4 (of 8 text steps and
    one image step), with the full run's tokens up to there, zeros after, and the scores of a
    run of those 5 steps only."""
    model = random_model()
    enc = random_encoding(model, 2, 5)
    steps_run = force_eos(monkeypatch, [2, 4])

    def decode(text_length: int, image_length: int, **kwargs) -> generate.Generation:
        if decoding == "greedy":
            return generate.beam_search(model, enc, text_length, image_length, **kwargs)
        return generate.sample(model, enc, text_length, image_length, generator=torch.Generator().manual_seed(3),
                               **kwargs)

    full = decode(8, 1)
    assert steps_run == list(range(9))
    steps_run.clear()
    stopped = decode(8, 1, stop_at_eos=True)
    assert steps_run == list(range(5))
    assert stopped.tokens.shape == full.tokens.shape
    assert torch.equal(stopped.tokens[..., :5], full.tokens[..., :5]) and not stopped.tokens[..., 5:].any()
    assert (stopped.tokens[..., :5] == generate.EOS).any(-1).all()
    torch.testing.assert_close(stopped.scores, decode(5, 0).scores)


def test_stop_at_eos_stops_beam_search_once_every_beam_ended(monkeypatch):
    model = random_model()
    steps_run = force_eos(monkeypatch, [5] * 4)  # 2 examples x 2 beams
    beams = generate.beam_search(model, random_encoding(model, 2, 5), 8, 1, num_beams=2, stop_at_eos=True)
    assert steps_run == list(range(6))
    assert (beams.tokens[..., :6] == generate.EOS).any(-1).all() and not beams.tokens[..., 6:].any()


@pytest.mark.parametrize("max_options", [1, 2, 800])
@pytest.mark.parametrize("average", [False, True])
def test_text_options_of_different_lengths_score_as_padded_ones(max_options, average):
    """Options decoded by length without their padding get the losses of the teacher-forced
    pass over all of them padded to the longest (positions past an option's own EOS masked)."""
    model = random_model()
    enc = random_encoding(model, 2, 5)
    options = torch.tensor([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [8, 9, 10, 11, 1], [12, 1, 0, 0, 0], [13, 14, 1, 0, 0]])
    losses = generate.score_text_options(model, enc, options, max_options, average)
    inputs, targets, mask = (x.repeat(2, 1) for x in generate._text_option_batch(options))
    with torch.inference_mode():
        logits = model.decode(enc, inputs, inputs[:, :0], mask, inputs[:, :0])[..., :model.cfg.vocab_size]
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask
    expected = nll.sum(1) / mask.sum(1) if average else nll.sum(1)
    torch.testing.assert_close(losses, expected.view(2, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", ["encode", "decode", "generate", "score"])
def test_projection_weights_replaced_after_fusing_are_fused_again(call):
    """``load_state_dict(assign=True)`` replaces every weight: the fused matrices (and the traces
    made of the old ones) follow before the next encoding, teacher-forced decoding, generation or
    scoring, which computes what a model given the same weights in place computes. A call on
    unchanged weights fuses nothing again."""
    # In fp32's layout for every weight, which assigned weights are laid out in (see stores_transposed).
    model, reference = (random_model().to(torch.float64).to(torch.float32) for _ in range(2))
    kept = model.decoder.layers[0].mlp.fused_wi
    if StepTraces.available:
        model.enable_step_traces()
    generate.beam_search(model, random_encoding(model, 1, 5), 8, 9, num_beams=2)  # traced, old weights
    assert model.decoder.layers[0].mlp.fused_wi is kept
    state = {name: tensor * 1.1 for name, tensor in model.state_dict().items()}
    reference.load_state_dict(state)  # copied into the views of the fused matrices
    enc = random_encoding(reference, 1, 5)
    model.load_state_dict(state, assign=True)
    assert not views_fused_qkv(model.decoder.layers[0].self_attention)
    options = torch.tensor([[5, 9, 1], [7, 1, 0]])
    text, none = options[:1], options[:1, :0]
    run = {"encode": lambda m: [random_encoding(m, 1, 5).hidden],
           "decode": lambda m: [m.decode(enc, text, none, text > 0, none > 0)],
           "generate": lambda m: list(vars(generate.beam_search(m, enc, 8, 9, num_beams=2)).values()),
           "score": lambda m: [generate.score_text_options(m, enc, options)]}[call]
    got = run(model)
    assert views_fused_qkv(model.decoder.layers[0].self_attention)
    assert_generations_equal(got, run(reference))


def test_other_weights_replaced_after_tracing_are_traced_again():
    """Replacing weights that are no fused projection's (an output projection's ``.data``, a norm's
    parameter) drops the traces and packed copies made of the old ones: the next generation decodes
    what a model given the same weights in place decodes."""
    # In fp32's layout for every weight, which the replaced weights keep (see stores_transposed).
    model, reference = (random_model(packed=packed_matmul_supported(torch.float32)).to(torch.float64)
                        .to(torch.float32) for _ in range(2))
    if StepTraces.available:
        model.enable_step_traces()
    enc = random_encoding(model, 1, 5)
    generate.beam_search(model, enc, 8, 9, num_beams=2)  # traced, old weights
    out, norm = model.decoder.layers[0].mlp.wo, model.decoder.decoder_norm
    new_out, new_norm = out.weight * 1.5, norm.weight * 0.5
    reference.decoder.layers[0].mlp.wo.weight.copy_(new_out)
    reference.decoder.decoder_norm.weight.copy_(new_norm)
    out.weight.data = new_out
    norm.weight = torch.nn.Parameter(new_norm, requires_grad=False)
    got, expected = (generate.beam_search(m, enc, 8, 9, num_beams=2) for m in (model, reference))
    assert_generations_equal([got.tokens, got.scores], [expected.tokens, expected.scores])


def test_submodules_converted_on_their_own_are_fused_again():
    """Converting the encoder, decoder and embedding one by one decodes what converting the model does."""
    model = random_model()
    for part in (model.token_embedder, model.encoder, model.decoder):
        part.to(torch.float64)
    assert model.decoder.layers[0].self_attention.fused_qkv.dtype == torch.float32  # until the next call
    assert_generations_equal(generations(model, traced=False), generations(random_model().to(torch.float64), False))
    assert model.decoder.layers[0].self_attention.fused_qkv.dtype == torch.float64
