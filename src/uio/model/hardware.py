"""What the CPU this runs on computes natively, for the choices that depend on it."""
from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 matmuls and convolutions natively here (AVX-512 BF16, AMX or
    AVX-NE-CONVERT). Without them bf16 work is emulated: convolutions run ~8x slower than in fp32,
    matmuls of an encoder's rows ~6x slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
