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

:func:`load` compiles them with torch's C++ extension builder (a C++ compiler and ninja needed), once
per environment and source version, into a folder of ``$TORCH_EXTENSIONS_DIR`` (else
``~/.cache/torch_extensions``) named by a hash of what the build depends on (:func:`build_folder`).
A process that finds no build starts one in a detached background process and runs on torch's
kernels meanwhile; processes started after it use the kernels. ``load(wait=True)`` builds (or waits)
instead. A build holds an OS file lock, which a killed builder cannot leave held, and writes into a
temporary folder renamed when complete, so a build killed part-way leaves nothing to load; a failed
build is remembered (its log beside the folder) until the sources, compiler or torch change.
Without a compiler, or on CPUs without AVX2 and FMA, steps use torch's kernels. ``UIO_CPU_KERNEL=0``
in the environment skips them; ``uio.accel.cpu_kernels.enabled = False`` stops using them (steps
traced before keep what they traced). ``python -m uio.accel.cpu_kernels`` builds them (a deployment
step: a server then starts with them).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .hardware import cpu_has_bf16_kernels
from .policy import KERNEL_MAX_ROWS

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

NAME = "uio_cpu_kernels"
SOURCE_FOLDER = Path(__file__).with_name("csrc")
SOURCES = [str(SOURCE_FOLDER / name)
           for name in ("gemv.cpp", "decoder_step.cpp", "transpose.cpp", "group_norm.cpp", "cross_entropy.cpp")]
