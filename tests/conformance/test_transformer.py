"""The transformer against the reference's outputs on the tiny random checkpoint, and the
semantics of its operations (uio.model.ops), with acceleration on and off."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from uio.model import ops
from uio.model.embedding import Embedding
from uio.model.positions import RelativePositionBiases, image_relative_bucket, text_relative_bucket
from uio.model.masks import MASK_VALUE
from uio.model.transformer import EncoderOutput, RMSNorm

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 300])  # a decoding step's size (one-kernel path), an encoder's (plain path)
def test_rms_norm_computes_torchs_rms_norm_in_float32(accel_mode, rows, dtype, device):
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
def test_attention_is_softmax_of_biased_logits(accel_mode, query_rows, device):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, length, 64, generator=generator) for length in (query_rows, 300, 300))
    bias = torch.randn(2, 6, query_rows, 300, generator=generator)
    bias[..., 250:] = MASK_VALUE
    expected = (q.double() @ k.double().transpose(-1, -2) + bias.double()).softmax(-1) @ v.double()
    got = ops.attention(*(x.to(device) for x in (q, k, v, bias)))
    torch.testing.assert_close(got.cpu(), expected.float(), rtol=1e-5, atol=1e-5)


def test_position_buckets_cached_in_inference_mode_work_under_autograd(accel_mode):
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

