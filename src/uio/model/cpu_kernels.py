"""uio's CPU kernels for decoding steps (C++, built on first use).

A decoding step multiplies one to a few rows by every weight matrix, so its time is the time to
read the weights. torch's kernels split such a product over output columns and read each thread's
share of every weight row with a stride; ``cpu_kernels.h`` gives each thread one contiguous block of
the weight instead. On a 2-core AMD EPYC (AVX2) a step's 49 float32 products took 6.3 + 3.8 ms
(layers + output rows) instead of 11.2 + 7.2 ms with oneDNN's packed kernel. bfloat16 weights are
widened to float32 in registers, so on CPUs without bf16 kernels bf16 steps read half the bytes.

Two operators use it: ``torch.ops.uio_cpu.gemv`` (:func:`gemv`, one product) and
``torch.ops.uio_cpu.decoder_layer_step`` (:func:`decoder_layer_step`, a whole float32 or bfloat16 decoder layer
of a step in one call, ~70 torch operations fewer per layer). A third, ``torch.ops.uio_cpu.transposed_copy``
(:func:`copy`), lays the decoder's float32 weights out as (out, in) rows at load, which its products stream faster;
a fourth, ``torch.ops.uio_cpu.group_norm`` (:func:`group_norm`), runs the VQGAN's float32 GroupNorm and swish in
three passes over the activation; a fifth, ``torch.ops.uio_cpu.gated_gelu`` (:func:`gated_gelu`), the MLPs' gated
GELU of any number of float32 rows (the encoder's, teacher-forced decoding's) in one pass; a sixth,
``torch.ops.uio_cpu.scaled_cross_entropy`` (:func:`scaled_cross_entropy`), answer options' losses from the output
layer's unscaled logits, without writing the scaled logits or their log-softmax.

:func:`load` compiles them with torch's C++ extension builder (a C++ compiler and ninja needed; ~20-60 s,
once per machine: torch keeps the build in ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``);
without them, or on CPUs without AVX2 and FMA, steps use torch's kernels. ``UIO_CPU_KERNEL=0`` in the
environment skips them; ``uio.model.cpu_kernels.enabled = False`` stops using them (steps traced
before keep what they traced).
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

SOURCES = [str(Path(__file__).with_name(name))  # and cpu_kernels.h
           for name in ("gemv.cpp", "decoder_step.cpp", "transpose.cpp", "group_norm.cpp", "cross_entropy.cpp")]
MAX_ROWS = 32  # rows the kernels take: a decoding step's, up to a batch of 32 (at 64 oneDNN's packed copies win)
COMPILING_NOTICE_AFTER_S = 2.0  # a load taking longer is compiling: say so
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp links the libgomp torch has loaded: one runtime
enabled = True  # False: use torch's kernels even where these are loaded (for comparisons)
_lock = threading.Lock()
_loaded = False
_failure: str | None = None


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernels, or None if it can (given a C++ compiler to build them)."""
    if os.environ.get("UIO_CPU_KERNEL", "1") == "0":
        return "UIO_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch: {torch.backends.cpu.get_cpu_capability()})"
    return None


def failure() -> str | None:
    """Why :func:`load` could not build or load the kernels (None if it did, or was not called)."""
    return _failure


def load() -> bool:
    """Build (first time on this machine) and load the kernels; False, with a warning saying why, if
    they cannot be used here. Safe to call from several threads; later calls return at once."""
    global _loaded, _failure
    with _lock:
        if _loaded or _failure is not None:
            return _loaded
        _failure = unsupported_reason()
        if _failure is not None:
            log.info("uio's CPU kernels not used: %s", _failure)
            return False
        from torch.utils.cpp_extension import load as build

        # Loading a build torch has kept takes milliseconds: say something only when compiling.
        message = "compiling uio's CPU kernels (once per machine, ~20-60 s; UIO_CPU_KERNEL=0 skips them)"
        notice = threading.Timer(COMPILING_NOTICE_AFTER_S, log.warning, [message])
        notice.start()
        try:
            build("uio_cpu_kernels", sources=SOURCES, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                  is_python_module=False)
        except Exception as error:  # an optional speed-up: never fail a load for it
            last_line = (str(error).strip().splitlines() or [""])[-1]  # build errors end with the cause
            _failure = f"{type(error).__name__}: {last_line}"
            log.warning("could not build uio's CPU kernels (%s); decoding steps use torch's kernels, "
                        "~2x slower in float32", _failure)
            return False
        finally:
            notice.cancel()
        _loaded = True
        return True


