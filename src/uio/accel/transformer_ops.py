"""Faster versions of the transformer's seam operations (:mod:`uio.model.ops`).

Each computes what its reference computes, choosing per call among uio's CPU kernels
(:mod:`uio.accel.cpu_kernels`), oneDNN's packed and unpacked products (:mod:`uio.accel.packing`),
the fused projection matrices :func:`uio.accel.layout.lay_out` made, and torch's own kernels.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels, layout, packing
from .derived import FORMS
from .policy import (EMULATED_BF16_MAX_ROWS, FEW_QUERY_ROWS, KEPT_RELATIVE_BUCKETS, MLP_PIECE_BYTES,
                     PACKED_MAX_ROWS, POSITION_BIAS_CACHE_BYTES, SMALL_NORM_ELEMENTS, settings)

# Whether F.rms_norm is one kernel on GPUs (torch 2.11 yes, 2.7 no: there, several in the input's dtype).
FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")
FORMS.limit("encoder position bias", nbytes=POSITION_BIAS_CACHE_BYTES)
FORMS.limit("relative buckets", count=KEPT_RELATIVE_BUCKETS)
# What the generation this thread decodes found once for all its steps: ``kernel_weights``, each
# decoder layer's kernel_weights (set by uio.accel.steps.AcceleratedDecoding around each step).
current_generation = threading.local()


def fused(weights: list[Tensor]) -> Tensor | None:
    """The matrix ``weights`` are row blocks of (see :func:`uio.accel.layout.adjacent_rows`), or None."""
    if len(weights) == 1:
        return weights[0]
    return FORMS.get("fused", weights, lambda: layout.adjacent_rows(weights))


def packed_copy(sources: list[Tensor], matrix: Tensor, key: tuple = (), create: bool = False,
                pack: Callable[[Tensor], Tensor] = packing.pack_weight) -> Tensor | None:
    """The packed copy of ``matrix`` (made from ``sources``, its rows ``key``, by ``pack``), where one
    was made (:func:`pack_step_weights`) or ``create``; made again when the sources changed, None
    where it cannot be."""
    def make() -> Tensor | None:
        return pack(matrix) if packing.wants_packed_copies(True, matrix.dtype, matrix.device) else None

    return FORMS.get("packed", sources, make, key, create)


def matmul(x: Tensor, weight: Tensor, sources: list[Tensor] | None = None, key: tuple = ()) -> Tensor:
    """``x @ weight.T``: by uio's CPU kernel where it serves; for a few rows through the packed copy
    of ``weight`` (made from ``sources``, default ``[weight]``) where one was made; bf16 inputs of many
    rows in fp32 where bf16 is emulated; otherwise by :func:`uio.accel.packing.unpacked_linear`."""
    if cpu_kernels.serves(x, weight):
        return cpu_kernels.gemv(x, weight)
    rows = x.shape[:-1].numel()
    if rows <= PACKED_MAX_ROWS and not torch.compiler.is_compiling():
        packed = packed_copy(sources or [weight], weight, key)
        if packed is not None:
            return packing.onednn_linear(x, packed)
    if rows > EMULATED_BF16_MAX_ROWS and packing.emulates_bf16(x):
        return packing.unpacked_linear(x.float(), weight.float()).to(x.dtype)
    return packing.unpacked_linear(x, weight)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    return matmul(x, weight)


def project(x: Tensor, weights: list[Tensor]) -> tuple[Tensor, ...]:
    matrix = fused(weights)
    if matrix is None:
        return tuple(matmul(x, w) for w in weights)
    return matmul(x, matrix, weights).split([w.shape[0] for w in weights], dim=-1)


def mlp(x: Tensor, wi_0: Tensor, wi_1: Tensor, wo: Tensor) -> Tensor:
    """The MLP; many CPU rows in pieces whose gated activations stay in cache between the products."""
    rows = x.numel() // x.shape[-1]
    piece = max(1, MLP_PIECE_BYTES // (2 * wo.shape[1] * x.element_size()))
    if x.device.type != "cpu" or rows <= 2 * piece or torch.compiler.is_compiling():
        return _mlp(x, wi_0, wi_1, wo)
    pieces = [_mlp(part, wi_0, wi_1, wo) for part in x.reshape(rows, x.shape[-1]).split(piece)]
    return torch.cat(pieces).view(*x.shape[:-1], -1)


def _mlp(x: Tensor, wi_0: Tensor, wi_1: Tensor, wo: Tensor) -> Tensor:
    gate_up = fused([wi_0, wi_1])
    if gate_up is None:
        gate, up = matmul(x, wi_0), matmul(x, wi_1)
    else:
        gate_up = matmul(x, gate_up, [wi_0, wi_1])
        if cpu_kernels.serves_gated_gelu(gate_up):
            return matmul(cpu_kernels.gated_gelu(gate_up), wo)
        gate, up = gate_up.chunk(2, dim=-1)
    return matmul(F.gelu(gate, approximate="tanh") * up, wo)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    compiling, on_gpu = torch.compiler.is_compiling(), x.device.type != "cpu"
    if on_gpu and not compiling and FUSED_RMS_NORM:
        # The fused GPU kernel computes in float32 from half-precision inputs and weights: one
        # kernel instead of three conversions around it.
        return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)
    x32, weight32 = x.float(), weight.float()
    if on_gpu or compiling:
        return F.rms_norm(x32, weight.shape, weight32, eps).to(x.dtype)
    if x.numel() > SMALL_NORM_ELEMENTS:
        # The reference's arithmetic with fewer full-size temporaries than torch's CPU kernel.
        return (x32 * x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_() * weight32).to(x.dtype)
    # Small inputs (decoding steps): kernel launches are the cost. Over [x, -x] (mean 0, mean
    # square = mean(x^2)) layer_norm computes x / rms(x) in one kernel instead of several.
    dim = x.shape[-1]
    normed = F.layer_norm(torch.cat([x32, -x32], dim=-1), (2 * dim,), eps=eps)[..., :dim]
    return (normed * weight32).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """On a GPU in fp32, a decoding step's few query rows as plain matmuls (the fused kernel torch
    picks there runs them on one block per head); elsewhere the fused kernel."""
    if q.device.type == "cuda" and q.dtype == torch.float32 and q.shape[2] <= FEW_QUERY_ROWS:
        return torch.matmul(q, k.transpose(-1, -2)).add_(bias).softmax(dim=-1).matmul(v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def kernel_weights(layer: nn.Module) -> list[Tensor] | None:
    """The weights :func:`cpu_kernels.decoder_layer_step` takes for decoder ``layer``, in its order
    (None where its projections are not fused)."""
    attn, cross, mlp_block = layer.self_attention, layer.encoder_decoder_attention, layer.mlp
    qkv = fused([attn.query.weight, attn.key.weight, attn.value.weight])
    wi = fused([mlp_block.wi_0.weight, mlp_block.wi_1.weight])
    if qkv is None or wi is None:
        return None
    return [layer.pre_self_attention_layer_norm.weight, qkv, attn.out.weight, layer.pre_cross_attention_layer_norm.weight,
            cross.query.weight, cross.out.weight, layer.pre_mlp_layer_norm.weight, wi, mlp_block.wo.weight]


def decoder_layer_step(layer: nn.Module, x: Tensor, cache: tuple[Tensor, Tensor, Tensor], self_bias: Tensor,
                       cross_kv: tuple[Tensor, Tensor], cross_bias: Tensor) -> Tensor | None:
    """The layer's step by uio's CPU kernel, in one call, where it serves it."""
    if not cpu_kernels.in_use(x.dtype) or x.device.type != "cpu":
        return None
    found = getattr(current_generation, "kernel_weights", None)
    weights = found[layer] if found is not None and layer in found else kernel_weights(layer)
    if weights is None or not cpu_kernels.serves_decoder_layer(x, weights, [*cache[:2], *cross_kv]):
        return None
    return cpu_kernels.decoder_layer_step(x, weights, cache, self_bias, cross_kv, cross_bias,
                                          layer.pre_mlp_layer_norm.eps)


def _unscaled_logits(hidden: Tensor, table: Tensor, rows: slice) -> Tensor:
    return matmul(hidden, table[rows], [table], (rows.start, rows.stop)).float()


def logits(hidden: Tensor, table: Tensor, rows: slice = slice(None)) -> Tensor:
    return _unscaled_logits(hidden, table, rows) / math.sqrt(hidden.shape[-1])


def negative_log_likelihood(hidden: Tensor, table: Tensor, rows: slice, targets: Tensor) -> Tensor:
    """By uio's CPU kernel where it serves: the losses without writing the scaled logits and their log-softmax."""
    unscaled, divisor = _unscaled_logits(hidden, table, rows), math.sqrt(hidden.shape[-1])
    if cpu_kernels.serves_cross_entropy(unscaled):
        return cpu_kernels.scaled_cross_entropy(unscaled, targets, divisor)
    return F.cross_entropy(unscaled / divisor, targets, reduction="none")


