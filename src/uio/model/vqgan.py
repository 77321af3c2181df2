"""The VQGAN image tokenizer (the reference's ``DiscreteVAE``), in PyTorch.

Module names mirror the flax parameter tree, so a checkpoint path ``discrete_vae/<rest>`` is
the state-dict key ``torch_key(<rest>)`` (``decoder.up_0_block_0.conv1.weight``, ...).

The public methods take and return images channels-last (NHWC), as the reference and the rest
of this package do. Internally the tensors are NCHW-shaped views with channels-last strides:
permuting an NHWC tensor to NCHW is then free, and convolutions run in channels-last kernels.

Numerics follow the reference: GroupNorm with 32 groups and eps 1e-6, swish, nearest x2
upsampling, stride-2 downsampling with TensorFlow "SAME" padding (for even sizes that is one row
and column of zeros on the bottom/right only), attention over all positions scaled by C**-0.5, and
codes picked by argmin of ``|z|^2 + |e|^2 - 2 z.e``.

Convolutions, upsampling and GroupNorm compute through :mod:`uio.model.ops` (plain PyTorch there;
:mod:`uio.accel.convolution` has faster versions).

Note the decoder's level numbering: ``up_0`` is the LOWEST resolution (the reverse of taming's).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from uio.config import VAEConfig
from uio.model import ops
from uio.model.embedding import Embedding

_GROUPS = 32
_EPS = 1e-6
# Cap on the (rows x codebook) distance matrix built per step of encode_to_codes, in elements.
_DIST_CHUNK_ELEMS = 1 << 24


def _conv(n_in: int, n_out: int, kernel: int) -> Conv2d:
    """A stride-1 conv with SAME padding (symmetric for odd kernels)."""
    return Conv2d(n_in, n_out, kernel, padding=kernel // 2)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) computed by :func:`ops.conv2d`; square stride and
    zero padding only. ``forward(x, residual)`` returns ``conv(x) + residual``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], residual)


class GroupNorm(nn.GroupNorm):
    """The reference's GroupNorm: 32 groups, eps 1e-6, computed in float32 (:func:`ops.group_norm`).

    ``forward(x, swish=True)`` also applies swish."""

    def __init__(self, channels: int):
        super().__init__(_GROUPS, channels, eps=_EPS)

    def forward(self, x: torch.Tensor, swish: bool = False) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, swish)


class ResBlock(nn.Module):
    """Pre-activation residual block: (norm, swish, 3x3 conv) twice, 1x1 shortcut if widths differ."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1 = GroupNorm(n_in)
        self.conv1 = _conv(n_in, n_out, 3)
        self.norm2 = GroupNorm(n_out)
        self.conv2 = _conv(n_out, n_out, 3)
        if n_in != n_out:
            self.nin_shortcut = _conv(n_in, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, swish=True))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return self.conv2(self.norm2(h, swish=True), residual=shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm(channels)
        self.q = _conv(channels, channels, 1)
        self.k = _conv(channels, channels, 1)
        self.v = _conv(channels, channels, 1)
        self.proj_out = _conv(channels, channels, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv on (B, HW, C) tokens: a matrix product."""
        return ops.linear(tokens, conv.weight.flatten(1)) + conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        q, k, v = (self._linear(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        # SDPA's default scale is C**-0.5, as in the reference; one head of width C.
        out = self._linear(self.proj_out, F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.view(b, h, w, c).permute(0, 3, 1, 2) + x


class Downsample(nn.Module):
    """3x3 stride-2 conv with TensorFlow SAME padding (extra padding goes bottom/right)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    @staticmethod
    def _same_pad(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._same_pad(x.shape[-2])
        left, right = self._same_pad(x.shape[-1])
        return self.conv(F.pad(x, (left, right, top, bottom)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (:func:`ops.upsample_conv2d`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.upsample_conv2d(x, self.conv.weight, self.conv.bias)


class _Tower(nn.Module):
    """Runs its children in registration order, then norm_out, swish and conv_out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.named_children():
            if name == "norm_out":
                break
            x = layer(x)
        return self.conv_out(self.norm_out(x, swish=True))


class Encoder(_Tower):
    """Image (B, in_channels, H, W) -> latents (B, z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        in_mult = (1,) + tuple(cfg.ch_mult)
        res = cfg.resolution
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3)
        for i in range(levels):
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * cfg.ch_mult[i]
            for j in range(cfg.num_res_blocks):
                self.add_module(f"down_{i}_block_{j}", ResBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    self.add_module(f"down_{i}_attn_{j}", AttnBlock(block_in))
            if i != levels - 1:
                self.add_module(f"down_{i}_downsample", Downsample(block_in))
                res //= 2
        self.mid_block_1 = ResBlock(block_in, block_in)
        self.mid_attn_1 = AttnBlock(block_in)
        self.mid_block_2 = ResBlock(block_in, block_in)
        self.norm_out = GroupNorm(block_in)
        self.conv_out = _conv(block_in, cfg.z_channels, 3)


class Decoder(_Tower):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h*2^(L-1), w*2^(L-1)); up_0 is lowest-res."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        res = cfg.resolution // 2 ** (levels - 1)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, block_in, 3)
        self.mid_block_1 = ResBlock(block_in, block_in)
        self.mid_attn_1 = AttnBlock(block_in)
        self.mid_block_2 = ResBlock(block_in, block_in)
        for idx, level in enumerate(reversed(range(levels))):
            block_out = cfg.ch * cfg.ch_mult[level]
            for j in range(cfg.num_res_blocks + 1):
                self.add_module(f"up_{idx}_block_{j}", ResBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    self.add_module(f"up_{idx}_attn_{j}", AttnBlock(block_in))
            if level != 0:
                self.add_module(f"up_{idx}_upsample", Upsample(block_in))
                res *= 2
        self.norm_out = GroupNorm(block_in)
        self.conv_out = _conv(block_in, cfg.out_ch, 3)


@contextlib.contextmanager
def full_fp32_convolutions(x: torch.Tensor):
    """Within it, float32 convolutions on ``x``'s device compute in full float32: on a GPU, cuDNN's
    default is TF32 (a 10-bit mantissa, errors of ~1e-3). The VQGAN's float32 images use it, as the
    reference computes them in full float32."""
    if x.device.type != "cuda" or x.dtype != torch.float32:
        yield
        return
    cudnn = torch.backends.cudnn
    # torch 2.9 added per-operation precision settings; earlier versions have one cuDNN flag.
    owner, flag, full = ((cudnn.conv, "fp32_precision", "ieee") if hasattr(cudnn, "conv")
                         else (cudnn, "allow_tf32", False))
    before = getattr(owner, flag)
    setattr(owner, flag, full)
    try:
        yield
    finally:
        setattr(owner, flag, before)


def _to_nchw(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NHWC -> NCHW with channels-last strides; free for a contiguous NHWC tensor already in dtype."""
    return x.to(dtype).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class VQGAN(nn.Module):
    """The reference's ``DiscreteVAE``: encoder, quant_conv, codebook, post_quant_conv, decoder.

    Images are NHWC in [-1, 1]; codes are (B, h*w) row-major indices into the codebook.
    Works in any floating dtype; GroupNorm and the codebook distances run in float32. On GPU
    keep TF32 matmuls off (torch's default) for codes that match the reference at near-ties;
    float32 convolutions never use TF32 (see :func:`full_fp32_convolutions`).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = _conv(cfg.z_channels, cfg.z_channels, 1)
        self.quantize = Embedding(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """NHWC images (B, H, W, in_channels) -> pre-quantisation latents, NHWC.

        The result is ``quant_conv(encoder(x))``, (B, H/16, W/16, z_channels) for the released
        configs (the reference quantises it as-is, so z_channels must equal embed_dim).
        """
        x = _to_nchw(images, self._dtype)
        with full_fp32_convolutions(x):
            return self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """NHWC images -> (B, h*w) int64 codebook indices of the nearest codebook vectors."""
        latents = self.encode(images)
        return self.quantize_latents(latents).reshape(latents.shape[0], -1)

    @torch.no_grad()
    def quantize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices for latents (..., embed_dim), shape ``latents.shape[:-1]``.

        Uses the reference's expansion ``|z|^2 + |e|^2 - 2 z.e`` in float32 (not ``|z - e|^2``)
        so that near-ties round the same way; argmin keeps the first of exact ties, as JAX does.
        """
        z = latents.reshape(-1, latents.shape[-1]).float()
        codebook = self.quantize.weight.float()
        code_sq = codebook.square().sum(1)
        rows = max(1, _DIST_CHUNK_ELEMS // codebook.shape[0])
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], rows):
            chunk = z[start:start + rows]
            base = chunk.square().sum(1, keepdim=True) + code_sq
            dist = torch.addmm(base, chunk, codebook.t(), alpha=-2.0)
            out[start:start + rows] = dist.argmin(1)
        return out.reshape(latents.shape[:-1])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes, N a square number, -> raw NHWC decoder output (B, H, W, out_ch).

        For the released models 256 codes (16 x 16) decode to a 256 x 256 image; the output is
        unclipped, roughly in [-1, 1].
        """
        batch, n = codes.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"decode_codes needs a square number of codes per image, got {n}")
        latents = F.embedding(codes, self.quantize.weight).reshape(batch, side, side, -1)
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantised NHWC latents (B, h, w, embed_dim) -> raw NHWC decoder output."""
        x = _to_nchw(latents, self._dtype)
        with full_fp32_convolutions(x):
            return self.decoder(self.post_quant_conv(x)).permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct NHWC images through the codebook (encode, quantise, decode)."""
        codes = self.encode_to_codes(images)
        return self.decode_codes(codes)


__all__ = ["VQGAN", "AttnBlock", "Decoder", "Downsample", "Encoder", "GroupNorm", "ResBlock", "Upsample"]
