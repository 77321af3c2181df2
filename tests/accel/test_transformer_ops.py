"""The transformer's fast operations (uio.accel.transformer_ops) and the weight layout they rely on
(uio.accel.layout, uio.accel.packing): each computes what the reference computes."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

from uio.accel import cpu_kernels, layout, packing, transformer_ops
from uio.accel.derived import FORMS
from uio.accel.policy import EMULATED_BF16_MAX_ROWS, POSITION_BIAS_CACHE_BYTES
from uio.model.transformer import Attention, MlpBlock


def fuse_attention(attention: Attention, dtype: torch.dtype) -> torch.Tensor:
    """Fuse ``attention``'s query, key and value as an encoder's are (see uio.accel.layout)."""
    return layout.fuse_weights([attention.query, attention.key, attention.value], "cpu", dtype, False, False)


def fuse_mlp(mlp: MlpBlock, dtype: torch.dtype) -> torch.Tensor:
    return layout.fuse_weights([mlp.wi_0, mlp.wi_1], "cpu", dtype, False, False)


def mlp_weights(mlp: MlpBlock) -> tuple[torch.Tensor, ...]:
    return mlp.wi_0.weight, mlp.wi_1.weight, mlp.wo.weight


def test_fused_projections_equal_separate_ones():
    torch.manual_seed(0)
    attention, mlp, x = Attention(32, 4, 8), MlpBlock(32, 64), torch.randn(2, 5, 32)
    with torch.inference_mode():
        separate = {which: attention.project(x, which) for which in ("qkv", "kv", "q")}
        mlp_separate = mlp(x)
        fuse_attention(attention, torch.float32)
        fuse_mlp(mlp, torch.float32)
        assert transformer_ops.fused([attention.query.weight, attention.key.weight, attention.value.weight]) is not None
        assert transformer_ops.fused([mlp.wi_0.weight, mlp.wi_1.weight]) is not None
        for which, outputs in separate.items():
            for fused, plain in zip(attention.project(x, which), outputs, strict=True):
                torch.testing.assert_close(fused, plain)
        torch.testing.assert_close(mlp(x), mlp_separate)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows, pieces", [(60, [60]), (100, [30, 30, 30, 10])])
def test_cpu_mlp_of_many_rows_runs_in_pieces_with_the_same_result(rows, pieces, fused, monkeypatch):
    """Rows whose gated activations take more than twice MLP_PIECE_BYTES go through the MLP in
    pieces of that size, with the same values as whole (and gradients through them)."""
    torch.manual_seed(0)
    mlp, x = MlpBlock(32, 64), torch.randn(2, rows // 2, 32)
    if fused:
        fuse_mlp(mlp, torch.float32)
        assert transformer_ops.fused([mlp.wi_0.weight, mlp.wi_1.weight]) is not None
    x.requires_grad_(True)
    whole = mlp(x)
    (whole_grad,) = torch.autograd.grad(whole.square().sum(), x)
    seen, whole_mlp = [], transformer_ops._mlp
    monkeypatch.setattr(transformer_ops, "_mlp", lambda part, *w: seen.append(part.numel() // 32) or whole_mlp(part, *w))
    monkeypatch.setattr(transformer_ops, "MLP_PIECE_BYTES", 30 * 2 * 64 * 4)  # 30 rows of fp32 activations
    in_pieces = mlp(x)
    assert seen == pieces
    torch.testing.assert_close(in_pieces, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(in_pieces.square().sum(), x)[0], whole_grad, rtol=1e-6, atol=1e-6)


def test_decoder_weights_are_rows_only_where_the_cpu_kernels_stream_them(monkeypatch):
    """fp32 weights are (in, out) views of the checkpoint's kernels, except the decoder's on the CPU
    while uio's CPU kernels serve fp32 steps; other dtypes are always (out, in) rows."""
    monkeypatch.setattr(cpu_kernels, "in_use", lambda dtype: dtype == torch.float32)
    assert not layout.stores_transposed(torch.float32, "cpu", decoder=True)
    assert layout.empty_weight(24, 40, "cpu", torch.float32, decoder=True).is_contiguous()
    assert layout.stores_transposed(torch.float32, "cpu") and layout.stores_transposed(torch.float32, "cuda", decoder=True)
    assert layout.empty_weight(24, 40, "cpu", torch.float32).T.is_contiguous()
    assert not layout.stores_transposed(torch.bfloat16, "cpu")
    assert not layout.stores_transposed(torch.bfloat16, "cpu", decoder=True)
    monkeypatch.setattr(cpu_kernels, "in_use", lambda dtype: False)
    assert layout.stores_transposed(torch.float32, "cpu", decoder=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_fusing_lays_the_weights_out_for_their_dtype(transposed, dtype):
    """Whatever the weights' layout, the fused matrix has the one stores_transposed picks for
    their dtype (fp32: views of an (in, out) matrix), and the modules hold views of it, which
    the fast operations find as one matrix."""
    torch.manual_seed(0)
    attention = Attention(32, 4, 8).to(dtype)
    linears = (attention.query, attention.key, attention.value)
    weights = [m.weight.detach().clone() for m in linears]
    if transposed:
        for m in linears:
            m.weight = torch.nn.Parameter(m.weight.detach().T.contiguous().T)
    fused = fuse_attention(attention, dtype)
    assert fused.T.is_contiguous() == (dtype == torch.float32)
    assert fused.is_contiguous() == (dtype != torch.float32)
    assert torch.equal(fused, torch.cat(weights))
    assert attention.key.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    found = transformer_ops.fused([m.weight for m in linears])
    assert found.data_ptr() == fused.data_ptr() and found.stride() == fused.stride() and torch.equal(found, fused)


def test_a_converted_model_is_laid_out_again(tiny_model):
    """``.to(dtype)`` gives each weight a tensor of its own: the model lays them out again, every
    weight in its dtype's layout and each fusion group one matrix again."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    for part, decoder in ((model.encoder, False), (model.decoder, True)):
        for module in part.modules():
            if isinstance(module, torch.nn.Linear):
                assert layout.in_stored_layout(module.weight, decoder)
    for linears, _, _ in layout.fusion_groups(model):
        assert transformer_ops.fused([m.weight for m in linears]) is not None


def make_packed_copies(weight_groups: list[list[torch.Tensor]]) -> None:
    """Packed copies of each group's (fused) matrix, as uio.accel.configure(prepack=True) makes them."""
    for weights in weight_groups:
        assert transformer_ops.packed_copy(weights, transformer_ops.fused(weights), create=True) is not None


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 rows take the plain matmul
def test_prepacked_weights_give_the_plain_results(rows, dtype, tolerance, without_cpu_kernel, monkeypatch):
    if not packing.packed_matmul_supported(dtype):
        pytest.skip(f"this CPU has no oneDNN packed matmul for {dtype}")
    torch.manual_seed(0)
    attention, mlp = Attention(32, 4, 8).to(dtype), MlpBlock(32, 64).to(dtype)
    x = torch.randn(1, rows, 32, dtype=dtype)
    fuse_attention(attention, dtype)
    fuse_mlp(mlp, dtype)
    with torch.inference_mode():
        q = attention.project(x, "q")[0]
        bias = torch.zeros(1, 1, rows, rows, dtype=x.dtype)
        plain = attention.project(x, "qkv"), attention.attend(q, q, q, bias), mlp(x)
        make_packed_copies([[attention.query.weight, attention.key.weight, attention.value.weight],
                            [attention.out.weight], [mlp.wi_0.weight, mlp.wi_1.weight], [mlp.wo.weight]])
        products, onednn_linear = [], packing.onednn_linear
        monkeypatch.setattr(packing, "onednn_linear", lambda x, w: products.append(w.layout) or onednn_linear(x, w))
        packed = attention.project(x, "qkv"), attention.attend(q, q, q, bias), mlp(x)
    packed_products = [layout for layout in products if layout != torch.strided]
    assert len(packed_products) == (4 if rows <= transformer_ops.PACKED_MAX_ROWS else 0)
    torch.testing.assert_close(packed, plain, rtol=tolerance, atol=tolerance)


def test_weight_packer_reuses_its_buffer_without_touching_earlier_packs():
    """Transposed weights of growing and shrinking sizes go through one reused buffer; every
    packed copy still multiplies as its own weight's direct packing does."""
    if not packing.packed_matmul_supported(torch.float32):
        pytest.skip("this CPU has no oneDNN packed matmul for fp32")
    torch.manual_seed(0)
    weights = [torch.randn(n_in, n_out).T for n_out, n_in in ((48, 32), (96, 64), (16, 32), (64, 16))]
    weights.append(torch.randn(40, 32))  # contiguous: packed directly
    pack = packing.WeightPacker()
    packed = [pack(w) for w in weights]
    for weight, packed_copy in zip(weights, packed):
        x = torch.randn(3, weight.shape[1])
        by_copy = packing.onednn_linear(x, packed_copy)
        assert torch.equal(by_copy, packing.onednn_linear(x, packing.pack_weight(weight.contiguous())))
        torch.testing.assert_close(by_copy, x @ weight.T)


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_bf16_matmuls_of_many_rows_run_in_fp32_where_bf16_is_emulated(monkeypatch, bf16_kernels, without_cpu_kernel):
    """Emulated bf16 matmuls are far slower than fp32 ones for an encoder's rows: without bf16
    kernels a bf16 matmul of more than a few rows multiplies in fp32 and rounds to bf16."""
    monkeypatch.setattr(packing, "computes_natively", lambda dtype, device: bf16_kernels)
    seen, unpacked_linear = [], packing.unpacked_linear
    monkeypatch.setattr(packing, "unpacked_linear", lambda x, w: seen.append(w.dtype) or unpacked_linear(x, w))
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    for rows in (EMULATED_BF16_MAX_ROWS, EMULATED_BF16_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        got = transformer_ops.linear(x, weight)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), x.float() @ weight.float().T, rtol=1e-2, atol=2e-2)
    many_rows = torch.bfloat16 if bf16_kernels else torch.float32
    assert seen == [torch.bfloat16, many_rows, many_rows]