def derived(kind: str, sources: list[Tensor], key: tuple, make) -> Tensor:
    """Kept in :data:`uio.accel.derived.FORMS`, unless compiling or gradients of the sources are wanted."""
    if torch.compiler.is_compiling() or not cpu_kernels.no_gradient_wanted(*sources):
        return make()
    return FORMS.get(kind, sources, make, key)


def step_weight_groups(model: nn.Module) -> list[tuple[list[Tensor], tuple]]:
    """Every (weights, rows key) a decoding step multiplies by, as :func:`matmul` names their packed copies."""
    groups = []
    for layer in model.decoder.layers:
        attn, cross, mlp_block = layer.self_attention, layer.encoder_decoder_attention, layer.mlp
        groups += [([attn.query.weight, attn.key.weight, attn.value.weight], ()), ([attn.out.weight], ()),
                   ([cross.query.weight], ()), ([cross.out.weight], ()),
                   ([mlp_block.wi_0.weight, mlp_block.wi_1.weight], ()), ([mlp_block.wo.weight], ())]
    table = model.token_embedder.weight
    for is_image in (False, True):
        rows = model.output_rows(is_image)
        groups.append(([table], (rows.start, rows.stop)))
    return groups


def _step_matrices(model: nn.Module) -> Iterator[tuple[list[Tensor], Tensor, tuple]]:
    """(weights, the matrix multiplied, rows key) of every product of a decoding step whose weights
    are fused as laid out (weights assigned since run their products unpacked)."""
    for weights, key in step_weight_groups(model):
        matrix = fused(weights)
        if matrix is not None:
            yield weights, matrix[slice(*key)] if key else matrix, key


