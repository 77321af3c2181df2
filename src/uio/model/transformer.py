"""The Unified-IO encoder-decoder transformer (T5-style, with image patches in and image tokens out).

Module and parameter names mirror the released checkpoints (see ``uio.checkpoint.torch_key``).
Numerics follow the reference exactly where outputs depend on them: attention logits are not
scaled by 1/sqrt(head_dim); masks are an additive -1e10 (a fully masked row attends uniformly);
norms are T5 RMS norms computed in float32; the MLP is gated GELU (tanh approximation).
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import UnifiedIOConfig
from ..accel import cpu_kernels, memory
from .embedding import Embedding
from ..accel.hardware import computes_natively, cpu_has_bf16_kernels
from ..accel.derived import tensor_state

log = logging.getLogger(__name__)
MASK_VALUE = -1e10  # the reference's additive mask, also used for masked logits
TEXT_BUCKETS, TEXT_MAX_DISTANCE = 32, 128
IMAGE_BUCKETS, IMAGE_MAX_DISTANCE = 8, 20
DECODER_IMAGE_WIDTH = 16  # the decoder's 256 image tokens form a 16x16 grid
# Whether F.rms_norm is one kernel on GPUs (torch 2.11 yes, 2.7 no: there, several in the input's dtype).
FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")
FEW_QUERY_ROWS = 16  # attention over at most this many query rows is a decoding step's (see attention)
SMALL_NORM_ELEMENTS = 1 << 16  # up to this size RMSNorm uses layer_norm's single CPU kernel
PACKED_MAX_ROWS = 64  # prepacked weights serve decoding steps; larger inputs use the plain matmul
# The number of input rows packed weights are blocked for: with 16, oneDNN's blocking streams an
# fp32 step's weights 1.3-1.7x faster for 2-8 rows than when blocked for 1 row, and no slower for 1.
PACKED_BLOCKING_ROWS = 16
# On a CPU without bf16 kernels, bf16 matmuls are emulated at ~10 GFLOP/s: beyond this many rows it
# is faster to multiply in fp32 (converting the weight costs about as much as 4-6 emulated rows).
EMULATED_BF16_MAX_ROWS = 6
# CPU MLPs of many rows (a batch of 16's encoder) run in pieces of rows whose gated activations take
# this much, so that they stay in cache between the two matmuls and the GELU: on a 2-core AMD EPYC
# (32 MB L3), small's MLP over 7040 rows took 13-20% less time in pieces of 2048 rows; over 3520 rows
# (a batch of 8), whole or in pieces took the same.
MLP_PIECE_BYTES = 16 << 20
# The encoder's position biases kept from call to call (see Encoder.position_bias), up to this many
# bytes (the least recently used go first): making them took 16-20 ms of each encoding of a 480x640
# image by `small` on a 2-core AMD EPYC (~3% of a VQA call); kept, only a new prompt length, image
# grid or padding makes them again.
POSITION_BIAS_CACHE_BYTES = 64 << 20
_KEPT_BIASES_LOCK = threading.Lock()  # calls may encode from several threads at once
MAX_STEP_TRACES = 64  # step shapes kept traced (see StepTraces); a few recur in practice
MIN_TRACED_STEPS = 8  # making a trace takes about as long as 8 steps: fewer steps left run eagerly
MIN_GRAPHED_STEPS = 4  # recording a CUDA graph runs the step twice: fewer steps left run eagerly
# Decoder caches kept with their CUDA graphs for later calls (see GraphedCaches): how many, how much memory.
MAX_IDLE_GRAPHED_CACHES = 4
MAX_IDLE_GRAPHED_BYTES = 2 << 30


class RMSNorm(nn.Module):
    """T5 layer norm: scale * x / rms(x), no mean subtraction and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        compiling, on_gpu = torch.compiler.is_compiling(), x.device.type != "cpu"
        if on_gpu and not compiling and FUSED_RMS_NORM:
            # The fused GPU kernel computes in float32 from half-precision inputs and weights: one
            # kernel instead of three conversions around it (a third of a bf16 step's kernels).
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        x32, weight = x.float(), self.weight.float()
        dim = x.shape[-1]
        if on_gpu or compiling:
            return F.rms_norm(x32, weight.shape, weight, self.eps).to(x.dtype)
        if x.numel() > SMALL_NORM_ELEMENTS:
            # F.rms_norm's arithmetic (identical results), but torch's CPU kernel allocates more
            # full-size temporaries: 1.3x slower for one encoder input, 4x for a batch of 8.
            return (x32 * x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_() * weight).to(x.dtype)
        # Small inputs (decoding steps): kernel launches are the cost. Over [x, -x] (mean 0, mean
        # square = mean(x^2)) layer_norm computes x / rms(x) in one kernel instead of several.
        normed = F.layer_norm(torch.cat([x32, -x32], dim=-1), (2 * dim,), eps=self.eps)[..., :dim]
        return (normed * weight).to(x.dtype)


def packed_matmul_supported(dtype: torch.dtype) -> bool:
    """Whether :func:`pack_weight` serves ``dtype`` on this CPU: fp32 on x86 (measured there),
    bf16 where oneDNN has bf16 kernels."""
    if dtype == torch.float32:
        return torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")
    return dtype == torch.bfloat16 and cpu_has_bf16_kernels()


def wants_packed_copies(keep: bool | None, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a model in ``dtype`` on ``device`` keeps packed weight copies for its decoding steps:
    only on a CPU where :func:`packed_matmul_supported`; there ``keep``, or by default (None) where
    uio's CPU kernels do not serve them (they serve steps of up to ``cpu_kernels.MAX_ROWS`` rows as
    fast as the copies or faster, without their memory)."""
    if torch.device(device).type != "cpu" or not packed_matmul_supported(dtype):
        return False
    return not cpu_kernels.in_use(dtype) if keep is None else keep


def pack_weight(weight: Tensor, rows: int = PACKED_BLOCKING_ROWS) -> Tensor:
    """oneDNN's prepacked copy of a linear weight, for :func:`linear`, blocked for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class WeightPacker:
    """:func:`pack_weight` for many weights in a row. oneDNN packs from a contiguous (out, in)
    matrix, and copies a weight that is not (fp32's (in, out) layout, see
    :func:`stores_transposed`) into a new one first; this copies each into one buffer reused for
    all of them, which spares the page faults and the freed copies the C heap would keep
    (loading ``large`` on a 2-core CPU: 0.7-2 s faster, 0.09 GiB less memory)."""

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


def linear(x: Tensor, weight: Tensor, packed: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight)``; for inputs of up to ``cpu_kernels.MAX_ROWS`` rows on the CPU by uio's kernel
    where it serves them (:mod:`uio.accel.cpu_kernels`, ~1.8x faster), else through ``packed`` (:func:`pack_weight` of
    ``weight``) for inputs of a few rows: on the CPU that is 1.5-2.5x faster (the plain matmul
    re-blocks a half-precision weight on every call, and its fp32 kernel for a few rows gains
    nothing from a second thread); fp32 inputs of many rows by oneDNN (see :func:`_plain_linear`)."""
    rows = x.shape[:-1].numel()
    if cpu_kernels.serves(x, weight):
        return cpu_kernels.gemv(x, weight)
    if packed is None or rows > PACKED_MAX_ROWS or torch.compiler.is_compiling():
        if rows > EMULATED_BF16_MAX_ROWS and emulates_bf16(x):
            return _plain_linear(x.float(), weight.float()).to(x.dtype)
        return _plain_linear(x, weight)
    return _onednn_linear(x, packed)


def _plain_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)``; in fp32 for more than ``PACKED_MAX_ROWS`` rows on an x86 CPU by oneDNN,
    which takes an unpacked weight too (any layout): on a 2-core AMD EPYC the model's matmuls of
    100-3520 rows ran 20-30% faster than torch's own (MKL's), the same sums to rounding. Not where a
    gradient is wanted (the op has none)."""
    # Compiled graphs use their own kernels (checked first: torch 2.4's dynamo cannot trace the rest).
    if (not torch.compiler.is_compiling() and x.dtype == weight.dtype == torch.float32
            and x.shape[:-1].numel() > PACKED_MAX_ROWS and x.device.type == "cpu" and packed_matmul_supported(x.dtype)
            and cpu_kernels.no_gradient_wanted(x, weight)):
        return _onednn_linear(x, weight)
    return F.linear(x, weight)


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """oneDNN's linear of ``x`` by ``weight``, packed (:func:`pack_weight`) or not."""
    if torch.jit.is_tracing():
        # The tracer cannot record the op's (empty) list of optional scalars; a call of the
        # scripted function can be recorded, and runs the same op.
        return _scripted_packed_linear()(x, weight)
    return _packed_linear(x, weight)


