"""oneDNN's matrix products on the CPU: prepacked weight copies for decoding steps, and its
unpacked product for fp32 inputs of many rows."""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
from torch import Tensor

from . import cpu_kernels
from .hardware import computes_natively, cpu_has_bf16_kernels
from .policy import PACKED_BLOCKING_ROWS, PACKED_MAX_ROWS


def packed_matmul_supported(dtype: torch.dtype) -> bool:
    """Whether :func:`pack_weight` serves ``dtype`` on this CPU: fp32 on x86, bf16 where oneDNN has bf16 kernels."""
    if dtype == torch.float32:
        return torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")
    return dtype == torch.bfloat16 and cpu_has_bf16_kernels()


def wants_packed_copies(prepack: bool | None, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a model in ``dtype`` on ``device`` keeps packed copies of its step weights: only on a
    CPU where :func:`packed_matmul_supported`; there ``prepack``, or by default (None) where uio's
    CPU kernels do not serve the steps (they serve them as fast, without the memory)."""
    if torch.device(device).type != "cpu" or not packed_matmul_supported(dtype):
        return False
    return not cpu_kernels.in_use(dtype) if prepack is None else prepack


def pack_weight(weight: Tensor, rows: int = PACKED_BLOCKING_ROWS) -> Tensor:
    """oneDNN's prepacked copy of a (out, in) linear weight, blocked for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class WeightPacker:
    """:func:`pack_weight` for many weights in a row. oneDNN packs from a contiguous (out, in)
    matrix and copies any other layout into a new one first; this copies each into one buffer
    reused for all of them, sparing the page faults and the freed copies the C heap would keep."""

    def __init__(self):
        self._scratch: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        if weight.is_contiguous():
            return pack_weight(weight)
        n = weight.numel()
        scratch = self._scratch
        if scratch is None or scratch.numel() < n or (scratch.dtype, scratch.device) != (weight.dtype, weight.device):
            scratch = self._scratch = torch.empty(n, dtype=weight.dtype, device=weight.device)
        return pack_weight(scratch[:n].view(weight.shape).copy_(weight))


def emulates_bf16(x: Tensor) -> bool:
    """Whether ``x`` is a bf16 tensor on a CPU without bf16 kernels (where bf16 matmuls are emulated)."""
    return x.dtype == torch.bfloat16 and not computes_natively(x.dtype, x.device)


def unpacked_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)``; fp32 inputs of many rows on an x86 CPU by oneDNN, which takes an
    unpacked weight of any layout and runs faster than torch's own product there (not where a
    gradient is wanted: the op has none)."""
    if (not torch.compiler.is_compiling() and x.dtype == weight.dtype == torch.float32
            and x.shape[:-1].numel() > PACKED_MAX_ROWS and x.device.type == "cpu" and packed_matmul_supported(x.dtype)
            and cpu_kernels.no_gradient_wanted(x, weight)):
        return onednn_linear(x, weight)
    return torch.nn.functional.linear(x, weight)


def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """oneDNN's linear of ``x`` by ``weight``, packed (:func:`pack_weight`) or not."""
    if torch.jit.is_tracing():
        # The tracer cannot record the op's (empty) list of optional scalars; a call of the
        # scripted function can be recorded, and runs the same op.
        return _scripted_packed_linear()(x, weight)
    return _packed_linear(x, weight)


def _packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    no_scalars: List[Optional[number]] = []  # noqa: F821 - TorchScript's name for the op's Scalar?[] items
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", no_scalars, "")


@functools.cache
def _scripted_packed_linear() -> Callable[[Tensor, Tensor], Tensor]:
    return torch.jit.script(_packed_linear)
