"""Faster decoding steps: TorchScript traces on the CPU, CUDA graphs on a GPU, ``torch.compile``,
and the attention state's dtype; the seam's ``decoding`` operation (:class:`AcceleratedDecoding`).

Each replays what :func:`uio.model.decoding.decode_step` computes, on the same tensors: logits and
caches are bit-identical to eager steps. Traces, graphed caches and compiled steps are forms
derived from the model's step weights (:data:`uio.accel.derived.FORMS`): replacing or updating a
weight in place makes them again.
"""
from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from ..model.decoding import DecoderCache, Decoding, decode_step
from ..model.transformer import EncoderOutput, UnifiedIO
from . import cpu_kernels, packing, transformer_ops
from .derived import FORMS
from .policy import (MAX_IDLE_GRAPHED_BYTES, MAX_IDLE_GRAPHED_CACHES, MAX_STEP_TRACES, MIN_GRAPHED_STEPS,
                     MIN_TRACED_STEPS, settings)

log = logging.getLogger(__name__)


def step_weights(model: UnifiedIO) -> list[Tensor]:
    """Every weight tensor a decoding step reads."""
    return [model.token_embedder.weight, *model.decoder.parameters()]


def layer_kernel_runs_steps(model: UnifiedIO, dtype: torch.dtype, rows: int) -> bool:
    """Whether uio's CPU kernel would run the decoder layers of eager steps of ``rows`` rows of
    ``model`` in ``dtype``, with caches in ``dtype`` (asked on empty stand-ins for a step's tensors)."""
    weights = transformer_ops.kernel_weights(model.decoder.layers[0])
    if settings(model).compiled or weights is None:
        return False
    cfg, device = model.cfg, weights[1].device
    x = torch.empty(rows, 1, cfg.emb_dim, dtype=dtype, device=device)
    cache = torch.empty(rows, cfg.num_heads, 1, cfg.head_dim, dtype=dtype, device=device)
    return cpu_kernels.serves_decoder_layer(x, weights, [cache] * 4)


def attention_dtype(model: UnifiedIO, hidden: Tensor, rows: int) -> torch.dtype:
    """The dtype of the attention state (caches, biases) of decoding steps of ``rows`` rows: the
    model's, but float32 for half precision on the CPU, whose attention kernel computes in float32
    anyway but runs slower on half-precision keys and values; bf16 where uio's CPU kernel runs the
    steps' bf16 layers (it reads those keys and values at half the bytes)."""
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    if not half or hidden.device.type != "cpu" or layer_kernel_runs_steps(model, hidden.dtype, rows):
        return hidden.dtype
    return torch.float32


class AcceleratedDecoding(Decoding):
    """A generation's steps replayed from CUDA graphs, a compiled step or traces, as the model's
    :class:`~uio.accel.policy.Settings` say, else eager; the packed step weights made first where wanted."""

    def __init__(self, model: UnifiedIO, enc: EncoderOutput, text_length: int, image_length: int,
                 rows_per_example: int = 1):
        self.model, self.settings = model, settings(model)
        weight, weights = model.token_embedder.weight, step_weights(model)
        on_cpu = weight.device.type == "cpu"
        wants_packed = packing.wants_packed_copies(self.settings.prepack, weight.dtype, weight.device)
        self.packed = transformer_ops.pack_step_weights(model) if wants_packed else []
        self.compiled = FORMS.get("compiled step", weights, _compiled_step) if self.settings.compiled else None
        # A trace holds the weights as constants, which cannot want gradients: those steps run eagerly.
        frozen = not any(w.requires_grad for w in weights)
        tracing = on_cpu and self.settings.step_traces and StepTraces.available and self.compiled is None and frozen
        self.traces = FORMS.get("step traces", weights, StepTraces) if tracing else None
        dtype = attention_dtype(model, enc.hidden, enc.hidden.shape[0] * rows_per_example)
        # Looked up once per generation, not at each eager step (the weights stay as they are meanwhile).
        self.kernel_weights = ({layer: transformer_ops.kernel_weights(layer) for layer in model.decoder.layers}
                               if on_cpu and cpu_kernels.in_use(weight.dtype) else {})
        self.pool = None
        if self.settings.cuda_graphs:  # on a GPU only: configure and conversions (converted) see to it
            self.pool = FORMS.get("graphed caches", weights, GraphedCaches)
            self.cache = self.pool.take(model, enc, text_length, image_length, rows_per_example, dtype)
        else:
            self.cache = DecoderCache(model, enc, text_length, image_length, rows_per_example, dtype)

    def step(self, tokens: Tensor, step: int, valid: Tensor) -> Tensor:
        transformer_ops.current_generation.kernel_weights = self.kernel_weights
        try:
            return self._step(tokens, step, valid)
        finally:
            transformer_ops.current_generation.kernel_weights = None

    def _step(self, tokens: Tensor, step: int, valid: Tensor) -> Tensor:
        cache, is_image = self.cache, step >= self.cache.text_length
        inputs = cache.step_inputs(step, tokens, valid)
        steps_left = (cache.length if is_image else cache.text_length) - step  # of this kind, this one included
        graphs = getattr(cache, "graphs", None)
        if graphs is not None and not torch.is_grad_enabled():
            return graphs.run(self.compiled or decode_step, self.model, inputs, is_image, steps_left)
        if self.compiled is not None:
            return self.compiled(self.model, *inputs, is_image)
        if self.traces is not None and not torch.is_grad_enabled():
            return self.traces.run(self.model, inputs, is_image, steps_left, self.packed)
        return decode_step(self.model, *inputs, is_image)

    def release(self) -> None:
        if self.pool is not None:
            self.pool.put_back(self.cache)