def emulates_bf16(x: Tensor) -> bool:
    """Whether ``x`` is a bf16 tensor on a CPU without bf16 kernels (where bf16 matmuls are emulated)."""
    return x.dtype == torch.bfloat16 and not computes_natively(x.dtype, x.device)


def _packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    no_scalars: List[Optional[number]] = []  # noqa: F821 - TorchScript's name for the op's Scalar?[] items
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", no_scalars, "")


@functools.cache
def _scripted_packed_linear() -> Callable[[Tensor, Tensor], Tensor]:
    return torch.jit.script(_packed_linear)


def stores_transposed(dtype: torch.dtype, device: torch.device | str = "cpu", decoder: bool = False) -> bool:
    """Whether weights in ``dtype`` on ``device`` (of the ``decoder`` or not) are kept as transposed
    views of the checkpoint's (in, out) kernels instead of (out, in) copies: fp32 matmuls run at
    the same speed on either layout and a plain copy is several times faster than a transposed one
    (loading ``large``: 7.4 s -> 2.8 s on a 2-core CPU), while some half-precision CPU kernels are
    slower on the transposed layout (bf16 decoding steps 3x on a CPU without bf16 kernels).

    The exception: the decoder's fp32 weights on the CPU where uio's CPU kernels serve its steps.
    They stream a step's small matrices ~15% faster as (out, in) rows (no sum across threads to
    wait for): steps of ``small`` 5-8% faster on a 2-core AMD Zen 3, for a transposing copy at load."""
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


def fuse_weights(linears: list[nn.Linear], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, decoder: bool = False, as_rows: bool = False) -> Tensor:
    """Concatenate the weights of ``linears`` (same input) into one matrix, in the layout
    :func:`empty_weight` picks for them, or as (out, in) rows where ``as_rows`` (a matrix whose row
    ranges are multiplied apart: a row range of a transposed view has neither its rows nor its
    columns contiguous, a layout oneDNN multiplies by a far slower reference kernel); each
    module keeps a view of its rows, so memory is unchanged and one matmul computes all their outputs.

    Weights still on ``meta`` get an uninitialised matrix on ``device`` in ``dtype`` instead, which
    :func:`uio.checkpoint.load_into` fills in place: loading then copies each weight once.
    """
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


def views_of(fused: Tensor, linears: list[nn.Linear]) -> bool:
    """Whether every one of ``linears`` still holds a view of ``fused`` (from :func:`fuse_weights`),
    rather than a weight assigned or converted since, which the fused matrix would not follow."""
    start = fused.data_ptr()
    end = start + fused.numel() * fused.element_size()
    return all(start <= m.weight.data_ptr() < end for m in linears)


class HoldsPackedCopies(nn.Module):
    """A module keeping :func:`pack_weight` copies in ``self.packed``: opaque oneDNN tensors, which
    cannot be copied or pickled, so its copies start without them (UnifiedIO's pack again)."""

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "packed": {}}