def available() -> bool:
    """Whether :func:`load` has loaded the kernels (it never builds them)."""
    return _loaded


def serves(x: Tensor, weight: Tensor) -> bool:
    """Whether the loaded kernel computes ``x @ weight.T``: on the CPU, in float32, or in bfloat16 on a
    CPU without bf16 kernels (where torch emulates them; elsewhere oneDNN's are measured to serve),
    at most ``MAX_ROWS`` rows, a weight whose rows or columns are contiguous, no gradient wanted (it has
    no backward)."""
    return (_takes(x) and x.dtype == weight.dtype and serves_dtype(x.dtype) and _rows_or_columns_contiguous(weight)
            and no_gradient_wanted(x, weight))


def _runs_on(x: Tensor) -> bool:
    """What every kernel needs: loaded and enabled, ``x`` on the CPU, outside ``torch.compile``
    (whose graphs use their own kernels)."""
    return _loaded and enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _takes(x: Tensor) -> bool:
    """What the product and layer kernels need of their input besides: at most ``MAX_ROWS`` rows."""
    return _runs_on(x) and x.shape[:-1].numel() <= MAX_ROWS


def no_gradient_wanted(*tensors: Tensor) -> bool:
    """Whether no gradient of ``tensors`` is wanted (grad mode off, or none requires grad): the
    kernels, which have no backward, serve only then."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _rows_or_columns_contiguous(weight: Tensor) -> bool:
    return weight.stride(0) == 1 or weight.stride(-1) == 1


def in_use(dtype: torch.dtype) -> bool:
    """Whether CPU decoding steps in ``dtype`` run on the kernels now: loaded, enabled, ``dtype`` served."""
    return _loaded and enabled and serves_dtype(dtype)


def serves_dtype(dtype: torch.dtype) -> bool:
    """Whether CPU models in ``dtype`` would use the kernel (see :func:`serves`)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not cpu_has_bf16_kernels())


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for x (..., in) and weight (out, in), by the kernel (see :func:`serves`)."""
    rows = x.shape[:-1].numel()
    out = torch.ops.uio_cpu.gemv(x.reshape(rows, x.shape[-1]), weight)  # the op makes its rows contiguous
    return out.view(*x.shape[:-1], weight.shape[0])


def copy(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)``; by the loaded kernel where ``dst`` is a contiguous float32 CPU matrix and
    ``src`` the same shape and dtype with contiguous columns (a transposed view, as a checkpoint's
    (in, out) kernel laid out as (out, in) rows): ~3x faster than torch's copy of such a view."""
    if (_loaded and dst.dim() == 2 and dst.shape == src.shape and dst.dtype == src.dtype == torch.float32
            and dst.device.type == src.device.type == "cpu" and dst.is_contiguous() and src.stride(0) == 1
            and src.stride(1) >= src.shape[0] > 1):
        return torch.ops.uio_cpu.transposed_copy(dst, src)
    return dst.copy_(src)


