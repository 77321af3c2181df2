"""Every tuning choice of the acceleration layer: its constants (named, with units) and the
per-model settings that :func:`uio.accel.configure` decides at load.

The measurements behind these numbers are in docs/performance.md and docs/cpu-kernels.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Matrix products
KERNEL_MAX_ROWS = 32  # rows uio's CPU kernels take (a decoding step's, up to a batch of 32)
PACKED_MAX_ROWS = 64  # input rows up to which packed weight copies beat the plain matmul
PACKED_BLOCKING_ROWS = 16  # the number of input rows oneDNN blocks packed weights for
EMULATED_BF16_MAX_ROWS = 6  # beyond this many rows an emulated bf16 matmul runs faster in fp32
MLP_PIECE_BYTES = 16 << 20  # bytes of gated activations per piece of a CPU MLP of many rows (cache-sized)
SMALL_NORM_ELEMENTS = 1 << 16  # elements up to which RMSNorm runs as one layer_norm kernel on the CPU
FEW_QUERY_ROWS = 16  # query rows up to which fp32 GPU attention runs as plain matmuls (a decoding step's)

# VQGAN
GROUP_NORM_CHUNK_ELEMENTS = 1 << 18  # float32 elements per row chunk of a channels-last GroupNorm (cache-sized)

# Forms kept from call to call (see uio.accel.derived)
POSITION_BIAS_CACHE_BYTES = 64 << 20  # bytes of encoder position biases kept (least recently used go first)
KEPT_RELATIVE_BUCKETS = 32  # bucket tables kept, one per (prompt length, image grid) shape

# Decoding steps
MAX_STEP_TRACES = 64  # traced step shapes kept per model
MIN_TRACED_STEPS = 8  # steps of a kind left below which a step runs eagerly (tracing costs about 8 steps)
MIN_GRAPHED_STEPS = 4  # steps of a kind left below which a step runs eagerly (recording runs it twice)
MAX_IDLE_GRAPHED_CACHES = 4  # decoder caches kept with their CUDA graphs for later calls
MAX_IDLE_GRAPHED_BYTES = 2 << 30  # bytes of those caches together

# Weight memory (uio.accel.memory)
HUGE_PAGE_SHARED_FROM = 64 << 10  # bytes from which a tensor is carved from shared huge-page maps (smaller: ordinary memory)
HUGE_PAGE_MAP_BYTES = 64 << 20  # the least bytes a new huge-page map holds (room for the tensors carved after)


@dataclass
class Settings:
    """How the acceleration layer runs one model, decided at load (:func:`uio.accel.configure`) and
    kept on the model as ``model.accel_settings`` (so copies and pickles keep it).

    ``prepack``: keep oneDNN-packed copies of the weights a CPU decoding step reads (None: only
    where uio's CPU kernels do not serve the model's dtype). ``step_traces``: replay CPU decoding
    steps from TorchScript traces. ``cuda_graphs``: replay GPU decoding steps from CUDA graphs.
    ``compiled``: run the encoder and decoding steps through ``torch.compile``."""

    prepack: bool | None = None
    step_traces: bool = False
    cuda_graphs: bool = False
    compiled: bool = False


def settings(model: nn.Module) -> Settings:
    """``model``'s :class:`Settings` (the defaults, all off but ``prepack=None``, where none were decided)."""
    return model.__dict__.setdefault("accel_settings", Settings())
