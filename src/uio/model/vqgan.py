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

Note the decoder's level numbering: ``up_0`` is the LOWEST resolution (the reverse of taming's).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from uio.config import VAEConfig
from uio.accel import cpu_kernels
from uio.model.embedding import Embedding
from uio.accel.hardware import cpu_has_bf16_kernels
from uio.accel.derived import tensor_state

_GROUPS = 32
_EPS = 1e-6
_HALF = (torch.float16, torch.bfloat16)
_MKLDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
    and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
# oneDNN's prepacking of bf16 convolution weights needs the CPU's bf16 support; elsewhere F.conv2d.
_PACKABLE = (torch.float32, torch.bfloat16) if cpu_has_bf16_kernels() else (torch.float32,)
# Cap on the (rows x codebook) distance matrix built per step of encode_to_codes, in elements.
_DIST_CHUNK_ELEMS = 1 << 24
# Elements per row chunk in the channels-last GroupNorm (1 MB of float32: temporaries stay in cache).
_GN_CHUNK_ELEMS = 1 << 18


def _conv(n_in: int, n_out: int, kernel: int) -> "Conv2d":
    """A stride-1 conv with SAME padding (symmetric for odd kernels)."""
    return Conv2d(n_in, n_out, kernel, padding=kernel // 2)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _PackCache:
    """Holds a conv's oneDNN-prepacked weight; never copied, pickled or saved (it is a cache)."""

    __slots__ = ("key", "value")

    def __init__(self):
        self.key = None
        self.value = None

    def __reduce__(self):  # deep copies and unpickled copies start empty
        return _PackCache, ()


def _mkldnn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the prepacked oneDNN path applies: CPU inference on a channels-last fp32/bf16 input."""
    return (_MKLDNN_CONV and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _PACKABLE
            and weight.dtype == x.dtype and x.is_contiguous(memory_format=torch.channels_last)
            and not _needs_grad(x, weight))


def _packed_weight(cache: _PackCache, source: torch.Tensor, make, padding, stride, x: torch.Tensor):
    """The oneDNN-blocked form of ``make()`` (a conv weight derived from ``source``), cached.

    F.conv2d on CPU re-blocks the weight on every call, which costs more than the convolution
    itself at the decoder's 16x16 and 32x32 levels. The cache is keyed on the source tensor's
    storage, version counter (:func:`tensor_state`; none for weights made in inference mode) and
    dtype, so load_state_dict, in-place updates and .to() refresh it. The blocked layout does not
    depend on the input's batch or spatial size.
    """
    key = (*tensor_state(source), source.dtype)
    if cache.key != key:
        weight = make().contiguous()
        cache.value = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(padding), list(stride), [1, 1], 1, list(x.shape))
        cache.key = key
    return cache.value


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias, padding, stride, cache: _PackCache,
            source: torch.Tensor | None = None, make=None, residual: torch.Tensor | None = None):
    """conv2d(x, weight, bias) (+ residual), through prepacked oneDNN kernels where possible.

    ``weight`` may be derived from the parameter ``source`` by ``make`` (then it is only built
    when the cache misses). Elsewhere (autograd, CUDA, other dtypes) this is plain F.conv2d.
    """
    if _mkldnn_ok(x, source if source is not None else weight) and (
            residual is None or (residual.shape[0] == x.shape[0] and residual.dtype == x.dtype
                                 and residual.is_contiguous(memory_format=torch.channels_last))):
        packed = _packed_weight(cache, source if source is not None else weight,
                                make if make is not None else (lambda: weight), padding, stride, x)
        pad, st, dil = list(padding), list(stride), [1, 1]
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, st, dil, 1, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, packed, bias, pad, st, dil, 1, "add", None, None, [], None)
    if make is not None:
        weight = make()
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    if residual is None:
        return y
    return y.add_(residual) if not _needs_grad(y, residual) else y + residual


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) that runs CPU inference on prepacked weights.

    ``forward(x, residual)`` returns ``conv(x) + residual`` (fused into the conv on CPU).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = _PackCache()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or self.groups != 1 \
                or self.dilation != (1, 1):
            y = super().forward(x)
            return y if residual is None else y + residual
        return _conv2d(x, self.weight, self.bias, self.padding, self.stride, self._packed, residual=residual)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float, swish: bool = False, inplace: bool = False) -> torch.Tensor:
    """GroupNorm (then swish, if asked) of a channels-last float32 NCHW tensor, two-pass statistics.

    Torch's own channels-last CPU kernel accumulates E[x^2] - E[x]^2 naively in float32, which
    loses ~1e-3 absolute where a group's mean is large against its spread; that compounds to
    ~3e-3 error at the encoder output. Centring before squaring keeps the error at rounding level.

    Without autograd, uio's CPU kernel does it where loaded (:func:`cpu_kernels.group_norm`: the
    same three passes, without one per torch operation); otherwise the work streams over the
    activation in row chunks of ~1 MB, so the temporaries (the centred squares) stay in cache: one
    pass for the means, one for the centred variance, and one that writes ``x * scale + shift``
    (and swish) - over ``x`` itself with ``inplace``.
    """
    if cpu_kernels.serves_group_norm(x, weight, bias):
        return cpu_kernels.group_norm(x, groups, weight.float(), bias.float(), eps, swish,
                                      x if inplace else torch.empty_like(x))
    b, c, h, w = x.shape
    n = h * w
    per_group = c // groups
    count = n * per_group
    tokens = x.permute(0, 2, 3, 1).reshape(b, n, c)  # a view for channels-last x
    if _needs_grad(x, weight, bias):
        mean = tokens.sum(1).view(b, groups, per_group).sum(-1).div(count).repeat_interleave(per_group, 1)
        var = (tokens - mean.unsqueeze(1)).square().sum(1).view(b, groups, per_group).sum(-1).div(count)
        scale = torch.rsqrt(var + eps).repeat_interleave(per_group, 1) * weight.float()
        y = torch.addcmul((bias.float() - mean * scale).unsqueeze(1), tokens, scale.unsqueeze(1))
        y = F.silu(y) if swish else y
        return y.view(b, h, w, c).permute(0, 3, 1, 2)

    step = max(1, _GN_CHUNK_ELEMS // (b * c))
    chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
    sums = tokens.sum(1)  # cascade summation: accurate, and a single streaming pass
    mean = sums.view(b, groups, per_group).sum(-1).div_(count).repeat_interleave(per_group, 1).unsqueeze(1)
    squares = torch.zeros(b, c, dtype=torch.float32, device=x.device)
    for i, j in chunks:
        centred = torch.sub(tokens[:, i:j], mean)
        squares += centred.square_().sum(1)
    var = squares.view(b, groups, per_group).sum(-1).div_(count)
    scale = torch.rsqrt(var.add_(eps)).repeat_interleave(per_group, 1).unsqueeze(1) * weight.float()
    shift = bias.float() - mean * scale
    out = tokens if inplace else torch.empty_like(tokens)
    for i, j in chunks:
        y = torch.addcmul(shift, tokens[:, i:j], scale, out=out[:, i:j])
        if swish:
            F.silu(y, inplace=True)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


class GroupNorm(nn.GroupNorm):
    """The reference's GroupNorm: 32 groups, eps 1e-6, statistics and normalisation in float32.

    ``forward(x, swish=True)`` also applies swish; ``inplace=True`` lets it overwrite ``x`` (only
    honoured without autograd). Channels-last float32 inputs take an accurate two-pass path (see
    :func:`_group_norm_channels_last`); channels-last half inputs the native op, whose float32
    E[x^2] - E[x]^2 rounding (~1e-3) is below half precision's own and which runs ~2.5x faster;
    others the native op, in float32 for half.
    """

    def __init__(self, channels: int):
        super().__init__(_GROUPS, channels, eps=_EPS)

    def forward(self, x: torch.Tensor, swish: bool = False, inplace: bool = False) -> torch.Tensor:
        inplace = inplace and not _needs_grad(x, self.weight, self.bias)
        if _is_channels_last(x) and x.dtype in _HALF:
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(y, inplace=not _needs_grad(y)) if swish else y
        if _is_channels_last(x):
            return _group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps,
                                             swish=swish, inplace=inplace)
        if x.dtype in _HALF:
            y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        else:
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.silu(y, inplace=not _needs_grad(y)) if swish else y
        return y.to(x.dtype)


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
        h = self.norm2(h, swish=True, inplace=True)  # h is a fresh conv output
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return self.conv2(h, residual=shortcut)  # the residual add is fused into the conv on CPU


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
        # A 1x1 conv on (B, HW, C) tokens is a plain matmul; no im2col or layout shuffles.
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C); a view if channels-last
        q, k, v = (self._linear(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        # SDPA's default scale is C**-0.5, as in the reference; one head of width C.
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self._linear(self.proj_out, out)
        # (B, HW, C) -> (B, C, H, W) as a channels-last view (with a batch stride that keeps the
        # format unambiguous for later kernels even at B=1); the residual add reuses its memory.
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        return out.add_(x) if not _needs_grad(out, x) else out + x


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


def _polyphase_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): a 3x3 conv after nearest x2 upsampling, per phase.

    Output pixel (2i+a, 2j+b) of conv3x3(upsample(x)) only sees low-res rows i-1+a..i+a and columns
    j-1+b..j+b: taps that land on the same low-res pixel are summed (in float32). Phase (a, b) is
    output-channel block 2a+b. That is 16 taps per low-res pixel instead of 36.
    """
    w = weight.float()
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),   # a = 0: rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))   # a = 1: rows i, i+1
    phases = []
    for r in rows:
        phases.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))  # b = 0
        phases.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))  # b = 1
    return torch.cat(phases, 0).to(dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv.

    Computed without materialising the upsampled image: four 2x2 "phase" convs on the low-res
    input (one conv with 4x the output channels, see :func:`_polyphase_weight`), interleaved into
    the output by one strided copy. Same result up to float rounding, 2.25x fewer FLOPs.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3)
        self._packed = _PackCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.conv.weight, self.conv.bias
        b, c, h, w = x.shape
        n_out = weight.shape[0]
        make = lambda: _polyphase_weight(weight, weight.dtype)  # noqa: E731
        phase_bias = None if bias is None else bias.repeat(4)
        y = _conv2d(x, None, phase_bias, (1, 1), (1, 1), self._packed, source=weight, make=make)
        # y: (B, 4 C_out, H+1, W+1); phase (a, b) of output pixel (2i+a, 2j+b) is y[:, 2a+b, i+a, j+b].
        y = y.permute(0, 2, 3, 1).contiguous()  # NHWC (a no-op for channels-last y)
        sb, sh, sw, _ = y.stride()
        phases = y.as_strided((b, h, 2, w, 2, n_out), (sb, sh, sh + 2 * n_out, sw, sw + n_out, 1))
        return phases.reshape(b, 2 * h, 2 * w, n_out).permute(0, 3, 1, 2)


class _Tower(nn.Module):
    """Runs its children in registration order, then norm_out, swish and conv_out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.named_children():
            if name == "norm_out":
                break
            x = layer(x)
        return self.conv_out(self.norm_out(x, swish=True, inplace=True))


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


__all__ = ["VQGAN", "Encoder", "Decoder", "ResBlock", "AttnBlock", "Downsample", "Upsample", "GroupNorm"]
