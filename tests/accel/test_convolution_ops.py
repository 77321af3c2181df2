"""uio.accel.convolution: the VQGAN's faster conv, upsampling and GroupNorm against the reference
operations, and their derived weights (prepacked, polyphase) under the registry's rule."""
from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F

from uio.accel import convolution, cpu_kernels
from uio.accel.derived import FORMS
from uio.config import VAEConfig
from uio.model import ops
from uio.model.vqgan import VQGAN, GroupNorm

SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                  z_channels=8, embed_dim=8, n_embed=16)


def small_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(SMALL).eval()


def channels_last(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def reference(name: str):
    return ops.REFERENCE[name]


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 0, 3), (1, 0, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv2d_computes_the_reference(stride, padding, kernel, with_residual):
    torch.manual_seed(0)
    x = channels_last(2, 16, 9, 8)
    weight, bias = torch.randn(24, 16, kernel, kernel) / 8, torch.randn(24)
    out_shape = F.conv2d(x, weight, bias, stride=stride, padding=padding).shape
    residual = channels_last(*out_shape) if with_residual else None
    expected = reference("conv2d")(x, weight, bias, stride, padding, residual)
    with torch.no_grad():
        got = convolution.conv2d(x, weight, bias, stride, padding, residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_upsample_conv2d_computes_the_reference(dtype, memory_format):
    """Phase convs on the low-resolution input equal nearest x2 upsampling then a 3x3 conv (the
    taps are summed in float32, then rounded to the weight's dtype)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7).to(dtype).contiguous(memory_format=memory_format)
    weight, bias = (torch.randn(12, 16, 3, 3) / 8).to(dtype), torch.randn(12).to(dtype)
    with torch.no_grad():
        got = convolution.upsample_conv2d(x, weight, bias)
    expected = reference("upsample_conv2d")(x.double(), weight.double(), bias.double())
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert got.dtype == dtype and got.shape == expected.shape == (2, 12, 10, 14)
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_what_a_fast_version_does_not_serve_runs_the_reference(monkeypatch):
    """Wanted gradients, and float64, go to the reference versions (and gradients come back)."""
    calls = []
    for name in convolution.FAST_OPS:
        monkeypatch.setitem(ops.REFERENCE, name, lambda *args, _f=ops.REFERENCE[name]: calls.append(_f) or _f(*args))
    x = channels_last(1, 64, 6, 6).requires_grad_()
    weight = torch.randn(64, 64, 3, 3, requires_grad=True)
    bias = torch.randn(64)
    convolution.conv2d(x, weight, bias, 1, 1).sum().backward()
    convolution.upsample_conv2d(x, weight, bias).sum().backward()
    convolution.group_norm(x, 32, torch.ones(64), bias, 1e-6, swish=True).sum().backward()
    assert len(calls) == 3 and x.grad is not None and weight.grad is not None
    with torch.no_grad():
        convolution.group_norm(x.double(), 32, torch.ones(64), bias, 1e-6)
        convolution.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    assert len(calls) == 5


@pytest.mark.parametrize("kernel_state", ["kernel", "chunks"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("accel", ["accel off", "accel on"])
def test_group_norm_accurate_for_offset_inputs(memory_format, accel, kernel_state, monkeypatch):
    """Centred statistics everywhere: by the reference, uio's kernel and the chunked torch path."""
    if accel == "accel off":
        ops.reset()  # the reference (tests/accel/conftest.py registers the fast ones again after)
    if kernel_state == "chunks":
        monkeypatch.setattr(cpu_kernels, "enabled", False)
        monkeypatch.setattr(convolution, "GROUP_NORM_CHUNK_ELEMENTS", 64 * 100)  # several chunks, the last short
    torch.manual_seed(0)
    norm = GroupNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 32, 32, dtype=torch.float64) + 30.0  # large mean: E[x^2] - E[x]^2 cancels
    expected = F.group_norm(x, 32, norm.weight.double(), norm.bias.double(), 1e-6)
    with torch.no_grad():
        got = norm(x.float().contiguous(memory_format=memory_format))
        with_swish = norm(x.float().contiguous(memory_format=memory_format), swish=True)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(with_swish.double(), F.silu(expected), rtol=0, atol=2e-5)


def test_vqgan_norms_run_on_the_kernel_only_where_it_serves(monkeypatch):
    if not cpu_kernels.available():
        pytest.skip(f"uio's CPU kernel is not loaded: {cpu_kernels.failure()}")
    calls = []
    group_norm = cpu_kernels.group_norm
    monkeypatch.setattr(cpu_kernels, "group_norm", lambda *args: calls.append(args) or group_norm(*args))
    norm = GroupNorm(64)
    x = torch.randn(1, 64, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        served = norm(x, swish=True)
        assert len(calls) == 1
        norm(x.contiguous())  # not channels-last
        norm(x.bfloat16())
        monkeypatch.setattr(cpu_kernels, "enabled", False)
        by_torch = norm(x, swish=True)
    norm(x)  # gradients wanted for the norm's weights: the kernel has no backward
    norm.requires_grad_(False)
    norm(x.requires_grad_())  # for x
    assert len(calls) == 1
    torch.testing.assert_close(served, by_torch, rtol=1e-5, atol=1e-5)


def decode_as_a_fresh_copy(model: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """What a VQGAN that never decoded (no derived forms of its own) makes of ``model``'s weights."""
    fresh = VQGAN(SMALL).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh.decode_codes(codes)


def test_prepacked_weights_follow_parameter_updates():
    """The derived weights follow in-place updates, load_state_dict and .to(); deep copies start
    without them; autograd still works (the packed kernels are inference-only)."""
    model, other = small_vqgan(0), small_vqgan(1)
    codes = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        before = model.decode_codes(codes)
        assert FORMS.forms(convolution.PACKED)  # made on first use
        for p in model.parameters():
            p.mul_(1.5)
        got = model.decode_codes(codes)
        assert not torch.allclose(got, before)
        torch.testing.assert_close(got, decode_as_a_fresh_copy(model, codes))
        torch.testing.assert_close(copy.deepcopy(model).decode_codes(codes), got)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.decode_codes(codes), other.decode_codes(codes))
        model.to(torch.bfloat16).decode_codes(codes)
        model.to(torch.float32)  # new tensors, holding the weights rounded to bf16
        torch.testing.assert_close(model.decode_codes(codes), decode_as_a_fresh_copy(model, codes))
    out = model.decode_codes(codes)
    out.float().square().mean().backward()
    assert model.decoder.up_0_upsample.conv.weight.grad is not None


def test_derived_weights_go_with_their_model():
    FORMS.clear()
    model = small_vqgan()
    with torch.no_grad():
        model.decode_codes(torch.randint(0, 16, (1, 16)))
    assert FORMS.forms(convolution.PACKED)
    del model
    gc.collect()
    assert not FORMS.forms(convolution.PACKED)


def test_a_vqgan_made_in_inference_mode_decodes():
    """Weights made in inference mode have no version counter: the prepacked weights' cache keys
    on their address alone there (it raised "Inference tensors do not track version counter")."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (2, 16))
    with torch.inference_mode():
        made_here = VQGAN(SMALL).eval().to(memory_format=torch.channels_last)
        assert next(made_here.parameters()).is_inference()
        got = made_here.decode_codes(codes)
    with torch.no_grad():
        torch.testing.assert_close(got, decode_as_a_fresh_copy(made_here, codes))


def test_copies_reconstruct_as_the_original():
    """Deep copies and pickled copies (which leave the derived weights behind) compute what the
    original computes; ``forward`` is encode_to_codes then decode_codes."""
    model = small_vqgan()
    images = torch.rand(2, 8, 8, 3) * 2 - 1
    with torch.no_grad():
        expected = model.decode_codes(model.encode_to_codes(images))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
        for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(duplicate(images), expected, rtol=0, atol=0)
