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


def computes_natively(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` runs ``dtype`` arithmetic in hardware rather than emulating it (much
    slower than fp32). On the CPU, bf16 needs :func:`cpu_has_bf16_kernels` and fp16 oneDNN's fp16
    support; other devices are taken to run every dtype natively."""
    if device.type != "cpu" or dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return cpu_has_bf16_kernels()
    return dtype == torch.float16 and torch.backends.mkldnn.is_available() \
        and torch.ops.mkldnn._is_mkldnn_fp16_supported()
