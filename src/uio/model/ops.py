"""The seam between the model's math and the acceleration layer.

The modules of :mod:`uio.model.transformer` and :mod:`uio.model.vqgan` compute through the
operations below, called as ``ops.<name>(...)``. The versions here are plain PyTorch: the
reference path, what runs with acceleration off. :mod:`uio.accel` registers faster versions of
some of them (:func:`register`) and :func:`reset` puts these back. A faster version computes the
same function; it may keep forms derived from the weights (packed copies, fused matrices, traces)
but never changes what the math means.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for a (out, in) ``weight``."""
    return F.linear(x, weight)


def project(x: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``x`` projected by each of ``weights`` (all taking ``x``): the query, key and value of attention."""
    return tuple(F.linear(x, weight) for weight in weights)


def mlp(x: Tensor, wi_0: Tensor, wi_1: Tensor, wo: Tensor) -> Tensor:
    """T5's gated-GELU feed-forward: ``wo(gelu(wi_0 x) * wi_1 x)``, GELU's tanh approximation."""
    return F.linear(F.gelu(F.linear(x, wi_0), approximate="tanh") * F.linear(x, wi_1), wo)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """T5's layer norm, ``weight * x / rms(x)`` (no mean, no bias), computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q k^T + bias) v``, unscaled, for q (B, H, Lq, D) and k, v (B, H, Lk, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def decoder_layer_step(layer, x: Tensor, cache: tuple[Tensor, Tensor, Tensor], self_bias: Tensor,
                       cross_kv: tuple[Tensor, Tensor], cross_bias: Tensor) -> Tensor | None:
    """A whole decoder layer's decoding step in one call, or None where none serves it (here: never),
    and the layer runs its own forward pass."""
    return None


def logits(hidden: Tensor, table: Tensor, rows: slice = slice(None)) -> Tensor:
    """The output layer: float32 logits of ``hidden`` over the embedding ``table``'s ``rows``
    (the shared token embedding), divided by sqrt(emb_dim) as in the reference."""
    return F.linear(hidden, table[rows]).float() / math.sqrt(hidden.shape[-1])


def negative_log_likelihood(hidden: Tensor, table: Tensor, rows: slice, targets: Tensor) -> Tensor:
    """``-log p(target)`` (N,) under :func:`logits` of ``hidden`` (N, D) over the table's ``rows``."""
    return F.cross_entropy(logits(hidden, table, rows), targets, reduction="none")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
           residual: Tensor | None = None) -> Tensor:
    """``conv2d(x) + residual`` (where given), for NCHW ``x``."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    return y if residual is None else y + residual


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Nearest-neighbour x2 upsampling of NCHW ``x``, then a 3x3 conv (padding 1)."""
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, swish: bool = False) -> Tensor:
    """GroupNorm of NCHW ``x`` computed in float32 (then swish, where asked), in ``x``'s dtype.

    The statistics are centred (``torch.var_mean``): torch's own group norm of a channels-last
    float32 tensor takes E[x^2] - E[x]^2, which cancels where a group's mean is large against its
    spread."""
    grouped = x.float().unflatten(1, (groups, -1))  # (B, groups, C / groups, H, W)
    var, mean = torch.var_mean(grouped, dim=(2, 3, 4), correction=0, keepdim=True)
    normed = ((grouped - mean) * torch.rsqrt(var + eps)).flatten(1, 2)
    y = normed * weight.float()[:, None, None] + bias.float()[:, None, None]
    return (F.silu(y) if swish else y).to(x.dtype)


def derived(kind: str, sources: Sequence[Tensor], key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``: a value that depends only on the ``sources`` tensors' values and on ``key``,
    which a faster version may keep from call to call (the encoder's position biases)."""
    return make()


def decoding(model, enc, text_length: int, image_length: int, rows_per_example: int):
    """The state of one generation, whose ``step`` runs a decoding step (see :class:`uio.model.decoding.Decoding`)."""
    from .decoding import Decoding

    return Decoding(model, enc, text_length, image_length, rows_per_example)


def converted(model) -> None:
    """Called after ``model.to(...)`` and the like converted its weights (here: nothing to do)."""


NAMES = ("linear", "project", "mlp", "rms_norm", "attention", "decoder_layer_step", "logits",
         "negative_log_likelihood", "conv2d", "upsample_conv2d", "group_norm", "derived", "decoding", "converted")
REFERENCE: dict[str, Callable] = {name: globals()[name] for name in NAMES}


def register(name: str, function: Callable) -> None:
    """Make ``ops.<name>`` call ``function`` from now on (model code looks it up at each call)."""
    if name not in REFERENCE:
        raise KeyError(f"no operation {name!r} in the seam: one of {', '.join(NAMES)}")
    globals()[name] = function


def reset() -> None:
    """Put every operation's reference version back."""
    globals().update(REFERENCE)


def registered() -> dict[str, Callable]:
    """The operations whose faster version is in use now, by name."""
    return {name: globals()[name] for name in NAMES if globals()[name] is not REFERENCE[name]}
