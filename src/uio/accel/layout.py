"""How the transformer's weights lie in memory: the layout each is stored in, and the projections
fused into one matrix, which the modules hold views of (one product computes all their outputs,
at no extra memory). :func:`lay_out` is the one place that decides it, at load and after conversions."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from ..checkpoint import Placement
from . import cpu_kernels, memory


def stores_transposed(dtype: torch.dtype, device: torch.device | str = "cpu", decoder: bool = False) -> bool:
    """Whether weights in ``dtype`` on ``device`` (of the ``decoder`` or not) are kept as transposed
    views of the checkpoint's (in, out) kernels instead of (out, in) copies: fp32 products run as
    fast on either layout and a plain copy at load is several times faster than a transposing one,
    while some half-precision CPU kernels are slower on the transposed layout. The exception: the
    decoder's fp32 weights on the CPU where uio's CPU kernels serve its steps, which stream (out, in)
    rows faster."""
    if decoder and torch.device(device).type == "cpu" and cpu_kernels.in_use(dtype):
        return False
    return dtype == torch.float32


def empty_weight(out_features: int, in_features: int, device: torch.device | str, dtype: torch.dtype,
                 decoder: bool = False) -> Tensor:
    """An uninitialised (out, in) weight in the layout :func:`stores_transposed` picks for it."""
    if stores_transposed(dtype, device, decoder):
        return memory.empty((in_features, out_features), dtype, device).T
    return memory.empty((out_features, in_features), dtype, device)


def in_stored_layout(weight: Tensor, decoder: bool = False) -> bool:
    """Whether the (out, in) ``weight`` is laid out as :func:`stores_transposed` picks for it."""
    if stores_transposed(weight.dtype, weight.device, decoder):
        return weight.T.is_contiguous()
    return weight.is_contiguous()


def fusion_groups(model: nn.Module) -> Iterator[tuple[list[nn.Linear], bool, bool]]:
    """Each group of projections of one input that :func:`lay_out` fuses, with whether it is the
    decoder's and whether its matrix is kept as (out, in) rows (cross-attention's query and
    key/value are multiplied apart: a row range of a transposed matrix has neither its rows nor
    its columns contiguous, a layout oneDNN multiplies by a far slower reference kernel)."""
    for layer in model.encoder.layers:
        attention, mlp = layer.attention, layer.mlp
        yield [attention.query, attention.key, attention.value], False, False
        yield [mlp.wi_0, mlp.wi_1], False, False
    for layer in model.decoder.layers:
        attention, cross, mlp = layer.self_attention, layer.encoder_decoder_attention, layer.mlp
        yield [attention.query, attention.key, attention.value], True, False
        yield [cross.query, cross.key, cross.value], True, True
        yield [mlp.wi_0, mlp.wi_1], True, False


def fuse_weights(linears: list[nn.Linear], device: torch.device | str, dtype: torch.dtype, decoder: bool,
                 as_rows: bool) -> Tensor:
    """Concatenate the weights of ``linears`` into one matrix in the layout :func:`empty_weight`
    picks (or as (out, in) rows), each module keeping a view of its rows. Weights still on ``meta``
    get an uninitialised matrix on ``device`` in ``dtype``, which loading fills in place."""
    weights = [m.weight.detach() for m in linears]
    if not weights[0].is_meta:
        device, dtype = weights[0].device, weights[0].dtype
    shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
    fused = memory.empty(shape, dtype, device) if as_rows else empty_weight(*shape, device, dtype, decoder)
    for m, weight, rows in zip(linears, weights, fused.split([w.shape[0] for w in weights])):
        if not weight.is_meta:
            cpu_kernels.copy(rows, weight)
        m.weight = nn.Parameter(rows, requires_grad=False)
    return fused


def lay_out(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
    """Lay every transformer weight of ``model`` out as :func:`stores_transposed` picks and fuse
    each of :func:`fusion_groups`: on a model still on ``meta``, as empty matrices on ``device`` in
    ``dtype`` that loading fills (each weight is then copied once); on a loaded one, from its weights
    (after a conversion, which gives each weight a matrix of its own)."""
    for part, decoder in ((model.encoder, False), (model.decoder, True)):
        for module in part.modules():
            weight = module.weight if isinstance(module, nn.Linear) else None
            if weight is not None and not weight.is_meta and not in_stored_layout(weight, decoder):
                relaid = cpu_kernels.copy(empty_weight(*weight.shape, weight.device, weight.dtype, decoder), weight)
                module.weight = nn.Parameter(relaid, requires_grad=weight.requires_grad)
    for linears, decoder, as_rows in fusion_groups(model):
        fuse_weights(linears, device, dtype, decoder, as_rows)


def adjacent_rows(weights: list[Tensor]) -> Tensor | None:
    """The one matrix ``weights`` (same input width, dtype and strides) are consecutive row blocks of,
    as :func:`fuse_weights` leaves them; None where they are not."""
    first = weights[0]
    end = first.data_ptr()
    for weight in weights:
        if (weight.data_ptr() != end or weight.stride() != first.stride() or weight.shape[1] != first.shape[1]
                or weight.dtype != first.dtype or weight.device != first.device):
            return None
        end += weight.shape[0] * weight.stride(0) * weight.element_size()
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), first.stride())


class LaidOutPlacement(Placement):
    """Loading's placement of each weight: 2-D kernels in the layout :func:`stores_transposed` picks,
    the rest contiguous, in huge pages where the system offers them (:mod:`uio.accel.memory`), and
    transposing copies by uio's CPU kernel where it serves them."""

    def empty(self, path: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
        if path.endswith("/kernel") and len(shape) == 2:
            return empty_weight(*shape, device, dtype, decoder=path.startswith("decoder/"))
        return memory.empty(shape, dtype, device)

    def copy(self, target: Tensor, source: Tensor) -> Tensor:
        return cpu_kernels.copy(target, source)