@pytest.mark.parametrize("shape", [(2, 40), (90,)])  # more rows than a decoding step's
@pytest.mark.parametrize("weight_layout", ["out-in", "in-out", "rows of a fused in-out matrix"])
def test_fp32_matmuls_of_many_rows_run_on_onednn_without_gradients(monkeypatch, shape, weight_layout,
                                                                   without_cpu_kernel):
    """fp32 products of many rows on an x86 CPU run on oneDNN with the weight as it is (any layout):
    torch's results to float32 rounding; where a gradient is wanted, or for a step's few rows, on
    torch's matmul."""
    if not packing.packed_matmul_supported(torch.float32):
        pytest.skip("no oneDNN fp32 matmul on this CPU")
    calls, onednn_linear = [], packing.onednn_linear
    monkeypatch.setattr(packing, "onednn_linear", lambda x, w: calls.append(w.shape) or onednn_linear(x, w))
    torch.manual_seed(0)
    weight = {"out-in": torch.randn(300, 64), "in-out": torch.randn(64, 300).T,
              "rows of a fused in-out matrix": torch.randn(64, 900).T[300:600]}[weight_layout]
    x = torch.randn(*shape, 64)
    expected = x.double() @ weight.double().T
    with torch.no_grad():
        got = transformer_ops.linear(x, weight)
    assert calls == [weight.shape] and got.shape == (*shape, 300)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        transformer_ops.linear(x[..., :2, :], weight)  # (torch's matmul here, as uio's CPU kernels are off)
    x.requires_grad_()
    transformer_ops.linear(x, weight).sum().backward()
    assert len(calls) == 1 and x.grad is not None


