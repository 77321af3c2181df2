"""Forms derived from the weights (uio.accel.derived): fused matrices, packed copies and step traces
follow conversions, copies, pickles and replaced or updated weights; the registry's own rules."""
from __future__ import annotations

import copy
import gc
import io

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
from uio.accel import cpu_kernels, layout, packing, transformer_ops
from uio.accel.derived import DerivedForms
from uio.accel.steps import StepTraces

needs_tracing = pytest.mark.skipif(not StepTraces.available, reason="torch.jit.trace is unsupported on this Python")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with on_one_thread():
        yield


def fused_qkv(attention) -> torch.Tensor | None:
    """The attention's q/k/v matrix where its projections are views of one (None where they are not)."""
    return transformer_ops.fused([attention.query.weight, attention.key.weight, attention.value.weight])


@needs_tracing
def test_converting_a_model_lays_it_out_and_traces_its_steps_again():
    """``.to()`` converts each parameter on its own; the fused matrices and step traces follow:
    in float64 the model decodes what it decoded in float32, and back in float32 exactly that."""
    model = random_model().to(torch.float64).to(torch.float32)  # fp32's layout for every weight
    before = generations(model, traced=True)
    assert model.to(torch.float64) is model
    attention = model.decoder.layers[0].self_attention
    assert fused_qkv(attention) is not None  # the projections are views of one matrix again
    assert fused_qkv(attention).dtype == torch.float64 and fused_qkv(attention).is_contiguous()
    assert traces_of(model) is None  # the float32 traces held the float32 weights
    wide = generations(model, traced=False)
    assert_generations_match(wide, before, tolerance=1e-4)
    model.to(torch.float32)
    # fp32's layout: (in, out) views, but (out, in) rows for the decoder where uio's CPU kernels stream them
    qkv = fused_qkv(attention)
    assert qkv is not None
    decoder_rows = qkv if cpu_kernels.in_use(torch.float32) else qkv.T
    assert qkv.dtype == torch.float32 and decoder_rows.is_contiguous()
    assert fused_qkv(model.encoder.layers[0].attention).T.is_contiguous()
    assert_generations_equal(generations(model, traced=True), before)


def test_converting_a_packed_model_packs_it_again_where_it_can(without_cpu_kernel):
    if not packing.packed_matmul_supported(torch.float32):
        pytest.skip("this CPU has no oneDNN packed matmul for fp32")
    model = random_model(packed=True)
    packed = transformer_ops.packed_copies(model)
    assert len(packed) == len(transformer_ops.step_weight_groups(model))  # every product of a step
    unchanged = transformer_ops.packed_copies(model.to(torch.float32))  # nothing to do
    assert [id(w) for w in unchanged] == [id(w) for w in packed]
    model.to(torch.bfloat16)
    expected = [torch.bfloat16] * len(packed) if packing.packed_matmul_supported(torch.bfloat16) else []
    assert [w.dtype for w in transformer_ops.packed_copies(model)] == expected
    linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() for m in linears)
    model.to(torch.float32)  # packed again, from the converted weights
    assert [w.dtype for w in transformer_ops.packed_copies(model)] == [torch.float32] * len(packed)
    mlp, x = model.decoder.layers[0].mlp, torch.randn(1, model.cfg.emb_dim)
    wi = [mlp.wi_0.weight, mlp.wi_1.weight]
    fused_wi = transformer_ops.fused(wi)
    torch.testing.assert_close(packing.onednn_linear(x, transformer_ops.packed_copy(wi, fused_wi)), x @ fused_wi.T)