def _compiled_step() -> Callable:
    return torch.compile(decode_step, dynamic=False)


class StepTraces:
    """TorchScript traces of :func:`decode_step`, replayed in place of running it from Python.

    Eager PyTorch returns to Python between a step's hundreds of small operations; a trace runs the
    same kernels on the same tensors from TorchScript's C++ interpreter, so logits and caches are
    bit-identical. Tracing records the operations of one real step, whose result that step returns.
    A trace reads the weights in place, as constants (packed copies, which cannot be constants, as
    inputs), and keeps the choices the step's Python code made; those depend only on the step
    kind, the number of rows decoded, of examples they belong to, and whether packed copies exist,
    so there is one trace per (step kind, rows, examples, output length, dtypes, device, packed),
    shared by every prompt length.
    """

    # torch warns that from Python 3.14 on torch.jit.trace "is not supported ... and may break".
    available = sys.version_info < (3, 14)

    def __init__(self):
        self.traces: dict[tuple, Callable] = {}
        self.failed = False  # tracing raised once: run every step eagerly from then on
        # One tracing at a time: threads decoding at once would trace the same step twice, and
        # the warning filters tracing sets (process-wide) would be restored out of order.
        self._tracing = threading.Lock()

    def run(self, model: UnifiedIO, inputs: tuple, is_image: bool, steps_left: int, packed: list[Tensor]) -> Tensor:
        """``decode_step(model, *inputs, is_image)``, replayed from a trace; made into one unless
        fewer than ``MIN_TRACED_STEPS`` steps of its kind are left. ``packed``: the packed copies
        the step multiplies by (see :func:`uio.accel.transformer_ops.pack_step_weights`)."""
        keys, cross_keys, tokens = inputs[0][0], inputs[3][0][0], inputs[-2]
        key = (is_image, tokens.shape[0], cross_keys.shape[0], keys.shape[2], model.token_embedder.weight.dtype,
               keys.dtype, keys.device, bool(packed))
        args = inputs + (packed,) if packed else inputs  # the tracer refuses an empty list
        trace = self.traces.get(key)
        if trace is None and (steps_left < MIN_TRACED_STEPS or self.failed):
            return decode_step(model, *inputs, is_image)
        if trace is None:
            with self._tracing:
                trace = self.traces.get(key)
                if trace is None:
                    return self._trace(model, key, args, len(inputs), is_image)
        # Unoptimised execution runs the recorded graph as is (the same kernels, no fusion), and
        # skips the optimising executor's first-run passes at no cost per step.
        with torch.jit.optimized_execution(False):
            return trace(*args)

    def _trace(self, model: UnifiedIO, key: tuple, args: tuple, num_inputs: int, is_image: bool) -> Tensor:
        outputs = []

        def step(*tensors):
            # Arguments past the step's inputs (the packed copies) are there for the tracer to
            # see those tensors as inputs.
            outputs.append(decode_step(model, *tensors[:num_inputs], is_image))
            return outputs[-1]

        try:
            # Unoptimised, the scripted packed matmul runs at once instead of first being
            # optimised for each of its shapes.
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
            return decode_step(model, *args[:num_inputs], is_image)
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
    """CUDA graphs of a decoding step (eager or compiled) for one cache, replayed in place of running it.

    On a GPU a step is hundreds of kernels that each take less time to run than to launch from
    Python; a graph launches them all at once. A graph replays the recorded kernels on the recorded
    tensors: the cache's (which keep their addresses) and buffers for the inputs that change from
    step to step (step index, tokens, key validity), copied in before each replay. One graph per
    step kind, recorded on its first step when at least ``min_steps`` steps of that kind are left
    (any step once the cache is reused, see :class:`GraphedCaches`). If recording fails, steps run
    eagerly and the model's ``cuda_graphs`` setting is turned off.
    """

    record = staticmethod(record_cuda_graph)  # tests substitute a CPU stand-in

    def __init__(self):
        self.graphs: dict[bool, tuple[tuple[Tensor, ...], Callable[[], None], Tensor]] = {}
        self.min_steps = MIN_GRAPHED_STEPS  # 1 once the graphs are reused (GraphedCaches): record any step

    def run(self, step: Callable[..., Tensor], model: UnifiedIO, inputs: tuple, is_image: bool,
            steps_left: int) -> Tensor:
        """``step(model, *inputs, is_image)``, replayed from a graph (recorded first if need be)."""
        graph = self.graphs.get(is_image)
        if graph is None and steps_left >= self.min_steps and settings(model).cuda_graphs:
            graph = self._record(step, model, inputs, is_image)
        if graph is None:
            return step(model, *inputs, is_image)
        buffers, replay, output = graph
        for buffer, value in zip(buffers, inputs[-3:]):  # the step index, tokens and validity
            buffer.copy_(value)
        replay()
        return output.clone()  # the next replay overwrites it

    def _record(self, step: Callable[..., Tensor], model: UnifiedIO, inputs: tuple, is_image: bool) -> tuple | None:
        """Record ``step`` as a graph and keep it; None (and ``cuda_graphs`` off) if that fails."""
        buffers = tuple(t.clone() for t in inputs[-3:])
        args = inputs[:-3] + buffers
        try:
            # Recording runs the step (once, before it records): it writes this step's cache
            # entries, which the replay then writes again with the same values.
            replay, output = self.record(lambda: step(model, *args, is_image))
        except Exception as error:  # an optional speed-up: never fail a call for it
            log.warning("recording a decoding step as a CUDA graph failed (%s: %s); steps run eagerly from now on",
                        type(error).__name__, error)
            settings(model).cuda_graphs = False
            return None
        self.graphs[is_image] = (buffers, replay, output)
        return self.graphs[is_image]