def pack_step_weights(model: nn.Module) -> list[Tensor]:
    """Packed copies of every weight a decoding step multiplies by (made where missing or stale, in
    one reused buffer), in a fixed order; none where packing does not serve the model."""
    weight = model.token_embedder.weight
    if not packing.packed_matmul_supported(weight.dtype) or weight.device.type != "cpu":
        return []
    packer = packing.WeightPacker()
    return [packed_copy(weights, matrix, key, create=True, pack=packer) for weights, matrix, key in _step_matrices(model)]


def packed_copies(model: nn.Module) -> list[Tensor]:
    """The packed copies of ``model``'s step weights kept now (made again where stale), in a fixed order."""
    copies = (packed_copy(weights, matrix, key) for weights, matrix, key in _step_matrices(model))
    return [copy for copy in copies if copy is not None]


def drop_packed(model: nn.Module) -> None:
    """Free the packed copies of ``model``'s step weights, and make none from now on."""
    settings(model).prepack = False
    for weights, key in step_weight_groups(model):
        FORMS.discard("packed", weights, key)


def converted(model: nn.Module) -> None:
    """Lay the converted weights out again (see :func:`uio.accel.layout.lay_out`), and pack them
    where the model's settings want packed copies for its new dtype and device."""
    layout.lay_out(model)
    weight = model.token_embedder.weight
    if packing.wants_packed_copies(settings(model).prepack, weight.dtype, weight.device):
        pack_step_weights(model)


FAST_OPS = {"linear": linear, "project": project, "mlp": mlp, "rms_norm": rms_norm, "attention": attention,
            "decoder_layer_step": decoder_layer_step, "logits": logits,
            "negative_log_likelihood": negative_log_likelihood, "derived": derived}