@needs_tracing
def test_copies_of_a_model_make_its_packed_and_traced_forms_again():
    """Packed copies and traces are not copied or pickled: a deep copy, or a model saved whole with
    torch.save and loaded, keeps its settings and fused views, packs its own weights, traces its
    steps at its first generation, and decodes exactly as the original does."""
    # In fp32's layout for every weight, which copies lay their weights out in (see stores_transposed).
    model = random_model(packed=packing.packed_matmul_supported(torch.float32)).to(torch.float64).to(torch.float32)
    accel.settings(model).step_traces = True
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    before = generations(model, traced=True)
    for duplicate in (copy.deepcopy(model), torch.load(saved, weights_only=False)):
        assert accel.settings(duplicate) == accel.settings(model) and accel.settings(duplicate).step_traces
        assert len(transformer_ops.packed_copies(duplicate)) == len(transformer_ops.packed_copies(model))
        assert traces_of(duplicate) is None
        assert fused_qkv(duplicate.decoder.layers[0].self_attention) is not None
        assert_generations_equal(generations(duplicate, traced=True), before)
        assert traces_of(duplicate).traces


def replaced_by_assignment(model, reference, state: dict) -> None:
    """Give ``model`` the weights ``state`` by assignment and ``reference`` the same in place."""
    reference.load_state_dict(state)  # copied into the views of the fused matrices
    model.load_state_dict(state, assign=True)


@pytest.mark.parametrize("call", ["encode", "decode", "generate", "score"])
def test_projection_weights_replaced_after_fusing_compute_at_once_and_fuse_again_when_laid_out(call):
    """``load_state_dict(assign=True)`` replaces every weight: the next encoding, teacher-forced
    decoding, generation or scoring computes what a model given the same weights in place computes
    (up to the rounding of separate products: their matrix is fused again by ``lay_out``, or a
    conversion, and then exactly), using neither old fused matrices nor traces made of the old
    weights. A call on unchanged weights fuses nothing again."""
    # In fp32's layout for every weight, which assigned weights are laid out in (see stores_transposed).
    model, reference = (random_model().to(torch.float64).to(torch.float32) for _ in range(2))
    mlp = model.decoder.layers[0].mlp
    kept = transformer_ops.fused([mlp.wi_0.weight, mlp.wi_1.weight])
    accel.settings(model).step_traces = StepTraces.available
    generate.beam_search(model, random_encoding(model, 1, 5), 8, 9, num_beams=2)  # traced, old weights
    assert transformer_ops.fused([mlp.wi_0.weight, mlp.wi_1.weight]) is kept
    state = {name: tensor * 1.1 for name, tensor in model.state_dict().items()}
    replaced_by_assignment(model, reference, state)
    enc = random_encoding(reference, 1, 5)
    attention = model.decoder.layers[0].self_attention
    assert fused_qkv(attention) is None
    options = torch.tensor([[5, 9, 1], [7, 1, 0]])
    text, none = options[:1], options[:1, :0]
    run = {"encode": lambda m: [random_encoding(m, 1, 5).hidden],
           "decode": lambda m: [m.decode(enc, text, none, text > 0, none > 0)],
           "generate": lambda m: list(vars(generate.beam_search(m, enc, 8, 9, num_beams=2)).values()),
           "score": lambda m: [generate.score_text_options(m, enc, options)]}[call]
    assert_generations_match(run(model), run(reference), tolerance=1e-5)  # products rounded apart
    assert fused_qkv(attention) is None
    layout.lay_out(model)
    assert fused_qkv(attention) is not None
    assert_generations_equal(run(model), run(reference))


def test_other_weights_replaced_after_tracing_are_traced_again():
    """Replacing weights that are no fused projection's (an output projection's ``.data``, a norm's
    parameter) makes the traces and packed copies made of the old ones again: the next generation
    decodes what a model given the same weights in place decodes."""
    # In fp32's layout for every weight, which the replaced weights keep (see stores_transposed).
    model, reference = (random_model(packed=packing.packed_matmul_supported(torch.float32)).to(torch.float64)
                        .to(torch.float32) for _ in range(2))
    accel.settings(model).step_traces = StepTraces.available
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