class GraphedCaches:
    """Decoder caches whose steps are recorded as CUDA graphs, kept from one generation to the next
    of the same shapes (batch, rows per example, encoder length, output lengths, dtype), which then
    replays them from its first step instead of recording its own. The most recently used are
    kept, at most ``MAX_IDLE_GRAPHED_CACHES`` of them and ``MAX_IDLE_GRAPHED_BYTES`` of their
    tensors together; a call that finds the cache of its shapes in use by another thread makes its
    own. Graphs read the weights where they are: caches are kept per set of weights (a derived
    form of the step weights), and in-place updates of the weights are seen."""

    def __init__(self):
        self._idle: OrderedDict[tuple, DecoderCache] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, model: UnifiedIO, enc: EncoderOutput, text_length: int, image_length: int,
             rows_per_example: int, dtype: torch.dtype) -> DecoderCache:
        """A cache for this generation: a kept one of its shapes (refilled for ``enc``), or a new one."""
        key = (tuple(enc.hidden.shape), enc.hidden.dtype, enc.hidden.device, text_length, image_length,
               rows_per_example, dtype)
        with self._lock:
            cache = self._idle.pop(key, None)
        if cache is None:
            cache = DecoderCache(model, enc, text_length, image_length, rows_per_example, dtype, in_place=True)
            cache.graphs = StepGraphs()
        else:
            cache.refill(model, enc)
            cache.graphs.min_steps = 1  # a generation of these shapes again: worth recording any step kind
        cache.pool_key = key
        return cache

    def put_back(self, cache: DecoderCache) -> None:
        """Keep ``cache`` (from :meth:`take`) for the next generation of its shapes, if it has graphs."""
        if not cache.graphs.graphs:
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


def compile_model(model: UnifiedIO) -> None:
    """Run ``model``'s encoder and decoding steps through ``torch.compile`` from now on: one graph
    per batch size and output length (and prompt length for the encoder, which is why the runner
    then pads prompts to a fixed length), compiled on first use, then replayed. Weights are frozen
    into the graphs (inductor's ``freezing``), which lets the CPU backend prepack them."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    # Each batch size and output length is its own graph; keep them all rather than 8.
    # (torch before 2.7 names the limit cache_size_limit.)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    model.encoder.compile(dynamic=False)
    settings(model).compiled = True


def converted(model: UnifiedIO) -> None:
    """Lay the converted weights out again (:func:`uio.accel.transformer_ops.converted`); a model whose
    steps are traced or graphed then traces them on the CPU and graphs them on a GPU, as
    :func:`uio.accel.configure` decides at load."""
    transformer_ops.converted(model)
    chosen, device = settings(model), model.token_embedder.weight.device
    if chosen.step_traces or chosen.cuda_graphs:
        chosen.step_traces = device.type == "cpu" and StepTraces.available
        chosen.cuda_graphs = device.type == "cuda"


FAST_OPS = {"decoding": AcceleratedDecoding, "converted": converted}