HEADER = str(SOURCE_FOLDER / "cpu_kernels.h")
MAX_ROWS = KERNEL_MAX_ROWS  # rows the kernels take (see uio.accel.policy)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp links the libgomp torch has loaded: one runtime
enabled = True  # False: use torch's kernels even where these are loaded (for comparisons)
_lock = threading.Lock()
_loaded = False
_failure: str | None = None
_building = False  # _failure is a background build: a later load(wait=True) waits for it


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernels, or None if it can (given a C++ compiler to build them)."""
    if os.environ.get("UIO_CPU_KERNEL", "1") == "0":
        return "UIO_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch: {torch.backends.cpu.get_cpu_capability()})"
    if fcntl is None:
        return f"no builds on {sys.platform}"
    return None


def failure() -> str | None:
    """Why :func:`load` could not build or load the kernels (None if it did, or was not called)."""
    return _failure


def load(wait: bool = False) -> bool:
    """Load the kernels; True where this process uses them. Where this environment has no build of
    the current sources yet, start one in a detached background process and return False: this
    process runs on torch's kernels, and processes started after the build use it. With ``wait``,
    build them here (or wait for the build in progress) first, as tests and benchmarks want.
    False, with a warning saying why, where they cannot be used. Safe to call from several
    threads; later calls return the first result (or, with ``wait``, wait for a background build)."""
    global _loaded, _failure, _building
    with _lock:
        if _loaded or (_failure is not None and not (wait and _building)):
            return _loaded
        _building = False
        _failure = unsupported_reason()
        if _failure is not None:
            log.info("uio's CPU kernels not used: %s", _failure)
            return False
        if _compiler() is None:
            _failure = f"no C++ compiler ({os.environ.get('CXX', 'c++')})"
            log.warning("uio's CPU kernels not used: %s; decoding runs on torch's kernels (UIO_CPU_KERNEL=0 "
                        "silences this)", _failure)
            return False
        folder = build_folder()
        if not wait and not _settled(folder):
            with _build_lock(folder, wait=False) as nobody_building:
                if nobody_building:
                    _start_background_build()
            _failure, _building = "being built in a background process", True
            log.warning("building uio's CPU kernels in the background (once per environment, into %s); "
                        "this process runs on torch's kernels, later ones on uio's", folder)
            return False
        _failure = _load_or_build(folder)
        _loaded = _failure is None
        return _loaded


def build_folder() -> Path:
    """The folder holding this environment's build of the current sources: in
    ``$TORCH_EXTENSIONS_DIR`` (else torch's default, ``~/.cache/torch_extensions``), named by a hash
    of the sources, flags, torch, Python, ``sys.prefix`` and the compiler (its path, size and time)."""
    compiler = _compiler()
    stat = os.stat(compiler) if compiler else None
    identity = [*(Path(source).read_bytes() for source in [*SOURCES, HEADER]), _FLAGS, torch.__version__,
                torch.version.git_version, sys.version, sys.prefix, compiler, stat and (stat.st_size, stat.st_mtime_ns),
                shutil.which("ninja")]
    digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache) / f"{NAME}-{digest}"


def _compiler() -> str | None:
    found = shutil.which(os.environ.get("CXX", "c++"))
    return os.path.realpath(found) if found else None


def _library(folder: Path) -> Path:
    return folder / f"{NAME}.so"


def _failure_log(folder: Path) -> Path:
    """Where a failed build of ``folder`` is remembered, with its compiler output."""
    return folder.with_name(folder.name + ".failed")


def _settled(folder: Path) -> bool:
    """Whether ``folder``'s build has ended: built, or failed and remembered."""
    return _library(folder).is_file() or _failure_log(folder).is_file()


@contextlib.contextmanager
def _build_lock(folder: Path, wait: bool = True) -> Iterator[bool]:
    """Hold ``folder``'s build lock (yields True), or yield False where another process holds it and not
    ``wait``. An OS file lock: the system releases it when its holder dies, however it dies."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)  # not inherited
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _load_or_build(folder: Path) -> str | None:
    """Load the build in ``folder``, first building it (or waiting for the process that builds it)
    where it is not there; why it could not, or None."""
    with _build_lock(folder):
        if _failure_log(folder).is_file():
            reason = _failure_log(folder).read_text().partition("\n")[0]
            log.warning("uio's CPU kernels failed to build here before (%s; log: %s, delete it to retry); "
                        "decoding runs on torch's kernels", reason, _failure_log(folder))
            return reason
        if _library(folder).is_file():
            try:
                torch.ops.load_library(str(_library(folder)))
            except (OSError, RuntimeError) as error:
                log.warning("could not load uio's CPU kernels (%s; delete %s to rebuild them); decoding runs on "
                            "torch's kernels", error, folder)
                return f"{type(error).__name__}: {error}"
            return None
        return _build(folder)


def _build(folder: Path) -> str | None:
    """Compile the kernels into a new folder beside ``folder``, renamed to it once complete (a build
    killed part-way leaves only a folder the next build deletes), holding its lock; torch's builder
    loads the library into this process. Why it failed (remembered beside ``folder``), or None."""
    from torch.utils.cpp_extension import load as torch_build

    log.warning("compiling uio's CPU kernels (once per environment; UIO_CPU_KERNEL=0 skips them)")
    for unfinished in folder.parent.glob(f"{folder.name}.part-*"):
        shutil.rmtree(unfinished, ignore_errors=True)
    part = folder.with_name(f"{folder.name}.part-{os.getpid()}")
    try:
        part.mkdir()
        torch_build(NAME, sources=SOURCES, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(part),
                    is_python_module=False)
        shutil.rmtree(folder, ignore_errors=True)
        part.rename(folder)
    except Exception as error:  # an optional speed-up: never fail a load for it
        last_line = (str(error).strip().splitlines() or [""])[-1]  # build errors end with the cause
        reason = f"{type(error).__name__}: {last_line}"
        _failure_log(folder).write_text(f"{reason}\n\n{error}\n")
        log.warning("could not build uio's CPU kernels (%s; log: %s, delete it to retry); decoding runs on "
                    "torch's kernels", reason, _failure_log(folder))
        return reason
    return None


def _start_background_build() -> None:
    """Run :func:`_build_in_background` in a detached process: a session of its own, which a closed
    terminal or Ctrl-C does not stop, its output discarded (a failure is remembered in its log)."""
    subprocess.Popen([sys.executable, "-m", __name__, "--background"], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _lower_priority() -> None:
    """Give this process and the compilers it starts the CPU only when others leave it idle.

    Its session is a scheduling group of its own where Linux groups sessions (autogroups), and
    a process's nice value ranks it only within its group: the group's nice is lowered too.
    """
    os.nice(19)
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:  # not Linux, or autogroups off: the process's own nice is what counts
        pass


def _build_in_background() -> None:
    """Build this environment's kernels at low priority, unless built, failed or being built."""
    _lower_priority()  # the processes it builds for come first
    folder = build_folder()
    with _build_lock(folder, wait=False) as held:
        if held and not _settled(folder):
            _build(folder)


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


def main(argv: list[str]) -> None:
    """``python -m uio.accel.cpu_kernels``: build the kernels (or wait for the build in progress) and
    say whether this environment uses them; with ``--background``, what :func:`load` starts."""
    if argv == ["--background"]:
        return _build_in_background()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"uio's CPU kernels: loaded from {build_folder()}" if load(wait=True) else
          f"uio's CPU kernels: not used ({failure()})")


if __name__ == "__main__":
    main(sys.argv[1:])