class MlpBlock(HoldsPackedCopies):
    """Gated-GELU feed-forward: wo(gelu(wi_0 x) * wi_1 x); many CPU rows in pieces (see MLP_PIECE_BYTES)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.wi_0 = nn.Linear(dim, hidden, bias=False)
        self.wi_1 = nn.Linear(dim, hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)
        self.fused_wi: Tensor | None = None
        self.packed: dict[str, Tensor] = {}

    def fuse(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             decoder: bool = False) -> None:
        """Compute wi_0 and wi_1 with one matmul from now on (see :func:`fuse_weights`)."""
        self.fused_wi = fuse_weights([self.wi_0, self.wi_1], device, dtype, decoder)

    def fusion_is_stale(self) -> bool:
        """Whether a projection's weight is no longer a view of the fused matrix (see :func:`views_of`)."""
        return self.fused_wi is not None and not views_of(self.fused_wi, [self.wi_0, self.wi_1])

    def prepack(self, pack: Callable[[Tensor], Tensor] = pack_weight) -> None:
        """Keep packed copies of the (fused) weights for :func:`linear`; call after :meth:`fuse`."""
        self.packed = {"wi": pack(self.fused_wi), "wo": pack(self.wo.weight)}

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        piece = max(1, MLP_PIECE_BYTES // (2 * self.wo.in_features * x.element_size()))
        if x.device.type != "cpu" or rows <= 2 * piece or torch.compiler.is_compiling():  # (compiling: unmeasured)
            return self._forward(x)
        pieces = [self._forward(part) for part in x.reshape(rows, x.shape[-1]).split(piece)]
        return torch.cat(pieces).view(*x.shape[:-1], -1)

    def _forward(self, x: Tensor) -> Tensor:
        if self.fused_wi is None:
            activated = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            gate_up = linear(x, self.fused_wi, self.packed.get("wi"))
            if cpu_kernels.serves_gated_gelu(gate_up):
                activated = cpu_kernels.gated_gelu(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                activated = F.gelu(gate, approximate="tanh") * up
        return linear(activated, self.wo.weight, self.packed.get("wo"))


class Attention(HoldsPackedCopies):
    """Multi-head attention without logit scaling; ``bias`` is added to the logits."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, projected_apart: bool = False):
        """``projected_apart``: the query's and the key/value's projections run apart (cross-attention)."""
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.projected_apart = projected_apart
        inner = num_heads * head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.value = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

        self.fused_qkv: Tensor | None = None
        self.packed: dict[str, Tensor] = {}

    def fuse(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             decoder: bool = False) -> None:
        """Compute the query/key/value projections with one matmul from now on (see :func:`fuse_weights`)."""
        self.fused_qkv = fuse_weights([self.query, self.key, self.value], device, dtype, decoder, self.projected_apart)

    def fusion_is_stale(self) -> bool:
        """Whether a projection's weight is no longer a view of the fused matrix (see :func:`views_of`)."""
        return self.fused_qkv is not None and not views_of(self.fused_qkv, [self.query, self.key, self.value])

    def prepack(self, which: str, pack: Callable[[Tensor], Tensor] = pack_weight) -> None:
        """Keep packed copies, for :func:`linear`, of the ``which`` projection (as in :meth:`project`)
        and of the output projection; call after :meth:`fuse`."""
        self.packed = {which: pack(self._fused_rows(which)), "out": pack(self.out.weight)}

    def _fused_rows(self, which: str) -> Tensor:
        inner = self.num_heads * self.head_dim
        return self.fused_qkv["qkv".index(which[0]) * inner:("qkv".index(which[-1]) + 1) * inner]

    def project(self, x: Tensor, which: str) -> tuple[Tensor, ...]:
        """Project ``x`` (B, L, dim) into heads (B, H, L, D) for each of ``which`` ("qkv", "kv" or "q")."""
        if self.fused_qkv is None:
            y = torch.cat([{"q": self.query, "k": self.key, "v": self.value}[c](x) for c in which], dim=-1)
        else:
            y = linear(x, self._fused_rows(which), self.packed.get(which))
        return y.unflatten(-1, (len(which), self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q (B,H,Lq,D), k/v (B,H,Lk,D), bias (q's dtype) broadcastable to (B,H,Lq,Lk) -> (B, Lq, dim).

        k/v may instead have B/n rows, each shared by n consecutive rows of q (an example's beams,
        samples or answer options): those are attended as one query sequence of n*Lq, as each
        query row is on its own, instead of copying the keys and values n times. ``bias`` then
        has a row per query row, or per key/value row with one query position.
        """
        rows, _, length, _ = q.shape
        sharing = rows // k.shape[0]
        if sharing > 1:
            q = q.unflatten(0, (-1, sharing)).transpose(1, 2).flatten(2, 3)
            if bias.shape[0] == rows:  # a bias per query row (else one per key row, or for all)
                bias = bias.expand(-1, -1, length, -1).unflatten(0, (-1, sharing)).transpose(1, 2).flatten(2, 3)
        # Keys/values may be kept in a wider dtype than q (see step_attention_dtype).
        x = attention(q.to(k.dtype), k, v, bias).to(q.dtype)
        x = x.transpose(1, 2).flatten(2).reshape(rows, length, -1)
        return linear(x, self.out.weight, self.packed.get("out"))


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T + bias) v, unscaled, for q (B, H, Lq, D) and k/v (B, H, Lk, D).

    On a GPU in float32, the fused kernel torch picks (memory-efficient attention) runs a decoding
    step's few query rows on one block per head: ~47 us a call on an H200, two thirds of a step,
    where these four kernels take a few us each. Elsewhere the fused kernel is faster, also for
    one query row on the CPU when compiled (inductor makes mul+sum loops of a one-row matmul)."""
    if q.device.type == "cuda" and q.dtype == torch.float32 and q.shape[2] <= FEW_QUERY_ROWS:
        return torch.matmul(q, k.transpose(-1, -2)).add_(bias).softmax(dim=-1).matmul(v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def pair_valid(query_valid: Tensor, key_valid: Tensor) -> Tensor:
    """(B, 1, Lq, Lk) bool: both the query and the key position are valid."""
    return query_valid[:, None, :, None].bool() & key_valid[:, None, None, :].bool()


def masked(bias: Tensor, valid: Tensor) -> Tensor:
    """``bias`` where ``valid``, -1e10 elsewhere (broadcast). The reference adds -1e10 to the bias
    instead; in float32 that rounds to -1e10 for any bias under 512 in magnitude, so both agree,
    and one pass over the (B, H, Lq, Lk) tensor is cheaper than two. float16 ends at -65504, its
    lowest value is used instead: as -1e10 it gets no weight next to any valid key, and a row with
    no valid key (a padding query) stays finite (-inf, what newer torch makes of -1e10 there, would
    make it NaN in some attention kernels; older torch raises)."""
    return torch.where(valid, bias, max(MASK_VALUE, torch.finfo(bias.dtype).min))


def cross_attention_bias(query_valid: Tensor, key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, Lq, Lk) bias of cross-attention, which has no position bias: 0, or -1e10 where masked."""
    zero = torch.zeros((), dtype=dtype, device=key_valid.device)
    return masked(zero, pair_valid(query_valid, key_valid))


def _log_bucket(n: Tensor, max_exact: int, num_buckets: int, max_distance: int) -> Tensor:
    """Logarithmic bucket for distances >= max_exact, in float32 as the reference computes it."""
    eps = torch.finfo(torch.float32).eps
    scaled = torch.log(n.float() / max_exact + eps) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.int64)
    return torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


def text_relative_bucket(relative_position: Tensor, bidirectional: bool,
                         num_buckets: int = TEXT_BUCKETS, max_distance: int = TEXT_MAX_DISTANCE) -> Tensor:
    """T5's bucket of ``memory_position - query_position``."""
    n = -relative_position
    offset = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        offset = (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    return offset + _log_bucket(n, num_buckets // 2, num_buckets, max_distance)


def image_relative_bucket(rel_x: Tensor, rel_y: Tensor, num_buckets: int = IMAGE_BUCKETS,
                          max_distance: int = IMAGE_MAX_DISTANCE) -> Tensor:
    """The reference's 2-D bucket: a quadrant times (log-bucketed |dx|, |dy|)."""
    nx, ny = -rel_x, -rel_y
    total = num_buckets ** 2
    quadrant = (((nx <= 0) & (ny < 0)).long() * 3 + ((nx < 0) & (ny >= 0)).long() * 2
                + ((nx > 0) & (ny <= 0)).long())
    max_exact = num_buckets // 2
    xx = _log_bucket(nx.abs(), max_exact, num_buckets, max_distance)
    yy = _log_bucket(ny.abs(), max_exact, num_buckets, max_distance)
    return quadrant * total + xx + num_buckets * yy


class RelativePositionBiases(nn.Module):
    """Per-head relative biases: 1-D T5 buckets among text, 2-D buckets among image, 0 across."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.rel_embedding = nn.Parameter(torch.zeros(num_heads, TEXT_BUCKETS))
        self.image_rel_embedding = nn.Parameter(torch.zeros(num_heads, 4 * IMAGE_BUCKETS ** 2))

    def forward(self, text_length: int, image_length: int, image_width: int, bidirectional: bool,
                device: torch.device, keep: Tensor | None = None) -> Tensor:
        """(H, T+I, T+I) biases for ``text_length`` text then ``image_length`` image positions
        (only between positions ``keep``, when given)."""
        buckets = _relative_buckets if torch.compiler.is_compiling() else _cached_relative_buckets
        index = buckets(text_length, image_length, image_width, bidirectional, device)
        if keep is not None:
            index = index[keep[:, None], keep]
        # One gather from the text buckets, then the image buckets, then a zero column (text-image pairs).
        zero = self.rel_embedding.new_zeros(self.rel_embedding.shape[0], 1)
        table = torch.cat([self.rel_embedding, self.image_rel_embedding, zero], dim=1)
        heads = table.shape[0]  # gather is the fastest CPU gather here, in float32 and bf16 alike
        return table.gather(1, index.flatten().expand(heads, -1)).view(heads, *index.shape)


def _relative_buckets(text_length: int, image_length: int, image_width: int, bidirectional: bool,
                      device: torch.device) -> Tensor:
    """(T+I, T+I) column ids into :class:`RelativePositionBiases`' joint table: text buckets among
    text positions, image buckets (offset by the text ones) among the positions of a row-major
    image grid, and the zero column after both for text-image pairs."""
    text = torch.arange(text_length, device=device)
    image = torch.arange(image_length, device=device)
    x, y = image % image_width, image // image_width
    total = text_length + image_length
    index = torch.full((total, total), TEXT_BUCKETS + 4 * IMAGE_BUCKETS ** 2, device=device)
    index[:text_length, :text_length] = text_relative_bucket(text[None, :] - text[:, None], bidirectional)
    index[text_length:, text_length:] = TEXT_BUCKETS + image_relative_bucket(x[None, :] - x[:, None],
                                                                             y[None, :] - y[:, None])
    return index


# Buckets depend on shapes only, and computing them for 576 image positions takes longer than the
# rest of the bias: a few shapes recur (one image grid, a few prompt lengths).
@functools.lru_cache(maxsize=32)
def _cached_relative_buckets(text_length: int, image_length: int, image_width: int, bidirectional: bool,
                             device: torch.device) -> Tensor:
    # Outside inference mode, whatever mode the first call ran in: kept tensors serve autograd too.
    # (Not in the compiled path: torch 2.6-2.7 fail to compile inference_mode(False) there.)
    with torch.inference_mode(False):
        return _relative_buckets(text_length, image_length, image_width, bidirectional, device)


def position_bias(pos_emb: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, num_heads: int, emb_dim: int,
                  relative: Tensor) -> Tensor:
    """(L, D) normed position embeddings -> (H, L, L) absolute bias, scaled by
    (emb_dim/num_heads)^-0.5, plus the ``relative`` (H, L, L) bias (added within the matmul)."""
    q = linear(pos_emb, q_proj.weight).unflatten(-1, (num_heads, -1)).transpose(0, 1)
    k = linear(pos_emb, k_proj.weight).unflatten(-1, (num_heads, -1)).transpose(0, 1)
    wide = torch.float32 if emulates_bf16(q) else q.dtype  # see EMULATED_BF16_MAX_ROWS
    bias = torch.baddbmm(relative.to(wide), q.to(wide), k.to(wide).transpose(1, 2),
                         alpha=float(emb_dim / num_heads) ** -0.5)
    return bias.to(relative.dtype)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.pre_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
        self.pre_mlp_layer_norm = RMSNorm(cfg.emb_dim)
        self.mlp = MlpBlock(cfg.emb_dim, cfg.mlp_dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attention.attend(*self.attention.project(self.pre_attention_layer_norm(x), "qkv"), bias)
        return x + self.mlp(self.pre_mlp_layer_norm(x))


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder: states, key validity, and position embeddings."""

    hidden: Tensor  # (B, S, D) after the final norm
    mask: Tensor  # (B, S) int32, 1 for valid positions
    position_embedding: Tensor  # (1, S, D) normed position embeddings (the reference's 2nd output)


def positions_to_keep(mask: Tensor) -> Tensor | None:
    """Indices of the positions valid in some example of ``mask`` (B, L); None when that is all of
    them (or none). Valid positions never attend to masked ones (-1e10 gives them a weight of
    exactly 0), so the others can be left out without changing what the valid ones compute."""
    valid = mask.bool().any(dim=0)
    return None if bool(valid.all()) or not bool(valid.any()) else valid.nonzero()[:, 0]


class Encoder(nn.Module):
    """Embeds text tokens and image patches, then runs the bidirectional transformer."""

    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.emb_dim
        self.position_embedding = Embedding(cfg.encoder_max_text_length + cfg.encoder_max_image_length, d)
        self.segment_embedding = Embedding(cfg.num_seg_emb, d)
        self.image_projection = nn.Linear(cfg.image_patch_size ** 2 * 3, d, bias=False)
        self.txt_emb_pre_ln = RMSNorm(d)
        self.img_emb_pre_ln = RMSNorm(d)
        self.pe_pre_ln = RMSNorm(d)
        self.position_q_linear = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.position_k_linear = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.relpos_bias = RelativePositionBiases(cfg.num_heads)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.encoder_norm = RMSNorm(d)
        self._biases: OrderedDict[tuple, Tensor] = OrderedDict()  # see position_bias

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_biases": OrderedDict()}  # copies start without the kept biases

    def _apply(self, fn, recurse=True):
        with _KEPT_BIASES_LOCK:
            self._biases.clear()  # kept for the old device or dtype
        return super()._apply(fn, recurse)

    def position_bias(self, text_length: int, image_length: int, grid_width: int, keep: Tensor | None,
                      pos: Tensor) -> Tensor:
        """(H, L, L) relative and absolute position biases between the (``keep``) positions, from their
        normed position embeddings ``pos``. They depend on nothing but these arguments' shapes and
        values and the weights: the last few are kept (up to ``POSITION_BIAS_CACHE_BYTES``) for later
        calls of the same shapes, unless compiling or gradients are wanted."""
        relpos = self.relpos_bias
        weights = (self.position_embedding.weight, self.pe_pre_ln.weight, self.position_q_linear.weight,
                   self.position_k_linear.weight, relpos.rel_embedding, relpos.image_rel_embedding)
        if (POSITION_BIAS_CACHE_BYTES <= 0 or torch.compiler.is_compiling()
                or not cpu_kernels.no_gradient_wanted(*weights)):
            return self._position_bias(text_length, image_length, grid_width, keep, pos)
        key = (text_length, image_length, grid_width, None if keep is None else keep.cpu().numpy().tobytes(),
               pos.device, pos.dtype, *map(tensor_state, weights))
        with _KEPT_BIASES_LOCK:
            bias = self._biases.get(key)
            if bias is not None:
                self._biases.move_to_end(key)
                return bias
        # A normal tensor whatever mode this call runs in: later calls may track autograd around it.
        with torch.inference_mode(False), torch.no_grad():
            bias = self._position_bias(text_length, image_length, grid_width, keep, pos)
        with _KEPT_BIASES_LOCK:
            self._biases[key] = bias
            while len(self._biases) > 1 and sum(b.nbytes for b in self._biases.values()) > POSITION_BIAS_CACHE_BYTES:
                self._biases.popitem(last=False)
        return bias

    def _position_bias(self, text_length: int, image_length: int, grid_width: int, keep: Tensor | None,
                       pos: Tensor) -> Tensor:
        cfg = self.cfg
        relative = self.relpos_bias(text_length, image_length, grid_width, bidirectional=True, device=pos.device,
                                    keep=keep)
        return position_bias(pos, self.position_q_linear, self.position_k_linear, cfg.num_heads, cfg.emb_dim,
                             relative)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) -> (B, H/p * W/p, p*p*3), patch vectors ordered (row, col, channel)."""
        p = self.cfg.image_patch_size
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def image_position_embedding(self, num_patches: int, grid_width: int) -> Tensor:
        """(num_patches, D); the 24x24 table is bicubic-resized for other square grids."""
        cfg = self.cfg
        table = self.position_embedding.weight[cfg.encoder_max_text_length:]
        if num_patches == cfg.encoder_max_image_length:
            return table
        side = math.isqrt(cfg.encoder_max_image_length)
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(num_patches // grid_width, grid_width), mode="bicubic",
                             antialias=True, align_corners=False).to(table.dtype)
        return grid.permute(0, 2, 3, 1).reshape(num_patches, -1)

    def forward(self, tokens: Tensor, token_embedder: nn.Embedding, images: Tensor, text_mask: Tensor,
                image_mask: Tensor, skip_padding: bool = False) -> EncoderOutput:
        """tokens (B, T) int; images (B, H, W, 3) normalized; masks (B, T) / (B, N) -> EncoderOutput.

        ``skip_padding`` leaves out the positions masked in every example (see :meth:`UnifiedIO.encode`).
        """
        cfg = self.cfg
        b, t = tokens.shape
        patches = self.patchify(images)
        n = patches.shape[1]
        grid_width = images.shape[2] // cfg.image_patch_size
        text_pos = self.position_embedding.weight[:t]
        image_pos = self.image_position_embedding(n, grid_width)

        seg = self.segment_embedding.weight
        txt = token_embedder(tokens) + seg[0] + text_pos
        img = linear(patches, self.image_projection.weight) + seg[1] + image_pos
        x = torch.cat([self.txt_emb_pre_ln(txt), self.img_emb_pre_ln(img)], dim=1)
        pos = torch.cat([text_pos, image_pos], dim=0)
        mask = torch.cat([text_mask.int(), image_mask.int()], dim=1)
        keep = positions_to_keep(mask) if skip_padding and not torch.compiler.is_compiling() else None
        if keep is not None:
            x, pos, mask = x.index_select(1, keep), pos.index_select(0, keep), mask.index_select(1, keep)

        pos = self.pe_pre_ln(pos)
        bias = self.position_bias(t, n, grid_width, keep, pos)
        # Examples with one mask (prompts of one length, images of one shape) share one masked
        # bias, broadcast over the batch: a copy per example costs 4-7% of a batch of 8's encoder.
        shared = not torch.compiler.is_compiling() and bool((mask == mask[:1]).all())
        rows = mask[:1] if shared else mask
        bias = masked(bias[None], pair_valid(rows, rows))
        for layer in self.layers:
            x = layer(x, bias)
        return EncoderOutput(self.encoder_norm(x), mask, pos[None])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.pre_self_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.self_attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
        self.pre_cross_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.encoder_decoder_attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim, projected_apart=True)
        self.pre_mlp_layer_norm = RMSNorm(cfg.emb_dim)
        self.mlp = MlpBlock(cfg.emb_dim, cfg.mlp_dim)

    def forward(self, x: Tensor, self_bias: Tensor, cross_kv: tuple[Tensor, Tensor], cross_bias: Tensor,
                cache: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Self-attention over ``x`` itself (teacher forcing) or, with ``cache`` = (keys, values,
        index), over the cached keys/values after writing this step's at ``index`` (decoding)."""
        kernel_weights = self._kernel_weights_for_step(x, cross_kv, cache)
        if kernel_weights is not None:  # the same arithmetic in one call
            return cpu_kernels.decoder_layer_step(x, kernel_weights, cache, self_bias, cross_kv, cross_bias,
                                                  self.pre_mlp_layer_norm.eps)
        attn, cross = self.self_attention, self.encoder_decoder_attention
        q, k, v = attn.project(self.pre_self_attention_layer_norm(x), "qkv")
        if cache is not None:
            keys, values, index = cache
            k, v = keys.index_copy_(2, index, k.to(keys.dtype)), values.index_copy_(2, index, v.to(values.dtype))
        x = x + attn.attend(q, k, v, self_bias)
        q, = cross.project(self.pre_cross_attention_layer_norm(x), "q")
        x = x + cross.attend(q, *cross_kv, cross_bias)
        return x + self.mlp(self.pre_mlp_layer_norm(x))

    def kernel_weights(self) -> list[Tensor] | None:
        """The weights :func:`cpu_kernels.decoder_layer_step` takes, in its order (None before the
        projections are fused)."""
        attn, cross, mlp = self.self_attention, self.encoder_decoder_attention, self.mlp
        if attn.fused_qkv is None or cross.fused_qkv is None or mlp.fused_wi is None:
            return None
        return [self.pre_self_attention_layer_norm.weight, attn.fused_qkv, attn.out.weight,
                self.pre_cross_attention_layer_norm.weight, cross._fused_rows("q"), cross.out.weight,
                self.pre_mlp_layer_norm.weight, mlp.fused_wi, mlp.wo.weight]

    def _kernel_weights_for_step(self, x: Tensor, cross_kv: tuple[Tensor, Tensor],
                                 cache: tuple | None) -> list[Tensor] | None:
        """:meth:`kernel_weights` where uio's CPU kernel runs this layer's decoding step, else None."""
        weights = self.kernel_weights() if cache is not None else None
        if weights is None or not cpu_kernels.serves_decoder_layer(x, weights, [*cache[:2], *cross_kv]):
            return None
        return weights


class Decoder(nn.Module):
    """Causal decoder over text positions 0..T-1 followed by image positions 0..I-1."""

    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.cfg = cfg
        d, inner = cfg.emb_dim, cfg.num_heads * cfg.head_dim
        self.position_embedding = Embedding(cfg.decoder_max_text_length + cfg.decoder_max_image_length, d)
        self.segments_embedding = Embedding(cfg.num_seg_emb, d)
        self.pre_ln = RMSNorm(d)
        self.pe_pre_ln = RMSNorm(d)
        self.self_position_q_linear = nn.Linear(d, inner, bias=False)
        self.self_position_k_linear = nn.Linear(d, inner, bias=False)
        # Present in the checkpoints but never used by the reference (cross-attention gets no bias).
        self.cross_position_q_linear = nn.Linear(d, inner, bias=False)
        self.cross_position_k_linear = nn.Linear(d, inner, bias=False)
        self.relpos_bias = RelativePositionBiases(cfg.num_heads)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = RMSNorm(d)

    def position_ids(self, text_length: int, image_length: int, device) -> Tensor:
        """Rows of the position table: text 0..T-1, image max_text_length + 0..I-1."""
        return torch.cat([torch.arange(text_length, device=device),
                          self.cfg.decoder_max_text_length + torch.arange(image_length, device=device)])

    def self_bias(self, text_length: int, image_length: int, device) -> Tensor:
        """(H, L, L) relative + absolute position bias for the whole output sequence."""
        cfg = self.cfg
        pos = self.pe_pre_ln(self.position_embedding(self.position_ids(text_length, image_length, device)))
        relative = self.relpos_bias(text_length, image_length, DECODER_IMAGE_WIDTH, bidirectional=False,
                                    device=device)
        return position_bias(pos, self.self_position_q_linear, self.self_position_k_linear, cfg.num_heads,
                             cfg.emb_dim, relative)

    def embed(self, tokens: Tensor, token_embedder: nn.Embedding, positions: Tensor, segments: Tensor) -> Tensor:
        """tokens (B, L); positions (L,) rows of the position table; segments (L,) 0 text / 1 image."""
        y = token_embedder(tokens) + self.position_embedding(positions) + self.segments_embedding(segments)
        return self.pre_ln(y)

    def cross_kv(self, encoded: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Project the encoder states once per call for every layer's cross-attention."""
        return [[kv.contiguous() for kv in layer.encoder_decoder_attention.project(encoded, "kv")]
                for layer in self.layers]

    def run_layers(self, y: Tensor, self_bias: Tensor, cross_kv: list, cross_bias: Tensor,
                   caches: list[tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        """Run every layer (layer i with ``caches[i]`` when decoding) and the final norm."""
        for i, layer in enumerate(self.layers):
            y = layer(y, self_bias, cross_kv[i], cross_bias, caches[i] if caches else None)
        return self.decoder_norm(y)


def logits_from_hidden(hidden: Tensor, token_embedder: nn.Embedding, rows: slice | None = None,
                       packed: Tensor | None = None) -> Tensor:
    """Shared-embedding output layer (divided by sqrt(emb_dim)), optionally for a row range only
    (``packed``: that range's :func:`pack_weight`)."""
    return _unscaled_logits(hidden, token_embedder, rows, packed) / _logit_divisor(hidden)


def _logit_divisor(hidden: Tensor) -> float:
    """What the output layer divides its logits by: sqrt(emb_dim), as the reference."""
    return math.sqrt(hidden.shape[-1])


def _unscaled_logits(hidden: Tensor, token_embedder: nn.Embedding, rows: slice | None = None,
                     packed: Tensor | None = None) -> Tensor:
    table = token_embedder.weight if rows is None else token_embedder.weight[rows]
    return linear(hidden, table, packed).float()


def negative_log_likelihood(hidden: Tensor, token_embedder: nn.Embedding, rows: slice, targets: Tensor) -> Tensor:
    """-log p(target) (N,) under the output layer's logits of embedding ``rows`` for ``hidden`` (N, D):
    ``F.cross_entropy`` of :func:`logits_from_hidden`, where uio's CPU kernel serves it without
    writing the scaled logits and their log-softmax (see :func:`cpu_kernels.scaled_cross_entropy`)."""
    logits, divisor = _unscaled_logits(hidden, token_embedder, rows), _logit_divisor(hidden)
    if cpu_kernels.serves_cross_entropy(logits):
        return cpu_kernels.scaled_cross_entropy(logits, targets, divisor)
    return F.cross_entropy(logits / divisor, targets, reduction="none")


class UnifiedIO(nn.Module):
    """The whole network: shared token embedding, encoder, decoder and the VQGAN."""

    def __init__(self, cfg: UnifiedIOConfig, vae_cfg):
        super().__init__()
        from .vqgan import VQGAN

        self.cfg = cfg
        self.token_embedder = Embedding(cfg.vocab_size + cfg.image_vocab_size, cfg.emb_dim)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.discrete_vae = VQGAN(vae_cfg)
        self.compiled_step: Callable | None = None  # see enable_compile
        self.step_traces: StepTraces | None = None  # see enable_step_traces
        self.cuda_graphs = False  # replay decoding steps from CUDA graphs (see StepGraphs, GraphedCaches)
        self.packed_output_rows: dict[bool, Tensor] = {}  # is_image -> packed rows; see prepack_decoder
        # (Re)pack the decoder whenever .to() lands where packing is supported; None: where, moreover,
        # uio's CPU kernels do not serve the steps (see wants_packed_copies).
        self.keeps_packed: bool | None = False
        self.graphed_caches = GraphedCaches()  # decoder caches kept with their CUDA graphs
        # The weights (addresses, versions) the fused, packed, traced and compiled forms were made
        # from (see derive_again_if_replaced); None before any was made from loaded weights.
        self.derived_from: tuple[tuple[int, int], ...] | None = None

    def fuse_projections(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """Fuse each attention's q/k/v and each MLP's input projections into single matmuls.

        The modules then hold views of the fused matrices, so no memory is added. On a model
        still on ``meta``, the fused matrices are allocated on ``device`` in ``dtype``, empty, for
        :func:`uio.checkpoint.load_into` to fill; otherwise call it after the weights are placed.
        """
        self.step_traces = None  # traces would keep the replaced weights
        for module, decoder in self._fusing_modules():
            module.fuse(device, dtype, decoder)
        self._remember_weights()

    def derive_again_if_replaced(self) -> None:
        """Derive the fused matrices, packed copies, traces and compiled steps again where a weight
        of the encoder, decoder or embedding changed since they were made: replaced by
        ``load_state_dict(assign=True)``, by assigning a ``weight`` or its ``.data``, or by converting
        a submodule on its own (``model.decoder.to(...)``), or updated in place by torch's operations
        (``load_state_dict``, ``weight.copy_(...)``: their version counters move). The fused matrices
        would go on computing with replaced weights, packed copies with updated ones too. The
        model's own ``.to()`` derives them at once (see ``_apply``); encoding, teacher-forced
        decoding, each generation and each scoring check here first. (Updates through ``.data``
        move no counter: traces and fused matrices read them in place, packed copies miss them.)"""
        if self.derived_from is not None:
            changed = self._weight_state() != self.derived_from
        else:  # fused on the meta device, nothing made from the loaded weights yet but the fused matrices
            changed = any(module.fusion_is_stale() for module, _ in self._fusing_modules())
        if changed:
            with torch.inference_mode(False):  # generations run in inference mode; the new weights must not
                self._derive_again()

    def _weight_state(self) -> tuple[tuple[int, int], ...]:
        parts = (self.token_embedder, self.encoder, self.decoder)
        return tuple(tensor_state(p) for part in parts for p in part.parameters())

    def _remember_weights(self) -> None:
        """Note the weights the derived forms are made from now (not while any is still on meta)."""
        state = self._weight_state()
        self.derived_from = None if any(address == 0 for address, _ in state) else state

    def layer_kernel_runs_steps(self, dtype: torch.dtype, rows: int) -> bool:
        """Whether uio's CPU kernel would run the decoder layers of eager steps of ``rows`` rows of this
        model in ``dtype``, with caches in ``dtype`` (asked of :func:`cpu_kernels.serves_decoder_layer`
        on empty stand-ins for a step's tensors)."""
        weights = self.decoder.layers[0].kernel_weights()
        if self.compiled_step is not None or weights is None:
            return False
        cfg, device = self.cfg, weights[1].device
        x = torch.empty(rows, 1, cfg.emb_dim, dtype=dtype, device=device)
        cache = torch.empty(rows, cfg.num_heads, 1, cfg.head_dim, dtype=dtype, device=device)
        return cpu_kernels.serves_decoder_layer(x, weights, [cache] * 4)

    def _transformer_modules(self) -> Iterator[tuple[nn.Module, bool]]:
        """Each encoder and decoder module, with whether it is the decoder's (see :func:`stores_transposed`)."""
        for part in (self.encoder, self.decoder):
            for module in part.modules():
                yield module, part is self.decoder

    def _fusing_modules(self) -> Iterator[tuple[Attention | MlpBlock, bool]]:
        """Each module with projections to fuse, with whether it is the decoder's."""
        for layer in self.encoder.layers:
            yield from ((layer.attention, False), (layer.mlp, False))
        for layer in self.decoder.layers:
            yield from ((layer.self_attention, True), (layer.encoder_decoder_attention, True), (layer.mlp, True))

    def output_rows(self, is_image: bool) -> slice:
        """The embedding rows a decoding step scores: image ids or text ids."""
        return slice(self.cfg.vocab_size, None) if is_image else slice(0, self.cfg.vocab_size)

    def prepack_decoder(self) -> None:
        """Keep oneDNN-packed copies of every weight a decoding step multiplies by (the decoder's
        projections, the output embedding's text and image rows), for an extra copy of those
        weights in memory: on the CPU a step is then ~1.4x faster in bf16 and ~1.25x in fp32 (see
        :func:`linear`). Call after :meth:`fuse_projections`; only eager steps use them (compiled
        graphs pack their own)."""
        self.keeps_packed = True
        pack = WeightPacker()
        for layer in self.decoder.layers:
            layer.self_attention.prepack("qkv", pack)
            layer.encoder_decoder_attention.prepack("q", pack)
            layer.mlp.prepack(pack)
        table = self.token_embedder.weight
        self.packed_output_rows = {image: pack(table[self.output_rows(image)]) for image in (False, True)}
        self._remember_weights()

    def drop_packed(self) -> None:
        """Free the copies made by :meth:`prepack_decoder` (conversions no longer make them again)."""
        self.keeps_packed = False
        self.packed_output_rows = {}
        for module in self.modules():
            if isinstance(module, HoldsPackedCopies):
                module.packed = {}

    def step_weights(self) -> list[Tensor]:
        """Every weight tensor a decoding step reads (the fused matrices too)."""
        fused = [m.fused_qkv if isinstance(m, Attention) else m.fused_wi for m in self.decoder.modules()
                 if isinstance(m, (Attention, MlpBlock))]
        return [self.token_embedder.weight, *self.decoder.parameters(), *(t for t in fused if t is not None)]

    def packed_weights(self) -> list[Tensor]:
        """Every copy made by :meth:`prepack_decoder`, in a fixed order (empty without them)."""
        if not self.packed_output_rows:  # none made (asked every step: walking the layers takes ~60 us)
            return []
        modules = [m for layer in self.decoder.layers for m in (layer.self_attention, layer.encoder_decoder_attention,
                                                                layer.mlp)]
        return [w for m in modules for w in m.packed.values()] + list(self.packed_output_rows.values())

    def __getstate__(self) -> dict:
        # Packed copies (opaque tensors), traces and compiled steps cannot be copied or pickled:
        # copies (copy.deepcopy, pickle, torch.save) derive them again from their own weights.
        return {**super().__getstate__(), "packed_output_rows": {}, "compiled_step": self.compiled_step is not None}

    def __setstate__(self, state: dict) -> None:
        compiled = state.pop("compiled_step", False)
        super().__setstate__({**state, "compiled_step": None})
        self._derive_again()
        if compiled:
            self.enable_compile()

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda()... convert each parameter on its own: the modules' weights stop
        # being views of the fused matrices, and the packed copies and traced or compiled steps
        # keep the old weights. Derive them again from the converted weights.
        before = [p.data_ptr() for p in self.parameters()]
        super()._apply(fn, recurse)
        if [p.data_ptr() for p in self.parameters()] != before:
            self._derive_again()
        return self

    def _derive_again(self) -> None:
        """Re-fuse, re-lay out (see :func:`stores_transposed`), re-pack, re-trace and recompile
        whatever the model had, from its current weights (packing and traces on the CPU only, CUDA
        graphs on a GPU only)."""
        fused = self.decoder.layers[0].mlp.fused_wi is not None
        packed = self.keeps_packed  # also through a dtype or device without packing (bf16 here, CUDA)
        recorded = self.step_traces is not None or self.cuda_graphs
        self.drop_packed()
        self.graphed_caches.clear()  # on the old device or dtype
        for module, decoder in self._transformer_modules():
            weight = module.weight if isinstance(module, nn.Linear) else None
            if weight is not None and not weight.is_meta and not in_stored_layout(weight, decoder):
                relaid = cpu_kernels.copy(empty_weight(*weight.shape, weight.device, weight.dtype, decoder), weight)
                module.weight = nn.Parameter(relaid, requires_grad=weight.requires_grad)
        if fused:  # after laying out: the fused weights' rows are views, which laying out would copy
            self.fuse_projections()
        weight = self.token_embedder.weight
        on_cpu = weight.device.type == "cpu"
        if wants_packed_copies(packed, weight.dtype, weight.device):
            self.prepack_decoder()
        self.keeps_packed = packed
        # As the runner builds models: traced steps on the CPU, CUDA graphs on a GPU.
        self.step_traces = StepTraces() if recorded and on_cpu else None
        self.cuda_graphs = recorded and weight.device.type == "cuda"
        if self.compiled_step is not None:
            self.enable_compile()
        self._remember_weights()

    def enable_compile(self) -> None:
        """Use ``torch.compile`` for the encoder and for the decoder step, whose shapes are fixed
        for a whole generation: one graph per batch size and output length (and prompt length for
        the encoder, which is why the runner then pads prompts to a fixed length), compiled on
        first use (tens of seconds on a CPU), then replayed. Weights are frozen into the graphs
        (inductor's ``freezing``), which lets the CPU backend prepack them."""
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        self.drop_packed()  # graphs pack their own weights; eager packed copies would only cost memory
        self.step_traces = None
        inductor_config.freezing = True
        # Each batch size and output length is its own graph; keep them all rather than 8.
        # (torch before 2.7 names the limit cache_size_limit.)
        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
        self.encoder.compile(dynamic=False)
        self.compiled_step = torch.compile(_decode_step, dynamic=False)
        self._remember_weights()

    def enable_step_traces(self) -> None:
        """Run eager decoding steps from TorchScript traces from now on (see :class:`StepTraces`):
        bit-identical logits, CPU steps ~18% faster in fp32 and ~25% in bf16. Call once the weights
        are final (loaded, fused, on their device) and frozen (``requires_grad_(False)``: a trace
        holds them as constants); traces read them in place, so later in-place updates are seen."""
        if not StepTraces.available:
            raise RuntimeError("step traces need torch.jit.trace, which torch does not support from Python 3.14 on")
        trainable = next((name for name, p in self.named_parameters() if p.requires_grad), None)
        if trainable is not None:
            raise ValueError(f"step traces need frozen weights, but {trainable} requires grad: call "
                             "model.requires_grad_(False) first")
        self.step_traces = StepTraces()
        self._remember_weights()

    def encode(self, tokens: Tensor, images: Tensor, text_mask: Tensor | None = None,
               image_mask: Tensor | None = None, skip_padding: bool = False) -> EncoderOutput:
        """Encode a batch: tokens (B, T), images (B, H, W, 3) normalized, masks default to all valid.

        With ``skip_padding``, positions masked in every example (prompt padding, the patches of
        padding around a non-square image) are not computed and are left out of the output. The
        decoder's valid positions never attend to them, so generated tokens, scores and the losses
        of answer options are the same as without, up to float rounding, at less work (a 4:3 image
        pads a quarter of its patches). Without it, every position is computed, padded ones as the
        reference computes them (their values are meaningless but deterministic)."""
        self.derive_again_if_replaced()
        if text_mask is None:
            text_mask = tokens > 0
        if image_mask is None:
            p = self.cfg.image_patch_size
            image_mask = torch.ones(images.shape[0], (images.shape[1] // p) * (images.shape[2] // p),
                                    dtype=torch.int32, device=images.device)
        return self.encoder(tokens, self.token_embedder, images, text_mask, image_mask, skip_padding)

    def decode(self, enc: EncoderOutput, text_inputs: Tensor, image_inputs: Tensor, text_mask: Tensor,
               image_mask: Tensor) -> Tensor:
        """Teacher-forced decoder pass over whole sequences -> masked logits (N, T+I, vocab), float32.

        ``enc`` holds B examples and the decoder inputs N = n * B rows, n consecutive ones per
        example (its answer options, say), which share that example's cross-attention keys and values.
        """
        t = text_inputs.shape[1]
        logits = logits_from_hidden(self.decode_hidden(enc, text_inputs, image_inputs, text_mask, image_mask),
                                    self.token_embedder)
        is_image_step = torch.arange(logits.shape[1], device=logits.device)[:, None] >= t
        is_image_id = torch.arange(logits.shape[-1], device=logits.device)[None, :] >= self.cfg.vocab_size
        return logits.masked_fill(is_image_step != is_image_id, MASK_VALUE)

    def decode_hidden(self, enc: EncoderOutput, text_inputs: Tensor, image_inputs: Tensor, text_mask: Tensor,
                      image_mask: Tensor, cross_kv: list | None = None) -> Tensor:
        """:meth:`decode`'s final hidden states (N, T+I, D), before the output embedding.

        ``cross_kv``: ``self.decoder.cross_kv(enc.hidden)``, for passes sharing one encoding (whose
        caller checks :meth:`derive_again_if_replaced` once for all of them)."""
        if cross_kv is None:
            self.derive_again_if_replaced()
        dec = self.decoder
        rows_per_example, remainder = divmod(text_inputs.shape[0], enc.mask.shape[0])
        if remainder or not rows_per_example:
            raise ValueError(f"got {text_inputs.shape[0]} rows of decoder inputs for {enc.mask.shape[0]} encoded "
                             "examples: each example needs the same number of rows")
        t, i = text_inputs.shape[1], image_inputs.shape[1]
        device = text_inputs.device
        tokens = torch.cat([text_inputs, image_inputs], dim=1)
        segments = torch.cat([torch.zeros(t, dtype=torch.long, device=device),
                              torch.ones(i, dtype=torch.long, device=device)])
        y = dec.embed(tokens, self.token_embedder, dec.position_ids(t, i, device), segments)
        valid = torch.cat([text_mask.int(), image_mask.int()], dim=1)
        causal = torch.ones(t + i, t + i, dtype=torch.bool, device=device).tril()
        self_bias = masked(dec.self_bias(t, i, device)[None], causal & pair_valid(valid, valid))
        key_valid = enc.mask.repeat_interleave(rows_per_example, dim=0)
        cross_bias = cross_attention_bias(valid, key_valid, y.dtype)
        return dec.run_layers(y, self_bias, dec.cross_kv(enc.hidden) if cross_kv is None else cross_kv, cross_bias)


def step_attention_dtype(model: "UnifiedIO", hidden: Tensor, rows: int) -> torch.dtype:
    """The dtype of the attention state (caches, biases) of decoding steps of ``rows`` rows for a
    model computing in ``hidden``'s dtype: the model's dtype, but float32 for half precision on the
    CPU, whose attention kernel computes in float32 anyway but for one query row runs 2-4x slower on
    half-precision keys and values than on float32 ones. Where uio's CPU kernel runs the steps' bf16
    layers, bf16: it reads those keys and values (bf16 values either way) at half the bytes."""
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    if not half or hidden.device.type != "cpu" or model.layer_kernel_runs_steps(hidden.dtype, rows):
        return hidden.dtype
    return torch.float32


class DecoderCache:
    """Preallocated state for incremental decoding of ``N`` sequences of ``T`` text + ``I`` image steps,
    ``rows_per_example`` consecutive ones per encoded example (its beams or samples). With
    ``model.cuda_graphs``, its steps replay CUDA graphs (:class:`StepGraphs`) recorded on its tensors,
    which therefore keep their addresses for its whole life (:meth:`reorder` and :meth:`refill` work
    in place; :class:`GraphedCaches` keeps such caches for later generations of the same shapes).

    Holds each layer's self-attention keys/values, the cross-attention keys/values projected once,
    the position-bias table for the whole output (those three in :func:`step_attention_dtype`),
    and which cached keys are still attendable (the reference masks a sequence's keys from the
    step whose input follows an EOS onwards). Every step sees tensors of the same shapes (keys not
    yet written are masked), so a step can be compiled once and replayed.
    """

    def __init__(self, model: "UnifiedIO", enc: EncoderOutput, text_length: int, image_length: int,
                 rows_per_example: int = 1):
        cfg, dec = model.cfg, model.decoder
        n, device = enc.hidden.shape[0] * rows_per_example, enc.hidden.device
        self.attention_dtype = dtype = step_attention_dtype(model, enc.hidden, n)
        self.text_length, self.image_length, self.length = text_length, image_length, text_length + image_length
        shape = (n, cfg.num_heads, self.length, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in dec.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in dec.layers]
        self.key_valid = torch.zeros(n, self.length, dtype=torch.bool, device=device)
        self.cross_kv, self.cross_bias, self.self_bias = self._encoding_state(model, enc)
        self.positions = dec.position_ids(text_length, image_length, device)
        self.step_index = torch.arange(self.length, device=device)
        self.graphs = StepGraphs() if model.cuda_graphs else None
        self.pool_key: tuple | None = None  # the shapes and weights it is kept for (see GraphedCaches)

    def _encoding_state(self, model: "UnifiedIO", enc: EncoderOutput) -> tuple[list, Tensor, Tensor]:
        """(cross-attention keys/values, cross-attention bias, self-attention bias) for ``enc``."""
        dtype, device = self.attention_dtype, enc.hidden.device
        # One per example, shared by its rows; a wider dtype holds the values exactly.
        cross_kv = [[t.to(dtype) for t in kv] for kv in model.decoder.cross_kv(enc.hidden)]
        cross_bias = cross_attention_bias(torch.ones_like(enc.mask[:, :1]), enc.mask, dtype)
        return cross_kv, cross_bias, model.decoder.self_bias(self.text_length, self.image_length, device).to(dtype)

    def nbytes(self) -> int:
        """Memory held by the cache's tensors."""
        tensors = [*self.keys, *self.values, self.key_valid, *(t for kv in self.cross_kv for t in kv),
                   self.cross_bias, self.self_bias, self.positions, self.step_index]
        return sum(t.numel() * t.element_size() for t in tensors)

    def refill(self, model: "UnifiedIO", enc: EncoderOutput) -> None:
        """Start a new generation for ``enc`` (of the shapes this cache was made for) in place:
        recorded graphs read these tensors where they are. Keys left from the last generation
        stay masked until overwritten (a masked logit is -1e10 whatever the key)."""
        cross_kv, cross_bias, self_bias = self._encoding_state(model, enc)
        for old, new in zip([t for kv in self.cross_kv for t in kv], [t for kv in cross_kv for t in kv]):
            old.copy_(new)
        self.cross_bias.copy_(cross_bias)
        self.self_bias.copy_(self_bias)
        self.key_valid.zero_()
        if self.graphs is not None:  # a generation of these shapes again: worth recording any step kind
            self.graphs.min_steps = 1

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search); cross-attention state is shared by an example's beams."""
        if self.graphs is not None:  # graphs read these tensors where they are
            for t in [*self.keys, *self.values, self.key_valid]:
                t.copy_(t.index_select(0, index))
            return
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, index)


class GraphedCaches:
    """Decoder caches whose steps are recorded as CUDA graphs, kept from one generation to the next
    of the same shapes (batch, rows per example, encoder length, output lengths, dtype), which then
    replays them from its first step instead of recording its own (recording costs about two
    eager steps, each ~10 times a replay). The most recently used are kept, at most
    ``MAX_IDLE_GRAPHED_CACHES`` of them and ``MAX_IDLE_GRAPHED_BYTES`` of their tensors together; a
    call that finds the cache of its shapes in use by another thread makes its own.
    Graphs read the weights where they are: caches are kept per set of weight tensors (replacing a
    weight starts new ones), and in-place updates of the weights are seen."""

    def __init__(self):
        self._idle: OrderedDict[tuple, DecoderCache] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self):  # graphs cannot be copied: copies start without them
        return GraphedCaches, ()

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, model: "UnifiedIO", enc: EncoderOutput, text_length: int, image_length: int,
             rows_per_example: int = 1) -> DecoderCache:
        """A cache for this generation: a kept one of its shapes (refilled for ``enc``), or a new one."""
        model.derive_again_if_replaced()
        if not model.cuda_graphs:
            return DecoderCache(model, enc, text_length, image_length, rows_per_example)
        key = (tuple(enc.hidden.shape), enc.hidden.dtype, enc.hidden.device, text_length, image_length,
               rows_per_example, model.compiled_step, *(t.data_ptr() for t in model.step_weights()))
        with self._lock:
            cache = self._idle.pop(key, None)
        if cache is None:
            cache = DecoderCache(model, enc, text_length, image_length, rows_per_example)
        else:
            cache.refill(model, enc)
        cache.pool_key = key
        return cache

    def put_back(self, cache: DecoderCache) -> None:
        """Keep ``cache`` (from :meth:`take`) for the next generation of its shapes, if it has graphs."""
        if cache.graphs is None or not cache.graphs.graphs:
            return
        with self._lock:
            self._idle[cache.pool_key] = cache
            self._idle.move_to_end(cache.pool_key)
            while len(self._idle) > MAX_IDLE_GRAPHED_CACHES or self.nbytes() > MAX_IDLE_GRAPHED_BYTES:
                self._idle.popitem(last=False)

    def nbytes(self) -> int:
        """Memory held by the kept caches' tensors."""
        return sum(cache.nbytes() for cache in self._idle.values())

    def clear(self) -> None:
        """Free every kept cache and its graphs."""
        with self._lock:
            self._idle.clear()


def decode_step(model: "UnifiedIO", cache: DecoderCache, tokens: Tensor, step: int, valid: Tensor) -> Tensor:
    """Run one decoder step for ``tokens`` (N,) at output position ``step``.

    ``valid`` (N,) says whether this step's key stays attendable. Returns float32 logits over
    the vocabulary part allowed at this step (text ids before ``text_length``, image ids from
    it on, offset by ``vocab_size``): the other part is masked to -1e10 by the reference anyway.
    """
    is_image = step >= cache.text_length
    inputs = (cache.keys, cache.values, cache.key_valid, cache.cross_kv, cache.cross_bias, cache.self_bias,
              cache.positions, cache.step_index[step:step + 1], tokens, valid)
    steps_left = (cache.length if is_image else cache.text_length) - step  # of this kind, this one included
    if cache.graphs is not None and not torch.is_grad_enabled():
        return cache.graphs.run(model, inputs, is_image, steps_left)
    if model.compiled_step is not None:
        return model.compiled_step(model, *inputs, is_image)
    if model.step_traces is not None and not torch.is_grad_enabled():
        return model.step_traces.run(model, inputs, is_image, steps_left)
    return _decode_step(model, *inputs, is_image)


def _decode_step(model: "UnifiedIO", keys: list[Tensor], values: list[Tensor], key_valid: Tensor, cross_kv: list,
                 cross_bias: Tensor, self_bias: Tensor, positions: Tensor, index: Tensor, tokens: Tensor,
                 valid: Tensor, is_image: bool) -> Tensor:
    """:func:`decode_step` on tensors of fixed shapes (``index`` is the 1-element step tensor).

    Its Python code (and that of the layers it runs) may branch on ``is_image``, the number of rows,
    the number of examples they belong to and whether packed weights exist only: :class:`StepTraces`
    replays one trace for other shapes.
    """
    dec = model.decoder
    segment = torch.full((1,), int(is_image), dtype=torch.long, device=tokens.device)
    y = dec.embed(tokens[:, None], model.token_embedder, positions.index_select(0, index), segment)
    key_valid.index_copy_(1, index, valid[:, None])
    attendable = key_valid & (torch.arange(key_valid.shape[1], device=index.device) <= index)
    bias = masked(self_bias.index_select(1, index)[None], attendable[:, None, None, :])
    caches = [(k, v, index) for k, v in zip(keys, values)]
    hidden = dec.run_layers(y, bias, cross_kv, cross_bias, caches)[:, 0]
    return logits_from_hidden(hidden, model.token_embedder, model.output_rows(is_image),
                              model.packed_output_rows.get(is_image))


class StepTraces:
    """TorchScript traces of :func:`_decode_step`, replayed in place of running it from Python.

    Eager PyTorch returns to Python between a step's ~600 small operations (~75 for ``small`` where
    uio's CPU kernel runs each fp32 layer in one call); a trace runs the same kernels on the same
    tensors from TorchScript's C++ interpreter, so logits and caches are bit-identical and a CPU
    step without that kernel is ~18% (fp32) to ~25% (bf16) faster. Tracing records the
    operations of one real step (~50-80 ms instead of ~8), whose result that step returns. A trace
    reads the weights in place, as constants (packed copies, which cannot be constants, as
    inputs), and keeps the choices the step's Python code made; those depend only on the step
    kind, the number of rows decoded, of examples they belong to, and whether packed copies exist,
    so there is one trace per (step kind, rows, examples, output length, dtypes of the weights and
    of the caches, device, packed), shared by every prompt length.
    """

    # torch warns that from Python 3.14 on torch.jit.trace "is not supported ... and may break".
    available = sys.version_info < (3, 14)

    def __init__(self):
        self.traces: dict[tuple, Callable] = {}
        self.failed = False  # tracing raised once: run every step eagerly from then on
        # One tracing at a time: threads decoding at once would trace the same step twice, and
        # the warning filters tracing sets (process-wide) would be restored out of order.
        self._tracing = threading.Lock()

    def __reduce__(self):  # traces cannot be copied: copies start without them
        return StepTraces, ()

    def run(self, model: "UnifiedIO", inputs: tuple, is_image: bool, steps_left: int) -> Tensor:
        """``_decode_step(model, *inputs, is_image)``, replayed from a trace; made into one unless
        fewer than ``MIN_TRACED_STEPS`` steps of its kind are left (a VQA call's one image step)."""
        packed = model.packed_weights()
        keys, cross_keys, tokens = inputs[0][0], inputs[3][0][0], inputs[-2]
        key = (is_image, tokens.shape[0], cross_keys.shape[0], keys.shape[2], model.token_embedder.weight.dtype,
               keys.dtype, keys.device, bool(packed))
        args = inputs + (packed,) if packed else inputs  # the tracer refuses an empty list
        trace = self.traces.get(key)
        if trace is None and (steps_left < MIN_TRACED_STEPS or self.failed):
            return _decode_step(model, *inputs, is_image)
        if trace is None:
            with self._tracing:
                trace = self.traces.get(key)
                if trace is None:
                    return self._trace(model, key, args, len(inputs), is_image)
        # Unoptimised execution runs the recorded graph as is (the same kernels, no fusion), and
        # skips the optimising executor's first-run passes (~30 ms) at no cost per step.
        with torch.jit.optimized_execution(False):
            return trace(*args)

    def _trace(self, model: "UnifiedIO", key: tuple, args: tuple, num_inputs: int, is_image: bool) -> Tensor:
        outputs = []

        def step(*tensors):
            # Arguments past the step's inputs (the packed copies) are there for the tracer to
            # see those tensors as inputs.
            outputs.append(_decode_step(model, *tensors[:num_inputs], is_image))
            return outputs[-1]

        try:
            # Unoptimised, the scripted packed matmul runs at once instead of first being
            # optimised for each of its shapes (~30 ms of a bf16 trace's ~100).
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                # torch.jit.trace warns that it is deprecated, and about the shape-dependent
                # branches it fixes, which the trace's key covers.
                warnings.simplefilter("ignore")
                # Not check_trace: checking reruns the step, which writes the caches a second time.
                trace = torch.jit.trace(step, args, check_trace=False)
        except Exception as error:  # an optional speed-up: never fail a call for it
            log.warning("tracing a decoding step failed (%s: %s); steps run eagerly from now on",
                        type(error).__name__, error)
            self.failed = True
            # The step writes the same cache entries again, with the same values.
            return _decode_step(model, *args[:num_inputs], is_image)
        if len(self.traces) >= MAX_STEP_TRACES:
            del self.traces[next(iter(self.traces))]
        self.traces[key] = trace
        return outputs[0]


def record_cuda_graph(run: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
    """Record ``run()``'s kernels as a CUDA graph: returns (replay, the tensor each replay writes
    ``run``'s result into). ``run`` is called once before recording, on a side stream, so that
    lazy initialisations (library handles, kernel choices) happen outside the recording."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph.replay, output


class StepGraphs:
    """CUDA graphs of :func:`_decode_step` (or of the model's compiled step) for one
    :class:`DecoderCache`, replayed in place of running it.

    On a GPU, a step of ``small`` is 160-210 kernels (fewer, fused, when compiled) that each take
    less time to run than to launch from Python (an eager step took 4-7 ms on an H200 machine, a
    replay 0.5-0.6 ms); a graph launches them all at once. A graph
    replays the recorded kernels on the recorded tensors: the cache's (which keep their addresses)
    and buffers for the inputs that change from step to step (step index, tokens, key validity),
    copied in before each replay. The step's Python code may branch only on what
    :class:`StepTraces` keys on, which is fixed for a cache but for the step kind: one graph per
    step kind, recorded on its first step when at least ``min_steps`` steps of that kind are left
    (any step once the cache is reused, see :class:`GraphedCaches`). If recording fails, steps run
    eagerly and ``model.cuda_graphs`` is turned off.
    """

    record = staticmethod(record_cuda_graph)  # tests substitute a CPU stand-in

    def __init__(self):
        self.graphs: dict[bool, tuple[tuple[Tensor, ...], Callable[[], None], Tensor]] = {}
        self.min_steps = MIN_GRAPHED_STEPS  # 1 once the graphs are reused (GraphedCaches): record any step

    def run(self, model: "UnifiedIO", inputs: tuple, is_image: bool, steps_left: int) -> Tensor:
        """``_decode_step(model, *inputs, is_image)``, replayed from a graph (recorded first if need be)."""
        step = model.compiled_step or _decode_step
        graph = self.graphs.get(is_image)
        if graph is None and steps_left >= self.min_steps and model.cuda_graphs:
            graph = self._record(step, model, inputs, is_image)
        if graph is None:
            return step(model, *inputs, is_image)
        buffers, replay, output = graph
        for buffer, value in zip(buffers, inputs[-3:]):  # the step index, tokens and validity
            buffer.copy_(value)
        replay()
        return output.clone()  # the next replay overwrites it

    def _record(self, step: Callable[..., Tensor], model: "UnifiedIO", inputs: tuple, is_image: bool) -> tuple | None:
        """Record ``step`` as a graph and keep it; None (and ``model.cuda_graphs`` off) if that fails."""
        buffers = tuple(t.clone() for t in inputs[-3:])
        args = inputs[:-3] + buffers
        try:
            # Recording runs the step (once, before it records): it writes this step's cache
            # entries, which the replay then writes again with the same values.
            replay, output = self.record(lambda: step(model, *args, is_image))
        except Exception as error:  # an optional speed-up: never fail a call for it
            log.warning("recording a decoding step as a CUDA graph failed (%s: %s); steps run eagerly from now on",
                        type(error).__name__, error)
            model.cuda_graphs = False
            return None
        self.graphs[is_image] = (buffers, replay, output)
        return self.graphs[is_image]
