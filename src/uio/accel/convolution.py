"""Faster versions of the VQGAN's seam operations (:mod:`uio.model.ops`): :data:`FAST_OPS`.

- ``conv2d``: on the CPU, oneDNN convolutions on weights prepacked once into oneDNN's blocked
  layout (``F.conv2d`` re-blocks the weight at every call, which costs more than the convolution
  itself at the decoder's low-resolution levels), with the residual add fused into the kernel.
- ``upsample_conv2d``: nearest x2 upsampling then a 3x3 conv, computed on the low-resolution
  input as four 2x2 "phase" convs (one conv with 4x the output channels, see
  :func:`polyphase_weight`) interleaved into the output: 16 taps per input pixel instead of 36.
- ``group_norm``: for channels-last CPU activations, float32 two-pass statistics by uio's CPU
  kernel where loaded, else in cache-sized row chunks; bf16 and fp16 by torch's native kernel.

The prepacked and polyphase weights are forms derived from the parameters, kept in
:data:`uio.accel.derived.FORMS` (made again when a parameter is loaded into, updated in place or
converted). Each version leaves what it does not serve (gradients wanted, other devices, layouts
or dtypes) to the reference version.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from uio.accel import cpu_kernels
from uio.accel.derived import FORMS
from uio.accel.hardware import cpu_has_bf16_kernels
from uio.accel.policy import GROUP_NORM_CHUNK_ELEMENTS
from uio.model import ops

PACKED = "packed conv"  # FORMS kind: a conv weight in oneDNN's blocked layout
POLYPHASE = "polyphase upsample weight"  # FORMS kind: polyphase_weight of an upsampling conv

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
           and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
_HALF = (torch.float16, torch.bfloat16)


def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """oneDNN prepacks bf16 convolution weights only on a CPU with bf16 kernels."""
    return (torch.float32, torch.bfloat16) if cpu_has_bf16_kernels() else (torch.float32,)


def _no_gradient_wanted(*tensors: Tensor | None) -> bool:
    return cpu_kernels.no_gradient_wanted(*(t for t in tensors if t is not None))


def _channels_last_cpu(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _onednn_serves(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> bool:
    """CPU inference on a channels-last input in a packable dtype (the residual likewise)."""
    return (_ONEDNN and _channels_last_cpu(x) and x.dtype in _packable_dtypes() and weight.dtype == x.dtype
            and _no_gradient_wanted(x, weight, bias, residual)
            and (residual is None or (residual.shape[0] == x.shape[0] and residual.dtype == x.dtype
                                      and residual.is_contiguous(memory_format=torch.channels_last))))


def _packed(source: Tensor, make, variant: str, stride: int, padding: int, x: Tensor) -> Tensor:
    """The oneDNN-blocked form of ``make()``, a conv weight derived from the parameter ``source``.
    The blocked layout depends on the weight, stride and padding, not on the input's size."""
    def pack() -> Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            make().contiguous().to_mkldnn(), [padding] * 2, [stride] * 2, [1, 1], 1, list(x.shape))

    return FORMS.get(PACKED, [source], pack, key=(variant, stride, padding, source.dtype))


def _onednn_conv2d(x: Tensor, packed: Tensor, bias: Tensor | None, stride: int, padding: int,
                   residual: Tensor | None) -> Tensor:
    pad, st, dil = [padding] * 2, [stride] * 2, [1, 1]
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, st, dil, 1, "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, packed, bias, pad, st, dil, 1, "add", None, None, [], None)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
           residual: Tensor | None = None) -> Tensor:
    """:func:`uio.model.ops.conv2d` on prepacked oneDNN weights, the residual add fused."""
    if _onednn_serves(x, weight, bias, residual):
        packed = _packed(weight, lambda: weight, "conv", stride, padding, x)
        return _onednn_conv2d(x, packed, bias, stride, padding, residual)
    if residual is not None and _no_gradient_wanted(x, weight, bias, residual):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding).add_(residual)  # a fresh output
    return ops.REFERENCE["conv2d"](x, weight, bias, stride, padding, residual)