@pytest.mark.parametrize("kernels", [True, False])
def test_every_weight_onednn_multiplies_unpacked_has_contiguous_rows_or_columns(conformance, test_image, monkeypatch,
                                                                                kernels):
    """oneDNN multiplies a weight whose rows and columns are both strided (a row range of a transposed
    matrix, as the cross-attention's key/value rows of an fp32 (in, out) fused matrix were) by a
    far slower reference kernel: every weight a model hands it unpacked, in every call that
    multiplies many rows (projecting the encoding into cross-attention keys/values, encoding,
    scoring answer options), has contiguous rows or columns, with uio's CPU kernels in use or not."""
    from uio.runner import ModelRunner

    if not packing.packed_matmul_supported(torch.float32):
        pytest.skip("oneDNN's linear is not used on this CPU")
    if kernels and not cpu_kernels.load():
        pytest.skip("uio's CPU kernels are not loaded here")
    monkeypatch.setattr(cpu_kernels, "enabled", kernels)
    onednn_linear, weights = packing.onednn_linear, []
    monkeypatch.setattr(packing, "onednn_linear", lambda x, w: weights.append(w) or onednn_linear(x, w))
    runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin", log_inputs=False,
                         tokenizer=conformance / "tokenizer" / "spiece.model")
    runner.run([test_image], ["what is on the left ?"], output_text_len=4)
    runner.image_classification(test_image, answer_options=[f"object number {i}" for i in range(40)])
    unpacked = [w for w in weights if w.layout == torch.strided]
    assert unpacked, "no call multiplied many rows by oneDNN"
    assert [w.stride() for w in unpacked if not (w.is_contiguous() or w.T.is_contiguous())] == []