def serves_group_norm(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether the loaded kernel computes the VQGAN's GroupNorm of ``x`` by ``weight`` and ``bias``
    (:func:`group_norm`): a channels-last float32 CPU activation, outside ``torch.compile``, with
    no gradient wanted (it has no backward)."""
    return (_runs_on(x) and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and no_gradient_wanted(x, weight, bias))


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, swish: bool, out: Tensor) -> Tensor:
    """``out`` = GroupNorm of ``x`` (``groups`` groups, float32 ``weight`` and ``bias``, two-pass
    statistics), then swish where ``swish``, by the kernel (see :func:`serves_group_norm`); ``out``
    (channels-last, x's shape) may be ``x`` itself."""
    torch.ops.uio_cpu.group_norm(x, groups, weight, bias, eps, swish, out)
    return out


def serves_gated_gelu(gate_up: Tensor) -> bool:
    """Whether the loaded kernel computes the MLP's gated GELU of ``gate_up`` (:func:`gated_gelu`):
    a contiguous float32 CPU tensor, outside ``torch.compile``, with no gradient wanted (it has no
    backward)."""
    return (_runs_on(gate_up) and gate_up.dtype == torch.float32 and gate_up.is_contiguous()
            and no_gradient_wanted(gate_up))


def gated_gelu(gate_up: Tensor) -> Tensor:
    """``gelu(gate) * up`` (tanh approximation) for ``gate_up`` = [gate | up] along its last
    dimension, by the kernel (see :func:`serves_gated_gelu`): one pass instead of torch's two, the
    arithmetic of the decoder layer kernel's MLP (tanh within a few ulp of torch's)."""
    return torch.ops.uio_cpu.gated_gelu(gate_up)


def serves_cross_entropy(logits: Tensor) -> bool:
    """Whether the loaded kernel computes losses from ``logits`` (:func:`scaled_cross_entropy`): a
    contiguous float32 CPU matrix, outside ``torch.compile``, with no gradient wanted (it has no
    backward)."""
    return (_runs_on(logits) and logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous()
            and no_gradient_wanted(logits))


def scaled_cross_entropy(logits: Tensor, targets: Tensor, divisor: float) -> Tensor:
    """``F.cross_entropy(logits / divisor, targets, reduction="none")`` by the kernel (see
    :func:`serves_cross_entropy`): two passes over each row of ``logits`` (N, C) and nothing written
    but the N losses, where torch writes the divided logits and their log-softmax (exp within a few
    ulp of torch's, summed in another order)."""
    return torch.ops.uio_cpu.scaled_cross_entropy(logits, targets, divisor)


def serves_decoder_layer(x: Tensor, weights: list[Tensor], caches: list[Tensor]) -> bool:
    """Whether the loaded kernel runs a decoder layer's decoding step (:func:`decoder_layer_step`)
    for ``x`` (rows, 1, dim), these ``weights`` and self- and cross-attention key/value ``caches``:
    on the CPU, weights in x's dtype where :func:`serves_dtype` (float32, or bfloat16 on a CPU
    without bf16 kernels), caches all float32 or all in x's dtype, at most ``MAX_ROWS`` rows, weights
    whose rows or columns are contiguous, contiguous caches, and no gradients wanted (it has no backward)."""
    return (_takes(x) and serves_dtype(x.dtype) and all(w.dtype == x.dtype for w in weights)
            and caches[0].dtype in (torch.float32, x.dtype) and all(c.dtype == caches[0].dtype for c in caches)
            and all(_rows_or_columns_contiguous(w) for w in weights) and all(t.is_contiguous() for t in caches)
            and no_gradient_wanted(x, *weights, *caches))


def decoder_layer_step(x: Tensor, weights: list[Tensor], cache: tuple[Tensor, Tensor, Tensor], self_bias: Tensor,
                       cross_kv: tuple[Tensor, Tensor], cross_bias: Tensor, eps: float) -> Tensor:
    """A decoder layer's decoding step by the kernel (see :func:`serves_decoder_layer`), as
    :class:`~uio.model.transformer.DecoderLayer` computes it (in bfloat16: in float32, rounded to
    bfloat16 after each of torch's operations): ``x`` (rows, 1, dim); ``weights`` the
    three norms' and the projections' (out, in) matrices in the order self-attention norm, fused
    query/key/value, output, cross-attention norm, query, output, MLP norm, fused wi_0/wi_1, wo;
    ``cache`` = (keys, values, index): this step's key and value are written at ``index`` before
    attending; ``self_bias`` (rows or 1, heads or 1, 1, length) and ``cross_bias`` (examples or 1,
    heads or 1, 1, encoder length) are added to the logits."""
    keys, values, index = cache
    self_norm, qkv, self_out, cross_norm, cross_q, cross_out, mlp_norm, wi, wo = weights
    # The op takes and returns x's shape: a traced step then records no reshaping around it.
    return torch.ops.uio_cpu.decoder_layer_step(x, self_norm, qkv, self_out, keys, values, index, self_bias,
                                                cross_norm, cross_q, cross_out, *cross_kv, cross_bias, mlp_norm, wi,
                                                wo, eps)