def test_submodules_converted_on_their_own_compute_at_once_and_fuse_again_when_laid_out():
    """Converting the encoder, decoder and embedding one by one decodes what converting the model
    does: at once through separate products (up to their rounding), exactly once fused again by ``lay_out``."""
    model, converted = random_model(), random_model().to(torch.float64)
    for part in (model.token_embedder, model.encoder, model.decoder):
        part.to(torch.float64)
    attention = model.decoder.layers[0].self_attention
    assert fused_qkv(attention) is None and attention.key.weight.dtype == torch.float64
    expected = generations(converted, traced=False)
    assert_generations_match(generations(model, traced=False), expected, tolerance=1e-12)  # products rounded apart
    layout.lay_out(model)
    assert fused_qkv(attention).dtype == torch.float64
    assert_generations_equal(generations(model, traced=False), expected)


# The registry itself


def test_a_form_is_made_on_first_use_and_kept_while_its_sources_are_unchanged():
    forms, made = DerivedForms(), []
    source = torch.ones(3)
    assert forms.get("doubled", [source], lambda: made.append(1) or source * 2, create=False) is None
    first = forms.get("doubled", [source], lambda: made.append(1) or source * 2)
    assert forms.get("doubled", [source], lambda: made.append(1) or source * 2) is first and made == [1]
    other_key = forms.get("doubled", [source], lambda: made.append(1) or source * 2, key=("other",))
    assert other_key is not first and made == [1, 1]
    assert forms.forms("doubled") == [first, other_key]


def test_a_form_is_made_again_when_a_source_is_updated_in_place_or_replaced():
    forms = DerivedForms()
    holder = torch.nn.Linear(2, 2, bias=False).requires_grad_(False)
    first = forms.get("copy", [holder.weight], lambda: holder.weight.clone())
    with torch.no_grad():
        holder.weight.mul_(2)  # its version moves
    updated = forms.get("copy", [holder.weight], lambda: holder.weight.clone())
    assert updated is not first and torch.equal(updated, holder.weight)
    holder.weight.data = torch.zeros(2, 2)  # the same parameter, its address moves
    replaced = forms.get("copy", [holder.weight], lambda: holder.weight.clone())
    assert replaced is not updated and not replaced.any()
    assert forms.get("copy", [holder.weight], lambda: holder.weight.clone(), create=False) is replaced


def test_a_form_is_made_again_when_a_source_gets_new_storage_at_the_old_address():
    """A conversion gives a parameter new storage, which may lie where the freed old one was, with
    its version kept: two storages over one buffer stand for that."""
    forms = DerivedForms()
    memory = bytearray(16)
    holder = torch.nn.Linear(2, 2, bias=False).requires_grad_(False)
    holder.weight.data = torch.frombuffer(memory, dtype=torch.float32).view(2, 2)
    first = forms.get("copy", [holder.weight], lambda: holder.weight.clone())
    memory[:] = torch.ones(4).numpy().tobytes()  # new values, written around torch: no version moves
    holder.weight.data = torch.frombuffer(memory, dtype=torch.float32).view(2, 2)  # new storage, same address
    again = forms.get("copy", [holder.weight], lambda: holder.weight.clone())
    assert again is not first and torch.equal(again, torch.ones(2, 2))


def test_a_form_is_dropped_when_a_source_is_freed():
    forms = DerivedForms()
    kept, freed = torch.ones(2), torch.ones(2)
    total = kept + freed
    forms.get("sum", [kept, freed], lambda: total)
    forms.get("copy", [kept], lambda: kept.clone())
    del freed
    gc.collect()
    assert forms.forms("sum") == [] and len(forms.forms("copy")) == 1


def test_limits_keep_the_most_recently_used_forms_by_count_and_by_bytes():
    forms = DerivedForms()
    forms.limit("by count", count=2)
    forms.limit("by bytes", nbytes=3 * 4 * 4)  # three float32 tensors of four elements
    sources = [torch.full((4,), float(i)) for i in range(4)]
    for kind in ("by count", "by bytes"):
        for source in sources:
            forms.get(kind, [source], source.clone)
        forms.get(kind, [sources[1]], sources[1].clone)  # used again: the most recent now
    assert [form[0].item() for form in forms.forms("by count")] == [3, 1]
    assert [form[0].item() for form in forms.forms("by bytes")] == [2, 3, 1]
    forms.clear("by count")
    assert forms.forms("by count") == [] and len(forms.forms("by bytes")) == 3