BIASES = "encoder position bias"


@pytest.fixture
def encoder_inputs(golden):
    """The encoder golden's inputs, as ``UnifiedIO.encode`` takes them."""
    g = golden("encoder.npz")
    return (torch.from_numpy(g["text_encoder_inputs"]).long(), torch.from_numpy(g["image_encoder_inputs"]), None,
            torch.from_numpy(g["image_input_masks"]))


@pytest.fixture
def kept_biases():
    """The position biases kept (uio.accel.derived.FORMS), none at first; their limit restored after."""
    FORMS.clear(BIASES)
    yield lambda: FORMS.forms(BIASES)
    FORMS.limit(BIASES, nbytes=POSITION_BIAS_CACHE_BYTES)
    FORMS.clear(BIASES)


def test_encoder_keeps_position_biases_for_later_calls_of_the_same_shapes(tiny_model, encoder_inputs, kept_biases,
                                                                          monkeypatch):
    """A second encoding of the same shapes reuses the first's position biases (the same outputs);
    another prompt length or padding, or an in-place weight update, makes them again (in place of
    the stale ones); the kept ones stay within POSITION_BIAS_CACHE_BYTES (at least the last); they
    go with the weights they were made from, and copies of a model make their own."""
    tokens, images, _, masks = encoder_inputs
    with torch.inference_mode():
        tiny_model.encode(tokens, images, None, masks)
    assert len(kept_biases()) == 1
    model = copy.deepcopy(tiny_model)
    encoder = model.encoder
    made = []
    monkeypatch.setattr(encoder, "_position_bias", lambda *args, compute=encoder._position_bias:
                        made.append(args[0]) or compute(*args))
    with torch.inference_mode():
        first = model.encode(tokens, images, None, masks)
        again = model.encode(tokens, images, None, masks)
        model.encode(tokens[:, :-1], images, None, masks)
        model.encode(tokens, images, None, masks, skip_padding=True)
        model.encode(tokens, images, None, masks, skip_padding=True)
    length = tokens.shape[1]
    assert made == [length, length - 1, length] and len(kept_biases()) == 4
    assert torch.equal(again.hidden, first.hidden)
    assert not any(bias.is_inference() for bias in kept_biases())  # usable outside inference mode
    with torch.no_grad():
        encoder.position_q_linear.weight.mul_(1.5)  # in place: a new version of the weight
    with torch.inference_mode():
        updated = model.encode(tokens, images, None, masks)
    assert len(made) == 4 and len(kept_biases()) == 4  # made again, in place of the stale ones
    with torch.inference_mode():
        FORMS.clear(BIASES)
        computed = model.encode(tokens, images, None, masks)  # made anew
    assert len(made) == 5 and len(kept_biases()) == 1
    assert torch.equal(updated.hidden, computed.hidden) and not torch.equal(updated.hidden, first.hidden)
    FORMS.limit(BIASES, nbytes=1)
    with torch.inference_mode():
        model.encode(tokens[:, :-2], images, None, masks)
        model.encode(tokens[:, :-3], images, None, masks)
    assert len(made) == 7 and len(kept_biases()) == 1
    del model, encoder
    monkeypatch.undo()  # the patched method held the encoder
    gc.collect()
    assert kept_biases() == []  # freed with the weights


def test_position_biases_are_not_kept_where_their_gradients_are_wanted(tiny_model, encoder_inputs, kept_biases):
    model = copy.deepcopy(tiny_model)
    with torch.inference_mode():
        model.encode(*encoder_inputs)
    assert len(kept_biases()) == 1
    model.encoder.layers[0].mlp.wo.weight.requires_grad_(True)  # kept biases serve autograd elsewhere
    model.encode(*encoder_inputs).hidden.sum().backward()
    assert model.encoder.layers[0].mlp.wo.weight.grad is not None and len(kept_biases()) == 1
    weight = model.encoder.position_q_linear.weight.requires_grad_(True)
    model.encode(*encoder_inputs).hidden.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0 and len(kept_biases()) == 1
