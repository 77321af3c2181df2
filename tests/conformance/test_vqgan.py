"""The VQGAN against the reference's goldens (golden/vae.npz) and the released parameter layout, with
acceleration on and off (tests/conformance/conftest.py)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uio.checkpoint import read_bin, to_torch_layout, torch_key
from uio.config import VAEConfig, load_config
from uio.model.vqgan import VQGAN, Downsample, Upsample

PREFIX = "discrete_vae/"
# Where the reference's second-best code is this close (squared distance), a flip is legitimate.
TIE_GAP = 1e-4


def vae_state_dict(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The ``discrete_vae/*`` leaves of a flax checkpoint as a VQGAN state dict (copied)."""
    return {torch_key(path[len(PREFIX):]): torch.tensor(to_torch_layout(path, array))
            for path, array in params.items() if path.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_vqgan(conformance) -> VQGAN:
    model = VQGAN(load_config(conformance / "tiny" / "config.json")[1]).eval()
    model.load_state_dict(vae_state_dict(read_bin(conformance / "tiny" / "tiny.bin")), strict=True)
    return model


@pytest.fixture(scope="module")
def vae(golden) -> dict[str, np.ndarray]:
    return golden("vae.npz")


def assert_close_to_scale(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Elementwise |a - e| <= rel * max|e| (+ rel * |e|): the tolerance scales with the output."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual.float().numpy(), expected, rtol=rel, atol=rel * scale)


def test_encode_pre_quant(tiny_vqgan, vae, accel_mode):
    with torch.no_grad():
        pre_quant = tiny_vqgan.encode(torch.from_numpy(vae["encode/input"]))
    assert pre_quant.shape == vae["encode/pre_quant"].shape
    np.testing.assert_allclose(pre_quant.numpy(), vae["encode/pre_quant"], rtol=1e-4, atol=1e-4)


def test_encode_token_ids(tiny_vqgan, vae, accel_mode):
    codes = tiny_vqgan.encode_to_codes(torch.from_numpy(vae["encode/input"]))
    expected, gap = vae["encode/token_ids"], vae["encode/best_gap"]
    assert codes.dtype == torch.long and codes.shape == expected.shape
    flips = codes.numpy() != expected
    assert not (flips & (gap >= TIE_GAP)).any(), f"codes differ where the reference's choice is clear: " \
                                                  f"{np.argwhere(flips & (gap >= TIE_GAP)).tolist()}"
    if flips.any():
        warnings.warn(f"{int(flips.sum())} VQ code(s) flipped at near-ties (best_gap {gap[flips].tolist()})")


def test_decode_codes(tiny_vqgan, vae, accel_mode):
    with torch.no_grad():
        out = tiny_vqgan.decode_codes(torch.from_numpy(vae["decode/code"]).long())
    assert out.shape == vae["decode/output"].shape
    assert_close_to_scale(out, vae["decode/output"])


def test_roundtrip(tiny_vqgan, vae, accel_mode):
    with torch.no_grad():
        out = tiny_vqgan.decode_codes(torch.from_numpy(vae["encode/token_ids"]).long())
    assert_close_to_scale(out, vae["roundtrip/output"])


def test_state_dict_matches_released_layout(conformance):
    manifest = json.loads((conformance / "manifests" / "small.json").read_text())
    cfg = load_config(conformance / "manifests" / "small.json")[1]
    with torch.device("meta"):
        model = VQGAN(cfg)
    expected = {}
    for leaf in manifest["params"]:
        if leaf["path"].startswith(PREFIX):
            shape = np.broadcast_to(np.float32(0), leaf["shape"])  # zero-memory stand-in for the layout
            expected[torch_key(leaf["path"][len(PREFIX):])] = tuple(to_torch_layout(leaf["path"], shape).shape)
    got = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert sum(int(np.prod(s)) for s in got.values()) == manifest["vae_params"]


def test_decoder_numbering_and_names():
    model = VQGAN(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                            z_channels=8, embed_dim=8, n_embed=16))
    keys = set(model.state_dict())
    # up_0 is the lowest resolution: widest channels, attention, and an upsample.
    assert model.decoder.up_0_block_0.conv1.weight.shape[0] == 64
    assert {"decoder.up_0_attn_1.q.weight", "decoder.up_0_upsample.conv.weight",
            "encoder.down_0_downsample.conv.weight", "encoder.down_1_attn_0.proj_out.bias",
            "encoder.norm_out.weight", "quantize.weight"} <= keys
    assert "decoder.up_1_upsample.conv.weight" not in keys
    assert not list(model.buffers())


def test_downsample_pads_bottom_right_only(accel_mode):
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(1, 4, 6, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), expected)
    assert down(torch.randn(1, 4, 5, 5)).shape[-2:] == (3, 3)  # odd sizes: SAME pads (1, 1)


