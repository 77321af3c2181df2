"""The transformer against the reference's outputs on the tiny random checkpoint."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from uio.model.embedding import Embedding
from uio.model.transformer import (MASK_VALUE, Attention, EncoderOutput, MlpBlock, RelativePositionBiases, RMSNorm,
                                   WeightPacker, attention, image_relative_bucket, linear, pack_weight,
                                   packed_matmul_supported, text_relative_bucket)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]


def t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def assert_close(actual, expected, rtol=1e-4, atol=1e-4):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float32), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_text_buckets(golden, bidirectional):
    g = golden("position_buckets.npz")
    key = "text_bucket_bidirectional" if bidirectional else "text_bucket_causal"
    got = text_relative_bucket(t(g["text_relative_position"]).long(), bidirectional)
    np.testing.assert_array_equal(got.numpy(), g[key])


def test_image_buckets(golden):
    g = golden("position_buckets.npz")
    got = image_relative_bucket(t(g["image_relative_x"]).long(), t(g["image_relative_y"]).long())
    np.testing.assert_array_equal(got.numpy(), g["image_bucket"])


@pytest.fixture(scope="module")
def encoder_inputs(golden):
    """The encoder golden's inputs, as ``UnifiedIO.encode`` takes them."""
    g = golden("encoder.npz")
    return t(g["text_encoder_inputs"]).long(), t(g["image_encoder_inputs"]), None, t(g["image_input_masks"])


@pytest.fixture(scope="module")
def encoded(tiny_model, encoder_inputs):
    with torch.inference_mode():
        return tiny_model.encode(*encoder_inputs)


def test_encoder(encoded, golden):
    g = golden("encoder.npz")
    assert_close(encoded.hidden, g["encoded"])
    assert_close(encoded.position_embedding.expand(2, -1, -1), g["position_embedding"])
    np.testing.assert_array_equal(encoded.mask.numpy(), g["encoder_masks"])


def test_encoder_other_image_size(tiny_model, golden):
    """A 256x256 image (256 patches): the position table is bicubic-resized as the reference does."""
    g = golden("encoder.npz")
    with torch.inference_mode():
        enc = tiny_model.encode(t(g["opt256/text_encoder_inputs"]).long(), t(g["opt256/image_encoder_inputs"]))
    assert_close(enc.position_embedding, g["opt256/position_embedding"])
    assert_close(enc.hidden, g["opt256/encoded"])
    np.testing.assert_array_equal(enc.mask.numpy(), g["opt256/encoder_masks"])


def test_encoder_keeps_position_biases_for_later_calls_of_the_same_shapes(tiny_model, encoder_inputs, monkeypatch):
    """A second encoding of the same shapes reuses the first's position biases (the same outputs);
    another prompt length or padding, or an in-place weight update, makes them again; the kept ones
    stay within POSITION_BIAS_CACHE_BYTES (at least the last)."""
    from uio.model import transformer

    model = copy.deepcopy(tiny_model)
    encoder, (tokens, images, _, masks) = model.encoder, encoder_inputs
    assert not encoder._biases  # copies start without them
    made, compute = [], encoder._position_bias
    monkeypatch.setattr(encoder, "_position_bias", lambda *args: made.append(args[0]) or compute(*args))
    with torch.inference_mode():
        first = model.encode(tokens, images, None, masks)
        again = model.encode(tokens, images, None, masks)
        model.encode(tokens[:, :-1], images, None, masks)
        model.encode(tokens, images, None, masks, skip_padding=True)
        model.encode(tokens, images, None, masks, skip_padding=True)
    length = tokens.shape[1]
    assert made == [length, length - 1, length] and len(encoder._biases) == 3
    assert torch.equal(again.hidden, first.hidden)
    assert not any(bias.is_inference() for bias in encoder._biases.values())  # usable outside inference mode
    with torch.no_grad():
        encoder.position_q_linear.weight.mul_(1.5)  # in place: a new version of the weight
    with torch.inference_mode():
        updated = model.encode(tokens, images, None, masks)
        monkeypatch.setattr(transformer, "POSITION_BIAS_CACHE_BYTES", 0)  # computed, not kept
        computed = model.encode(tokens, images, None, masks)
    assert len(made) == 5 and len(encoder._biases) == 4
    assert torch.equal(updated.hidden, computed.hidden) and not torch.equal(updated.hidden, first.hidden)
    monkeypatch.setattr(transformer, "POSITION_BIAS_CACHE_BYTES", 1)
    with torch.inference_mode():
        model.encode(tokens[:, :-2], images, None, masks)
    assert len(encoder._biases) == 1
    encoder.float()  # converting drops them (kept for the old weights)
    assert not encoder._biases


