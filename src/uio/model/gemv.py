"""The CPU matrix-vector kernel of decoding steps (``gemv.cpp``), built on first use.

A decoding step multiplies one to a few rows by every weight matrix, so its time is the time to
read the weights. torch's kernels split such a product over output columns and read each thread's
share of every weight row with a stride; ``gemv.cpp`` gives each thread one contiguous block of
the weight instead. On a 2-core AMD EPYC (AVX2) a step's 49 float32 products took 6.3 + 3.8 ms
(layers + output rows) instead of 11.2 + 7.2 ms with oneDNN's packed kernel. bfloat16 weights are
widened to float32 in registers, so on CPUs without bf16 kernels bf16 steps read half the bytes.

:func:`load` compiles it with torch's C++ extension builder (a C++ compiler and ninja needed; ~20-60 s,
once per machine: torch keeps the build in ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``)
and registers ``torch.ops.uio_cpu.gemv``; without it, or on CPUs without AVX2 and FMA, steps use
torch's kernels. ``UIO_CPU_KERNEL=0`` in the environment skips it; ``uio.model.gemv.enabled = False``
stops using it (steps traced before keep what they traced).
"""
from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path

import torch
from torch import Tensor

from .hardware import cpu_has_bf16_kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.cpp")
MAX_ROWS = 8  # rows the kernel takes (a decoding step's, up to a batch of 8)
COMPILING_NOTICE_AFTER_S = 2.0  # a load taking longer is compiling: say so
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp links the libgomp torch has loaded: one runtime
enabled = True  # False: use torch's kernels even where this one is loaded (for comparisons)
_lock = threading.Lock()
_loaded = False
_failure: str | None = None


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernel, or None if it can (given a C++ compiler to build it)."""
    if os.environ.get("UIO_CPU_KERNEL", "1") == "0":
        return "UIO_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch: {torch.backends.cpu.get_cpu_capability()})"
    return None


def failure() -> str | None:
    """Why :func:`load` could not build or load the kernel (None if it did, or was not called)."""
    return _failure


def load() -> bool:
    """Build (first time on this machine) and load the kernel; False, with a warning saying why, if
    it cannot be used here. Safe to call from several threads; later calls return at once."""
    global _loaded, _failure
    with _lock:
        if _loaded or _failure is not None:
            return _loaded
        _failure = unsupported_reason()
        if _failure is not None:
            log.info("CPU matrix-vector kernel not used: %s", _failure)
            return False
        from torch.utils.cpp_extension import load as build

        # Loading a build torch has kept takes milliseconds: say something only when compiling.
        message = "compiling uio's CPU matrix-vector kernel (once per machine, ~20-60 s; UIO_CPU_KERNEL=0 skips it)"
        notice = threading.Timer(COMPILING_NOTICE_AFTER_S, log.warning, [message])
        notice.start()
        try:
            build("uio_cpu_gemv", sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                  is_python_module=False)
        except Exception as error:  # an optional speed-up: never fail a load for it
            last_line = (str(error).strip().splitlines() or [""])[-1]  # build errors end with the cause
            _failure = f"{type(error).__name__}: {last_line}"
            log.warning("could not build uio's CPU matrix-vector kernel (%s); decoding steps use torch's kernels, "
                        "~1.8x slower in float32", _failure)
            return False
        finally:
            notice.cancel()
        _loaded = True
        return True


def available() -> bool:
    """Whether :func:`load` has loaded the kernel (it never builds it)."""
    return _loaded


def serves(x: Tensor, weight: Tensor) -> bool:
    """Whether the loaded kernel computes ``x @ weight.T``: on the CPU, in float32, or in bfloat16 on a
    CPU without bf16 kernels (where torch emulates them; elsewhere oneDNN's are measured to serve),
    at most ``MAX_ROWS`` rows, a weight whose rows or columns are contiguous."""
    return (_loaded and enabled and x.device.type == "cpu" and x.dtype == weight.dtype and serves_dtype(x.dtype)
            and x.shape[:-1].numel() <= MAX_ROWS and (weight.stride(0) == 1 or weight.stride(1) == 1))


def serves_dtype(dtype: torch.dtype) -> bool:
    """Whether CPU models in ``dtype`` would use the kernel (see :func:`serves`)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not cpu_has_bf16_kernels())


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for x (..., in) and weight (out, in), by the kernel (see :func:`serves`)."""
    rows = x.shape[:-1].numel()
    out = torch.ops.uio_cpu.gemv(x.reshape(rows, x.shape[-1]), weight)  # the op makes its rows contiguous
    return out.view(*x.shape[:-1], weight.shape[0])