def test_upsample_is_nearest_x2_then_a_3x3_conv(accel_mode):
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(up(x), expected)


def test_decode_codes_shapes_dtypes_and_errors(accel_mode):
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                    z_channels=8, embed_dim=8, n_embed=16)
    model = VQGAN(cfg).eval()
    codes = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        assert model.decode_codes(codes).shape == (2, 8, 8, 3)
        assert model.encode_to_codes(torch.rand(2, 8, 8, 3) * 2 - 1).shape == (2, 16)
        half = model.to(torch.bfloat16)
        assert half.decode_codes(codes).dtype == torch.bfloat16
        assert half.encode_to_codes(torch.rand(1, 8, 8, 3)).shape == (1, 16)
    with pytest.raises(ValueError, match="square"):
        model.decode_codes(torch.zeros(1, 15, dtype=torch.long))


def test_quantize_matches_brute_force_nearest():
    torch.manual_seed(0)
    model = VQGAN(VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), z_channels=4,
                            embed_dim=4, n_embed=64))
    latents = torch.randn(3, 5, 4)
    brute = torch.cdist(latents.double(), model.quantize.weight.double()[None]).argmin(-1)
    assert torch.equal(model.quantize_latents(latents), brute)


def test_bf16_decode_close_to_fp32(tiny_vqgan, vae, accel_mode):
    """bf16 weights and activations (GroupNorm in float32) stay close to the float32 decode.

    Measured on this checkpoint: 43.3-44.1 dB against a peak of 2 (the image range), i.e. RMS error
    ~1.3e-2 on outputs spanning about [-5, 4]; the bound leaves ~2.5 dB of margin.
    """
    import copy
    half = copy.deepcopy(tiny_vqgan).to(torch.bfloat16)
    torch.manual_seed(0)
    codes = torch.cat([torch.from_numpy(vae["decode/code"]).long(),
                       torch.randint(0, tiny_vqgan.config.n_embed, (2, 256))])
    with torch.no_grad():
        ref = tiny_vqgan.decode_codes(codes)
        out = half.decode_codes(codes)
    assert out.dtype == torch.bfloat16
    mse = float((out.float() - ref).square().mean())
    assert 10 * np.log10(4.0 / mse) > 41.0


@pytest.mark.parametrize("api", ["per-operation", "legacy"])
def test_float32_convolutions_on_a_gpu_compute_in_full_float32(monkeypatch, api):
    """cuDNN's TF32 default is switched off inside, then restored; CPU tensors change nothing."""
    from types import SimpleNamespace

    from uio.model.vqgan import full_fp32_convolutions

    if api == "legacy":  # torch before 2.9: one flag, no cudnn.conv
        monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(allow_tf32=True))
    elif not hasattr(torch.backends.cudnn, "conv"):  # this torch is older: stand in for 2.9's API
        monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(conv=SimpleNamespace(fp32_precision="none")))
    cudnn = torch.backends.cudnn
    read = (lambda: cudnn.conv.fp32_precision) if api == "per-operation" else (lambda: cudnn.allow_tf32)
    before = read()
    with full_fp32_convolutions(torch.zeros(1)):
        assert read() == before
    on_gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    with full_fp32_convolutions(on_gpu):
        assert read() == ("ieee" if api == "per-operation" else False)
    assert read() == before
    with full_fp32_convolutions(SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)):
        assert read() == before