def test_position_biases_are_not_kept_where_their_gradients_are_wanted(tiny_model, encoder_inputs):
    model = copy.deepcopy(tiny_model)
    with torch.inference_mode():
        model.encode(*encoder_inputs)
    assert len(model.encoder._biases) == 1
    model.encoder.layers[0].mlp.wo.weight.requires_grad_(True)  # kept biases serve autograd elsewhere
    model.encode(*encoder_inputs).hidden.sum().backward()
    assert model.encoder.layers[0].mlp.wo.weight.grad is not None and len(model.encoder._biases) == 1
    weight = model.encoder.position_q_linear.weight.requires_grad_(True)
    model.encode(*encoder_inputs).hidden.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0 and len(model.encoder._biases) == 1


def test_encoder_batch_sharing_one_mask_encodes_as_with_a_mask_per_example(tiny_model, golden):
    """Examples with one mask share one masked position bias; with different masks each example
    gets its own. The shared path must give what the per-example path gives."""
    image = t(golden("encoder.npz")["image_encoder_inputs"])[:1]
    images, tokens = image.repeat(3, 1, 1, 1), torch.arange(2, 23).view(3, 7)  # no text padding
    patch = tiny_model.cfg.image_patch_size
    image_masks = torch.ones(3, (image.shape[1] // patch) * (image.shape[2] // patch), dtype=torch.int32)
    image_masks[:, -10:] = 0
    image_masks[2, :5] = 0  # the third example's mask differs: each example is masked on its own
    with torch.inference_mode():
        shared = tiny_model.encode(tokens[:2], images[:2], None, image_masks[:2])
        per_example = tiny_model.encode(tokens, images, None, image_masks)
    assert_close(shared.hidden, per_example.hidden[:2])


def test_encoder_skipping_padding_leaves_out_positions_masked_in_every_example(tiny_model, golden):
    """Prompt padding and padded patches masked in every example are not computed; positions
    valid in any example are kept, and encode exactly as when every position is computed."""
    g = golden("encoder.npz")
    image = t(g["image_encoder_inputs"])[:1]
    tokens = torch.tensor([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])  # the last column is padding in both
    patch = tiny_model.cfg.image_patch_size
    image_masks = torch.ones(2, (image.shape[1] // patch) * (image.shape[2] // patch), dtype=torch.int32)
    image_masks[:, -40:] = 0
    image_masks[1, -60:] = 0  # padded in one example only: kept, and masked in that example
    with torch.inference_mode():
        full = tiny_model.encode(tokens, image.repeat(2, 1, 1, 1), None, image_masks)
        skipped = tiny_model.encode(tokens, image.repeat(2, 1, 1, 1), None, image_masks, skip_padding=True)
    kept = full.mask.bool().any(dim=0)
    assert kept.sum() == 4 + image_masks.shape[1] - 40
    np.testing.assert_array_equal(skipped.mask.numpy(), full.mask[:, kept].numpy())
    valid = skipped.mask.bool()
    assert_close(skipped.hidden[valid], full.hidden[:, kept][valid], rtol=1e-5, atol=1e-5)
    assert_close(skipped.position_embedding, full.position_embedding[:, kept])


@pytest.mark.parametrize("masked", [False, True])
def test_teacher_forced_decode(tiny_model, golden, masked):
    """Decodes the reference's own encoder outputs, as the golden was made (see its README): from
    ours, their fp32 rounding (within 2e-5 of the encoder golden) grows through the decoder to up
    to ~1.3e-4 in a few logits on some CPUs, as much as the golden's own distance from a float64
    computation there."""
    g = golden("encoder.npz")
    encoded = EncoderOutput(t(g["encoded"]), t(g["encoder_masks"]), t(g["position_embedding"]))
    d = golden("decode.npz")
    prefix = "masked/" if masked else ""
    image_mask = t(d["masked/image_decoder_masks"]) if masked else torch.ones(2, 256)
    with torch.inference_mode():
        logits = tiny_model.decode(encoded, t(d["text_decoder_inputs"]).long(), t(d["image_decoder_inputs"]).long(),
                                   t(d["text_decoder_targets"]) > 0, image_mask)
    steps = d["text_decoder_inputs"].shape[1]
    image_logits = logits[:, steps:]
    assert_close(image_logits[..., d["vocab_subset"]], d[prefix + "image_logits_subset"])
    assert_close(torch.logsumexp(image_logits, -1), d[prefix + "image_logits_logsumexp"])
    np.testing.assert_array_equal(image_logits.argmax(-1).numpy(), d[prefix + "image_logits_argmax"])
    if not masked:
        assert_close(logits[:, :steps], d["text_logits"])
        assert_close(image_logits[:, 0], d["image_logits_pos0_full"])
        assert_close(image_logits[:, -1], d["image_logits_pos255_full"])
        assert (logits[:, :steps, 33152:] == MASK_VALUE).all() and (image_logits[..., :33152] == MASK_VALUE).all()


def test_decoder_rows_sharing_an_example_decode_as_with_a_copy_of_it_each(tiny_model, encoded):
    """Three decoder rows per example (answer options) share its cross-attention keys/values, and
    give what three copies of the example give, masked positions included."""
    torch.manual_seed(0)
    rows, steps = 3 * encoded.hidden.shape[0], 6
    text = torch.randint(1, 1000, (rows, steps))
    text_mask = torch.ones(rows, steps, dtype=torch.bool)
    text_mask[1, 4:] = False
    text_mask[5, 2:] = False
    image, image_mask = torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1)
    with torch.inference_mode():
        shared = tiny_model.decode(encoded, text, image, text_mask, image_mask)
        copies = EncoderOutput(encoded.hidden.repeat_interleave(3, 0), encoded.mask.repeat_interleave(3, 0),
                               encoded.position_embedding)
        copied = tiny_model.decode(copies, text, image, text_mask, image_mask)
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="5 rows of decoder inputs for 2 encoded examples"):
        tiny_model.decode(encoded, text[:5], image[:5], text_mask[:5], image_mask[:5])


def test_fused_projections_equal_separate_ones():
    torch.manual_seed(0)
    attention, mlp, x = Attention(32, 4, 8), MlpBlock(32, 64), torch.randn(2, 5, 32)
    with torch.inference_mode():
        separate = {which: attention.project(x, which) for which in ("qkv", "kv", "q")}
        mlp_separate = mlp(x)
        attention.fuse()
        mlp.fuse()
        for which, outputs in separate.items():
            for fused, plain in zip(attention.project(x, which), outputs, strict=True):
                torch.testing.assert_close(fused, plain)
        torch.testing.assert_close(mlp(x), mlp_separate)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows, pieces", [(60, [60]), (100, [30, 30, 30, 10])])
def test_cpu_mlp_of_many_rows_runs_in_pieces_with_the_same_result(rows, pieces, fused, monkeypatch):
    """Rows whose gated activations take more than twice MLP_PIECE_BYTES go through the MLP in
    pieces of that size, with the same values as whole (and gradients through them)."""
    from uio.model import transformer

    torch.manual_seed(0)
    mlp, x = MlpBlock(32, 64), torch.randn(2, rows // 2, 32)
    if fused:
        mlp.fuse()
    x.requires_grad_(True)
    whole = mlp(x)
    (whole_grad,) = torch.autograd.grad(whole.square().sum(), x)
    seen, forward = [], mlp._forward
    monkeypatch.setattr(mlp, "_forward", lambda part: seen.append(part.numel() // 32) or forward(part))
    monkeypatch.setattr(transformer, "MLP_PIECE_BYTES", 30 * 2 * 64 * 4)  # 30 rows of fp32 activations
    in_pieces = mlp(x)
    assert seen == pieces
    torch.testing.assert_close(in_pieces, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(in_pieces.square().sum(), x)[0], whole_grad, rtol=1e-6, atol=1e-6)


def test_decoder_weights_are_rows_only_where_the_cpu_kernels_stream_them(monkeypatch):
    """fp32 weights are (in, out) views of the checkpoint's kernels, except the decoder's on the CPU
    while uio's CPU kernels serve fp32 steps; other dtypes are always (out, in) rows."""
    from uio.accel import cpu_kernels
    from uio.model.transformer import empty_weight, stores_transposed

    monkeypatch.setattr(cpu_kernels, "in_use", lambda dtype: dtype == torch.float32)
    assert not stores_transposed(torch.float32, "cpu", decoder=True)
    assert empty_weight(24, 40, "cpu", torch.float32, decoder=True).is_contiguous()
    assert stores_transposed(torch.float32, "cpu") and stores_transposed(torch.float32, "cuda", decoder=True)
    assert empty_weight(24, 40, "cpu", torch.float32).T.is_contiguous()
    assert not stores_transposed(torch.bfloat16, "cpu") and not stores_transposed(torch.bfloat16, "cpu", decoder=True)
    monkeypatch.setattr(cpu_kernels, "in_use", lambda dtype: False)
    assert stores_transposed(torch.float32, "cpu", decoder=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_fusing_lays_the_weights_out_for_their_dtype(transposed, dtype):
    """Whatever the weights' layout, the fused matrix has the one stores_transposed picks for
    their dtype (fp32: views of an (in, out) matrix), and the modules hold views of it."""
    torch.manual_seed(0)
    attention = Attention(32, 4, 8).to(dtype)
    weights = [m.weight.detach().clone() for m in (attention.query, attention.key, attention.value)]
    if transposed:
        for m in (attention.query, attention.key, attention.value):
            m.weight = torch.nn.Parameter(m.weight.detach().T.contiguous().T)
    attention.fuse()
    assert attention.fused_qkv.T.is_contiguous() == (dtype == torch.float32)
    assert attention.fused_qkv.is_contiguous() == (dtype != torch.float32)
    assert torch.equal(attention.fused_qkv, torch.cat(weights))
    assert attention.key.weight.untyped_storage().data_ptr() == attention.fused_qkv.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 rows take the plain matmul
def test_prepacked_weights_give_the_plain_results(rows, dtype, tolerance, without_cpu_kernel):
    if not packed_matmul_supported(dtype):
        pytest.skip(f"this CPU has no oneDNN packed matmul for {dtype}")
    torch.manual_seed(0)
    attention, mlp = Attention(32, 4, 8).to(dtype), MlpBlock(32, 64).to(dtype)
    x = torch.randn(1, rows, 32, dtype=dtype)
    attention.fuse()
    mlp.fuse()
    with torch.inference_mode():
        q = attention.project(x, "q")[0]
        bias = torch.zeros(1, 1, rows, rows, dtype=x.dtype)
        plain = attention.project(x, "qkv"), attention.attend(q, q, q, bias), mlp(x)
        attention.prepack("qkv")
        mlp.prepack()
        packed = attention.project(x, "qkv"), attention.attend(q, q, q, bias), mlp(x)
    torch.testing.assert_close(packed, plain, rtol=tolerance, atol=tolerance)


def test_weight_packer_reuses_its_buffer_without_touching_earlier_packs():
    """Transposed weights of growing and shrinking sizes go through one reused buffer; every
    packed copy still multiplies as its own weight's direct packing does."""
    if not packed_matmul_supported(torch.float32):
        pytest.skip("this CPU has no oneDNN packed matmul for fp32")
    torch.manual_seed(0)
    weights = [torch.randn(n_in, n_out).T for n_out, n_in in ((48, 32), (96, 64), (16, 32), (64, 16))]
    weights.append(torch.randn(40, 32))  # contiguous: packed directly
    pack = WeightPacker()
    packed = [pack(w) for w in weights]
    for weight, packed_copy in zip(weights, packed):
        x = torch.randn(3, weight.shape[1])
        assert torch.equal(linear(x, weight, packed_copy), linear(x, weight, pack_weight(weight.contiguous())))
        torch.testing.assert_close(linear(x, weight, packed_copy), x @ weight.T)


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_bf16_matmuls_of_many_rows_run_in_fp32_where_bf16_is_emulated(monkeypatch, bf16_kernels, without_cpu_kernel):
    """Emulated bf16 matmuls are ~6x slower than fp32 ones for an encoder's rows: without bf16
    kernels a bf16 matmul of more than a few rows multiplies in fp32 and rounds to bf16."""
    from uio.model import transformer

    monkeypatch.setattr(transformer, "computes_natively", lambda dtype, device: bf16_kernels)
    seen, plain_linear = [], transformer._plain_linear
    monkeypatch.setattr(transformer, "_plain_linear", lambda x, w: seen.append(w.dtype) or plain_linear(x, w))
    torch.manual_seed(0)
    weight = torch.randn(48, 64, dtype=torch.bfloat16)
    few, many = transformer.EMULATED_BF16_MAX_ROWS, transformer.EMULATED_BF16_MAX_ROWS + 1
    for rows in (few, many, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        got = transformer.linear(x, weight)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), x.float() @ weight.float().T, rtol=1e-2, atol=2e-2)
    many_rows = torch.bfloat16 if bf16_kernels else torch.float32
    assert seen == [torch.bfloat16, many_rows, many_rows]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 300])  # a decoding step's size (one-kernel path), an encoder's (plain path)
def test_rms_norm_computes_torchs_rms_norm_in_float32(rows, dtype, device):
    torch.manual_seed(0)
    norm = RMSNorm(512)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    norm = norm.to(device, dtype)
    x = (torch.randn(2, rows, 512) * 3).to(device, dtype)
    expected = torch.nn.functional.rms_norm(x.float(), (512,), norm.weight.float(), 1e-6).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    if rows > 100 and device == "cpu":  # the same arithmetic as torch's: identical results
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_rows", [1, 8, 64])  # a decoding step's, a step's 8 shared rows, teacher forcing's
def test_attention_is_softmax_of_biased_logits(query_rows, device):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, length, 64, generator=generator) for length in (query_rows, 300, 300))
    bias = torch.randn(2, 6, query_rows, 300, generator=generator)
    bias[..., 250:] = MASK_VALUE
    expected = (q.double() @ k.double().transpose(-1, -2) + bias.double()).softmax(-1) @ v.double()
    got = attention(*(x.to(device) for x in (q, k, v, bias)))
    torch.testing.assert_close(got.cpu(), expected.float(), rtol=1e-5, atol=1e-5)


def test_position_buckets_cached_in_inference_mode_work_under_autograd():
    biases = RelativePositionBiases(2)
    torch.nn.init.normal_(biases.image_rel_embedding)
    with torch.inference_mode():
        cached = biases(3, 16, 4, True, torch.device("cpu"))  # builds and caches the buckets
    again = biases(3, 16, 4, True, torch.device("cpu"))
    torch.testing.assert_close(again.detach(), cached)
    again.sum().backward()
    assert biases.image_rel_embedding.grad.abs().sum() > 0


def test_building_on_meta_skips_the_embedding_init_and_its_dynamo_import(conformance):
    # In a fresh interpreter: a random init on `meta` makes torch import torch._dynamo (seconds).
    code = ("import sys, torch\nfrom uio.config import load_config\nfrom uio.model.transformer import UnifiedIO\n"
            "with torch.device('meta'):\n    UnifiedIO(*load_config(sys.argv[1]))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(conformance / "tiny" / "config.json")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embeddings_off_meta_are_initialised_as_torchs():
    torch.manual_seed(0)
    ours = Embedding(1000, 16).weight
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.Embedding(1000, 16).weight)



@pytest.mark.parametrize("shape", [(2, 40), (90,)])  # more rows than a decoding step's
@pytest.mark.parametrize("layout", ["out-in", "in-out", "rows of a fused in-out matrix"])
def test_fp32_matmuls_of_many_rows_run_on_onednn_without_gradients(monkeypatch, shape, layout, without_cpu_kernel):
    """fp32 products of many rows on an x86 CPU run on oneDNN with the weight as it is (any layout):
    torch's results to float32 rounding; where a gradient is wanted, or for a step's few rows, on
    torch's matmul."""
    from uio.model import transformer

    if not packed_matmul_supported(torch.float32):
        pytest.skip("no oneDNN fp32 matmul on this CPU")
    calls = []
    onednn = transformer._onednn_linear
    monkeypatch.setattr(transformer, "_onednn_linear", lambda x, w: calls.append(w.shape) or onednn(x, w))
    torch.manual_seed(0)
    weight = {"out-in": torch.randn(300, 64), "in-out": torch.randn(64, 300).T,
              "rows of a fused in-out matrix": torch.randn(64, 900).T[300:600]}[layout]
    x = torch.randn(*shape, 64)
    expected = x.double() @ weight.double().T
    with torch.no_grad():
        got = linear(x, weight)
    assert calls == [weight.shape] and got.shape == (*shape, 300)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        linear(x[..., :2, :], weight)  # (torch's matmul here, as uio's CPU kernels are off)
    x.requires_grad_()
    linear(x, weight).sum().backward()
    assert len(calls) == 1 and x.grad is not None


@pytest.mark.parametrize("kernels", [True, False])
def test_every_weight_onednn_multiplies_unpacked_has_contiguous_rows_or_columns(conformance, test_image, monkeypatch,
                                                                                kernels):
    """oneDNN multiplies a weight whose rows and columns are both strided (a row range of a transposed
    matrix, as the cross-attention's key/value rows of an fp32 (in, out) fused matrix were) by a
    far slower reference kernel: every weight a model hands it unpacked, in every call that
    multiplies many rows (projecting the encoding into cross-attention keys/values, encoding,
    scoring answer options), has contiguous rows or columns, with uio's CPU kernels in use or not."""
    from uio.accel import cpu_kernels
    from uio.model import transformer
    from uio.runner import ModelRunner

    if not packed_matmul_supported(torch.float32):
        pytest.skip("oneDNN's linear is not used on this CPU")
    if kernels and not cpu_kernels.load():
        pytest.skip("uio's CPU kernels are not loaded here")
    monkeypatch.setattr(cpu_kernels, "enabled", kernels)
    onednn_linear, weights = transformer._onednn_linear, []
    monkeypatch.setattr(transformer, "_onednn_linear", lambda x, w: weights.append(w) or onednn_linear(x, w))
    runner = ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin", log_inputs=False,
                         tokenizer=conformance / "tokenizer" / "spiece.model")
    runner.run([test_image], ["what is on the left ?"], output_text_len=4)
    runner.image_classification(test_image, answer_options=[f"object number {i}" for i in range(40)])
    unpacked = [w for w in weights if w.layout == torch.strided]
    assert unpacked, "no call multiplied many rows by oneDNN"
    assert [w.stride() for w in unpacked if not (w.is_contiguous() or w.T.is_contiguous())] == []
