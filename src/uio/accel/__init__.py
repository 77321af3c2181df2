"""The acceleration layer: faster versions of the seam's operations (:mod:`uio.model.ops`) and
everything they keep (packed copies, fused matrices, traces, graphs: :mod:`uio.accel.derived`).

:func:`enable` registers the fast operations; :func:`uio.runner.build_model` does, unless
``UIO_ACCEL=0`` is set or :func:`disable` was called, which puts the reference versions back (the
pure-torch path, against which the fast one is tested). :func:`prepare` lays a model out before
loading and :func:`configure` decides its :class:`~uio.accel.policy.Settings` after: the one place
the load-time policy is made (conversions with ``.to()`` lay the weights out again through
:func:`uio.accel.layout.lay_out`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ..checkpoint import Placement
from ..model import ops
from . import convolution, cpu_kernels, layout, steps, transformer_ops
from .policy import Settings, settings

__all__ = ["Settings", "configure", "disable", "disabled", "enable", "enabled", "prepare", "settings"]

_switched_off = os.environ.get("UIO_ACCEL", "1") == "0"


def enable() -> None:
    """Register every fast operation (undoing :func:`disable` and ``UIO_ACCEL=0``)."""
    global _switched_off
    _switched_off = False
    for name, function in {**transformer_ops.FAST_OPS, **convolution.FAST_OPS, **steps.FAST_OPS}.items():
        ops.register(name, function)


def disable() -> None:
    """Put back the reference operations: models compute on the plain torch path from now on."""
    global _switched_off
    _switched_off = True
    ops.reset()


def enabled() -> bool:
    """Whether the fast operations are registered now."""
    return bool(ops.registered())


def switched_on() -> bool:
    """Register the fast operations unless ``UIO_ACCEL=0`` or :func:`disable` switched them off;
    whether they are in use."""
    if not _switched_off and not enabled():
        enable()
    return enabled()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within it, the reference operations (as after :func:`disable`); then what was before."""
    was_switched_off, was_enabled = _switched_off, enabled()
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()
        else:
            ops.reset()  # the block may have switched them on
        globals()["_switched_off"] = was_switched_off


def prepare(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Placement:
    """Before loading a model built on ``meta``: load uio's CPU kernels where they serve ``dtype``
    (before any step is traced: traces keep the kernels they saw) and lay the weights out for
    ``device`` and ``dtype`` (:func:`uio.accel.layout.lay_out`). Returns the placement loading uses."""
    if device.type == "cpu" and cpu_kernels.serves_dtype(dtype):
        cpu_kernels.load()
    layout.lay_out(model, device, dtype)
    return layout.LaidOutPlacement()


def configure(model: torch.nn.Module, prepack: bool | None = None, compiled: bool = False) -> Settings:
    """After loading: decide ``model``'s settings (see :class:`~uio.accel.policy.Settings`): traced
    steps on the CPU, CUDA graphs on a GPU, ``torch.compile`` where ``compiled``; packed copies of
    the step weights made now where ``prepack`` (default: where uio's CPU kernels do not serve)."""
    weight = model.token_embedder.weight
    chosen = settings(model)
    chosen.prepack = False if compiled else prepack
    chosen.step_traces = weight.device.type == "cpu" and steps.StepTraces.available and not compiled
    chosen.cuda_graphs = weight.device.type == "cuda"
    if compiled:
        steps.compile_model(model)
    elif transformer_ops.packing.wants_packed_copies(prepack, weight.dtype, weight.device):
        transformer_ops.pack_step_weights(model)
    return chosen