def polyphase_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): a 3x3 conv after nearest x2 upsampling, per phase.

    Output pixel (2i+a, 2j+b) of conv3x3(upsample(x)) only sees low-res rows i-1+a..i+a and columns
    j-1+b..j+b: taps that land on the same low-res pixel are summed (in float32). Phase (a, b) is
    output-channel block 2a+b.
    """
    w = weight.float()
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),   # a = 0: rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))   # a = 1: rows i, i+1
    phases = []
    for r in rows:
        phases.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))  # b = 0
        phases.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))  # b = 1
    return torch.cat(phases, 0).to(weight.dtype)


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`uio.model.ops.upsample_conv2d` as four phase convs on the low-resolution ``x``."""
    if weight.shape[-2:] != (3, 3) or not _no_gradient_wanted(x, weight, bias):
        return ops.REFERENCE["upsample_conv2d"](x, weight, bias)
    b, _, h, w = x.shape
    n_out = weight.shape[0]
    phase_bias = None if bias is None else bias.repeat(4)
    if _onednn_serves(x, weight, bias, None):
        y = _onednn_conv2d(x, _packed(weight, lambda: polyphase_weight(weight), "polyphase", 1, 1, x),
                           phase_bias, 1, 1, None)
    else:
        y = F.conv2d(x, FORMS.get(POLYPHASE, [weight], lambda: polyphase_weight(weight)), phase_bias, padding=1)
    # y: (B, 4 C_out, H+1, W+1); phase (a, b) of output pixel (2i+a, 2j+b) is y[:, 2a+b, i+a, j+b].
    y = y.permute(0, 2, 3, 1).contiguous()  # NHWC (a no-op for channels-last y)
    sb, sh, sw, _ = y.stride()
    phases = y.as_strided((b, h, 2, w, 2, n_out), (sb, sh, sh + 2 * n_out, sw, sw + n_out, 1))
    return phases.reshape(b, 2 * h, 2 * w, n_out).permute(0, 3, 1, 2)


def _group_norm_in_chunks(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, swish: bool) -> Tensor:
    """GroupNorm of channels-last float32 ``x``: one pass for the means, one for the centred
    variances and one writing ``x * scale + shift`` (and swish), the last two over row chunks."""
    b, c, h, w = x.shape
    n = h * w
    per_group = c // groups
    count = n * per_group
    tokens = x.permute(0, 2, 3, 1).reshape(b, n, c)  # a view of channels-last x
    step = max(1, GROUP_NORM_CHUNK_ELEMENTS // (b * c))
    chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
    mean = tokens.sum(1).view(b, groups, per_group).sum(-1).div_(count).repeat_interleave(per_group, 1).unsqueeze(1)
    squares = torch.zeros(b, c, dtype=torch.float32)
    for i, j in chunks:
        squares += torch.sub(tokens[:, i:j], mean).square_().sum(1)
    var = squares.view(b, groups, per_group).sum(-1).div_(count)
    scale = torch.rsqrt(var.add_(eps)).repeat_interleave(per_group, 1).unsqueeze(1) * weight.float()
    shift = bias.float() - mean * scale
    out = torch.empty_like(tokens)
    for i, j in chunks:
        y = torch.addcmul(shift, tokens[:, i:j], scale, out=out[:, i:j])
        if swish:
            F.silu(y, inplace=True)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, swish: bool = False) -> Tensor:
    """:func:`uio.model.ops.group_norm` of channels-last CPU activations: float32 by uio's kernel or
    :func:`_group_norm_in_chunks`; bf16 and fp16 by torch's native kernel, whose float32
    E[x^2] - E[x]^2 rounds below half precision's own resolution."""
    if not (_channels_last_cpu(x) and _no_gradient_wanted(x, weight, bias)):
        return ops.REFERENCE["group_norm"](x, groups, weight, bias, eps, swish)
    if x.dtype in _HALF:
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y, inplace=True) if swish else y
    if x.dtype != torch.float32:
        return ops.REFERENCE["group_norm"](x, groups, weight, bias, eps, swish)
    if cpu_kernels.serves_group_norm(x, weight, bias):
        return cpu_kernels.group_norm(x, groups, weight.float(), bias.float(), eps, swish, torch.empty_like(x))
    return _group_norm_in_chunks(x, groups, weight, bias, eps, swish)


FAST_OPS = {"conv2d": conv2d, "upsample_conv2d": upsample_conv2d, "group_norm": group_norm}
