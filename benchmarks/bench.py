"""Time the runner on random weights of a real model size, against floors measured on this machine.

    python benchmarks/bench.py [--size small] [--modes fp32 bf16 fp32+compile bf16+compile] [--runs 5]
                               [--threads 2] [--batches 1 2 4 8] [--device cpu] [--no-load]
                               [--kernels on|off|both] [--load-only SIZE ...]

Writes a random checkpoint of the real size in the released ``.bin`` format (and its safetensors
conversion) to a temporary folder, then prints one table: each call's median seconds over
``--runs`` runs after a warm-up, the first (cold) call, the floor this hardware allows (from
matmul/conv throughput and weight-streaming bandwidth measured in the same run), the ratio to it
(and to the floor at the call's moment: the rates measured just before and after it), and the peak
resident memory during the call. ``--kernels off`` runs each mode without uio's CPU kernels
(``UIO_CPU_KERNEL=0``: torch's kernels, as on machines that cannot build them); ``--kernels both``
runs each mode both ways, one after the other, and ends with a table of the two times of each call and
their ratio (the floors of a run without the kernels leave their streaming rate out). With
``--device cuda`` the model and the
throughput measurements run on the GPU, and the memory column is the GPU's peak allocation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from uio import checkpoint, generate
from uio.accel import cpu_kernels, memory
from uio.config import CONFIGS, VAE_CONFIG
from uio.accel.hardware import computes_natively
from uio.accel.packing import onednn_linear, pack_weight, packed_matmul_supported, unpacked_linear
from uio.model.transformer import UnifiedIO
from uio.model.vqgan import Upsample, full_fp32_convolutions
from uio.processing import preprocess_image
from uio.runner import ModelRunner, resolve_dtype

PLAIN = "plain"  # the mode label's suffix for runs without uio's CPU kernels
OPTIONS = 200  # answer options of the classification call (labels of a few tokens each)
CONFORMANCE = Path(os.environ.get("UIO_CONFORMANCE", Path(__file__).resolve().parents[2] / "shared/conformance"))
CONFORMANCE_TOKENIZER = CONFORMANCE / "tokenizer/spiece.model"


# ---- memory -------------------------------------------------------------------------------------

def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ---- hardware throughput -----------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one ``fn()``, including the work it queued on ``device``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_time(fn, device: torch.device, repeats: int = 20) -> float:
    fn()
    return min(seconds(fn, device) for _ in range(repeats))


def measure_hardware(dtype: torch.dtype, device: torch.device) -> dict:
    """What the hardware allows for a ``dtype`` model: the best matmul and 3x3-conv FLOP/s and
    batch-1 matrix-vector weight-streaming bytes/s, over fp32 and ``dtype`` (where native)."""
    dtypes = [d for d in dict.fromkeys((torch.float32, dtype)) if computes_natively(d, device)]
    return {"matmul": max(matmul_rate(d, device) for d in dtypes),
            "conv": max(conv_rate(d, device) for d in dtypes),
            "bandwidth": max(streaming_bandwidth(d, device) for d in dtypes)}


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the faster of torch's matmul and (CPU) oneDNN's, which the model's fp32 matmuls use."""
    a, b = (torch.randn(shape, dtype=dtype, device=device) for shape in ((1024, 2048), (2048, 2048)))
    products = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and packed_matmul_supported(dtype):
        products.append(lambda: unpacked_linear(a, b.T))  # oneDNN (other dtypes: torch's matmul again)
    return 2 * 1024 * 2048 * 2048 / min(best_time(product, device) for product in products)


def conv_rate(dtype: torch.dtype, device: torch.device) -> float:
    x = torch.randn(1, 256, 64, 64, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, device=device).to(dtype).to(memory_format=torch.channels_last)
    with torch.inference_mode(), full_fp32_convolutions(x):  # as the VQGAN computes
        return 2 * 256 * 256 * 9 * 64 * 64 / best_time(lambda: conv(x), device)


def streaming_bandwidth(dtype: torch.dtype, device: torch.device) -> float:
    """Bytes/s at which the fastest batch-1 matrix-vector product here streams a large ``dtype``
    weight: what bounds a decoding step. The weight is row-major, column-major, (CPU)
    oneDNN-packed, as the model's steps pack theirs and for one row, and (CPU, fp32) multiplied by
    uio's kernel (:mod:`uio.accel.cpu_kernels`), where it is loaded. On the CPU it lies in huge
    pages where the system offers them, as the model's weights do (:mod:`uio.accel.memory`)."""
    row_major = memory.empty((16384, 4096), dtype, device).copy_(torch.randn(16384, 4096, device=device))
    column_major = memory.empty((4096, 16384), dtype, device).copy_(row_major.t()).t()
    v = torch.randn(1, 4096, device=device).to(dtype)
    products = [lambda: v @ row_major.t(), lambda: v @ column_major.t()]
    if cpu_kernels.serves(v, row_major):
        products += [lambda: cpu_kernels.gemv(v, row_major), lambda: cpu_kernels.gemv(v, column_major)]
    if device.type == "cpu" and packed_matmul_supported(dtype):
        # Blocked for one row, oneDNN streams this matrix ~1.5x faster than as the model's
        # steps pack their (narrower) ones, for up to 16 rows.
        for packed in (pack_weight(row_major), pack_weight(row_major, rows=1)):
            products.append(lambda packed=packed: onednn_linear(v, packed))
    bytes_read = row_major.numel() * row_major.element_size()
    return max(bytes_read / best_time(product, device) for product in products)


# ---- analytic work per call --------------------------------------------------------------------

def encoder_flops(cfg, text_tokens: int, image_patches: int, batch: int) -> float:
    """The encoder's matmuls over the valid positions (padded ones need not be computed), and the
    decoder's projection of its output into every layer's cross-attention keys and values (done
    once per call, before the first step)."""
    s, d, inner, m = text_tokens + image_patches, cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    per_layer = 2 * s * (4 * d * inner + 3 * d * m) + 4 * s * s * inner
    patches = 2 * image_patches * cfg.image_patch_size ** 2 * 3 * d
    return batch * (cfg.num_encoder_layers * per_layer + patches) + cross_kv_flops(cfg, s, batch)


def cross_kv_flops(cfg, encoder_length: int, batch: int) -> float:
    """Every decoder layer's projection of the encoder's output into cross-attention keys and
    values, which a generation makes once, before its first step."""
    return batch * cfg.num_decoder_layers * 2 * encoder_length * cfg.emb_dim * 2 * cfg.num_heads * cfg.head_dim


def option_flops(cfg, options: int, positions: int, encoder_length: int) -> float:
    """Teacher-forced decoding of ``options`` answer options of ``positions`` decoder positions
    each against one example: every layer's matmuls and attention, and the text logits the loss
    needs."""
    d, inner, m = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    per_layer = 2 * (6 * d * inner + 3 * d * m) + 4 * (positions + encoder_length) * inner
    logits = 2 * positions * d * cfg.vocab_size
    return options * (positions * cfg.num_decoder_layers * per_layer + logits)


def step_bytes(cfg, image_step: bool, element_size: int, encoder_length: int, batch: int) -> float:
    """Bytes one decoder step must read: the layers' weights (cross K/V are projected once), the
    output rows it scores, and each example's cached cross-attention keys and values (at batch 8
    these outweigh the weights). The self-attention cache (at most 257 keys) is left out."""
    d, inner, m = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    per_layer = 4 * d * inner + 2 * d * inner + 3 * d * m
    rows = cfg.image_vocab_size if image_step else cfg.vocab_size
    cross_cache = batch * 2 * encoder_length * inner
    return element_size * (cfg.num_decoder_layers * (per_layer + cross_cache) + rows * d)


def vqgan_flops(vqgan, device: torch.device) -> float:
    """FLOPs of the VQGAN decoder's convolutions as the accelerated operations run them: an
    upsampling conv as its four 2x2 phase convs on the low-resolution input (see
    :func:`uio.accel.convolution.upsample_conv2d`)."""
    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, Upsample):
            conv, (h, w) = module.conv, inputs[0].shape[-2:]
            total += 2 * conv.in_channels * 4 * conv.out_channels * 4 * (h + 1) * (w + 1)
        else:
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels * module.out_channels * k * output.shape[-1] * output.shape[-2]

    hooks = [m.register_forward_hook(count) for m in vqgan.decoder.modules()
             if isinstance(m, (torch.nn.Conv2d, Upsample))]  # an Upsample never calls its own conv module
    with torch.inference_mode():
        vqgan.decode_codes(torch.zeros(1, 256, dtype=torch.long, device=device))
    for hook in hooks:
        hook.remove()
    return total


# ---- setup -------------------------------------------------------------------------------------

class RandomLeaves(Mapping):
    """Every leaf of a ``size`` checkpoint (flax path -> float32 array drawn from N(0, 0.02)),
    each made when it is read, so that writing even ``xl`` holds one leaf at a time."""

    def __init__(self, size: str):
        with torch.device("meta"):
            self.spec = checkpoint.expected_params(UnifiedIO(CONFIGS[size], VAE_CONFIG))
        self.seeds = {path: seed for seed, path in enumerate(self.spec)}

    def __getitem__(self, path: str) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seeds[path])
        return torch.empty(self.spec[path][0]).normal_(0, 0.02, generator=generator).numpy()

    def __iter__(self):
        return iter(self.spec)

    def __len__(self) -> int:
        return len(self.spec)


def write_random_checkpoint(size: str, folder: Path) -> Path:
    out = folder / f"{size}.bin"
    checkpoint.write_bin(RandomLeaves(size), out)
    return out


def tokenizer_source() -> Path:
    from uio import hub

    try:
        return hub.tokenizer_path(download=False)
    except hub.DownloadError:
        if CONFORMANCE_TOKENIZER.is_file():
            return CONFORMANCE_TOKENIZER
        sys.exit("no tokenizer: run `uio download --tokenizer-only` or provide ../shared/conformance")


def make_runner(size: str, path: Path, tokenizer: Path, dtype: str, compiled: bool,
                device: str = "cpu") -> ModelRunner:
    return ModelRunner(size, path, tokenizer=tokenizer, dtype=dtype, device=device, log_inputs=False,
                       compiled=compiled)


def load_in_fresh_process(size: str, path: Path) -> tuple[float, float, float]:
    """(seconds, peak RSS GiB, GiB of packed weight copies) of ``build_model`` in a new
    interpreter, so no earlier load or import warms it up (the file itself is in the page cache,
    having just been written)."""
    code = (f"import time, bench; from uio.runner import build_model; from uio.accel.transformer_ops import packed_copies; t = time.perf_counter(); "
            f"m = build_model({size!r}, {str(path)!r}); print(time.perf_counter() - t, bench.peak_rss_gib(), "
            f"sum(w.numel() * w.element_size() for w in packed_copies(m)) / 2 ** 30)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def time_call(fn, runs: int, device: torch.device) -> tuple[float, float, float]:
    """(first-call seconds, median seconds over ``runs``, peak GiB: resident memory, or the GPU's
    allocations on CUDA)."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [seconds(fn, device) for _ in range(runs + 1)]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else peak_rss_gib()
    return times[0], statistics.median(times[1:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "fp32+compile", "bf16+compile"],
                        help="dtype, with +compile for ModelRunner(compiled=True); each mode runs in its own process")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model and the throughput measurements)")
    parser.add_argument("--no-load", action="store_true", help="skip timing checkpoint loads")
    parser.add_argument("--kernels", choices=["on", "off", "both"], default="on",
                        help="with uio's CPU kernels, without them (UIO_CPU_KERNEL=0), or each mode both ways")
    parser.add_argument("--load-only", nargs="+", metavar="SIZE", choices=list(CONFIGS),
                        help="only time loading random checkpoints of these sizes (peak RSS vs weight bytes)")
    parser.add_argument("--child", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # time one mode, print JSON rows
    args = parser.parse_args()
    if args.load_only:
        return print_load_table(args.load_only)
    torch.set_num_threads(args.threads)
    if args.child:
        return print(json.dumps(time_mode(args, args.modes[0], Path(args.child))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bin_path = write_random_checkpoint(args.size, Path(tmp))
        st_path = Path(tmp) / f"{args.size}.safetensors"
        checkpoint.write_safetensors(checkpoint.read_bin(bin_path), st_path)
        for path in () if args.no_load else (bin_path, st_path):
            seconds, peak, _ = load_in_fresh_process(args.size, path)
            rows.append((f"load {path.suffix}", 1, "fp32", seconds, seconds, float("nan"), float("nan"), peak))
        for mode in args.modes:  # a fresh process each: no mode inherits another's memory or compiled graphs
            command = [sys.executable, __file__, "--child", str(st_path), "--modes", mode, "--size", args.size,
                       "--runs", str(args.runs), "--threads", str(args.threads), "--device", args.device,
                       "--batches", *map(str, args.batches)]
            for kernels in (True, False) if args.kernels == "both" else (args.kernels == "on",):
                env = {**os.environ, **({} if kernels else {"UIO_CPU_KERNEL": "0"})}
                output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
                rows += [(name, batch, mode if kernels else f"{mode} {PLAIN}", *rest)
                         for name, batch, _, *rest in json.loads(output)]
    print_table(rows, args)
    if args.kernels == "both":
        print_kernel_comparison(rows)


def time_mode(args, mode: str, checkpoint_path: Path) -> list[tuple]:
    """Table rows for one mode: each call's first and median seconds, floor, floor at its moment
    and peak RSS.

    A floor is the call's work (matmul FLOPs, conv FLOPs, streamed bytes) at the best rates
    measured before the first call and after each: this machine's memory bandwidth and compute
    vary from moment to moment by up to ~1.5x. The floor at a call's moment takes the best of the
    rates measured just before and just after it instead."""
    cfg = CONFIGS[args.size]
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    dtype_name, compiled = mode.split("+")[0], mode.endswith("+compile")
    dtype, device = resolve_dtype(dtype_name), torch.device(args.device)
    if device.type == "cpu":
        cpu_kernels.load(wait=True)  # its streaming rate counts in the floors, also of modes that do not use it
    moments = [measure_hardware(dtype, device)]  # rates before the first call, then after each
    runner = make_runner(args.size, checkpoint_path, tokenizer_source(), dtype_name, compiled, args.device)
    question = "what color is the sofa ?"
    prompt_len = runner.tokenizer([question]).shape[1]
    esize = torch.finfo(dtype).bits // 8
    patches = int(preprocess_image(image)[1].sum())  # the rest pad the image to a square
    encoder_length = prompt_len + patches
    enc = np.array([encoder_flops(cfg, prompt_len, patches, 1), 0, 0])
    text_step, image_step = (np.array([0, 0, step_bytes(cfg, image, esize, encoder_length, 1)])
                             for image in (False, True))
    vq = np.array([0, vqgan_flops(runner.model.discrete_vae, device), 0])
    depth = enc + text_step + 256 * image_step + vq
    encoded = runner._encode([image], [question], None)
    labels = [f"object number {i}" for i in range(OPTIONS)]
    positions = runner.tokenizer(labels).shape[1] + 1  # start token, the labels' ids and EOS
    calls = {  # name: (batch, call, work as [matmul FLOPs, conv FLOPs, streamed bytes])
        "vqa": (1, lambda: runner.vqa(image, "What color is the sofa?"), enc + 32 * text_step + image_step),
        # VQA's 33 decoding steps alone (no encoder): the steps' time against their bandwidth floor,
        # and the cross-attention keys/values the generation projects before them.
        "vqa steps": (1, lambda: generate.beam_search(runner.model, encoded, 32, 1),
                      [cross_kv_flops(cfg, encoder_length, 1), 0, 0] + 32 * text_step + image_step),
        "depth (beam)": (1, lambda: runner.depth(image, beam_search=True), depth),
        "depth (sampling)": (1, lambda: runner.depth(image), depth),
        "vqgan decode": (1, lambda: runner._decode_images(torch.zeros(1, 256, dtype=torch.long, device=device)), vq),
        f"classify ({OPTIONS} options)": (1, lambda: runner.image_classification(image, answer_options=labels),
                                          enc + [option_flops(cfg, OPTIONS, positions, encoder_length), 0, 0]),
    }
    for batch in args.batches:
        run = lambda b=batch: runner.run([image] * b, [question] * b, output_text_len=32)  # noqa: E731
        steps = [step_bytes(cfg, image, esize, encoder_length, batch) for image in (False, True)]
        calls[f"vqa batch {batch}"] = (batch, run, [encoder_flops(cfg, prompt_len, patches, batch), 0,
                                                    32 * steps[0] + steps[1]])
    timings = {}
    for name, (_, fn, _) in calls.items():
        timings[name] = time_call(fn, args.runs, device)
        moments.append(measure_hardware(dtype, device))
    rates = best_rates(moments)
    print(f"# {mode}: matmul {rates['matmul'] / 1e9:.0f} GFLOP/s, conv {rates['conv'] / 1e9:.0f} GFLOP/s, "
          f"weight streaming {rates['bandwidth'] / 1e9:.1f} GB/s (best before/after the calls)", file=sys.stderr)
    rows = []
    for i, (name, (batch, _, work)) in enumerate(calls.items()):
        first, median, peak = timings[name]
        floor, floor_then = (seconds_at(work, r) for r in (rates, best_rates(moments[i:i + 2])))
        rows.append((row_label(name, batch, median), batch, mode, first, median, floor, floor_then, peak))
    return rows


def best_rates(moments: list[dict]) -> dict:
    return {key: max(m[key] for m in moments) for key in moments[0]}


def seconds_at(work, rates: dict) -> float:
    """Seconds for ``work`` ([matmul FLOPs, conv FLOPs, streamed bytes]) at ``rates``."""
    return float(np.dot(work, [1 / rates["matmul"], 1 / rates["conv"], 1 / rates["bandwidth"]]))


def row_label(name: str, batch: int, median: float) -> str:
    """A call's name in the table, with its throughput where that says more than its time."""
    if name.startswith("vqa batch"):
        return f"vqa batch ({batch / median:.2f} ex/s)"
    if name == "vqa steps":
        return f"vqa steps ({median / 33 * 1e3:.2f} ms/step)"
    return name


def print_load_table(sizes: list[str]) -> None:
    """Load time and peak RSS of each size's ``.bin`` in a fresh interpreter, against its weight
    bytes and the packed copies kept for decoding steps."""
    print("| size | fp32 weight GiB | packed copies GiB | load s | peak RSS GiB | peak - weights - copies GiB |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(size, Path(tmp))
            weights = path.stat().st_size / 2 ** 30
            seconds, peak, packed = load_in_fresh_process(size, path)
        print(f"| {size} | {weights:.2f} | {packed:.2f} | {seconds:.2f} | {peak:.2f} | {peak - weights - packed:.2f} |",
              flush=True)


def print_kernel_comparison(rows) -> None:
    """Each call's median seconds with uio's CPU kernels and without them (rows labelled ``PLAIN``)."""
    def call(name: str) -> str:  # without the throughput row_label adds
        return re.sub(r" \([0-9.]+ (ex/s|ms/step)\)$", "", name)

    medians = {(call(name), batch, mode): median for name, batch, mode, _, median, *_ in rows}
    print("\n| call | batch | mode | with kernels s | without s | without / with |")
    print("|---|---|---|---|---|---|")
    for name, batch, mode, _, median, *_ in rows:
        without = medians.get((call(name), batch, f"{mode} {PLAIN}"))
        if without is not None:
            print(f"| {call(name)} | {batch} | {mode} | {median:.3f} | {without:.3f} | {without / median:.2f} |")


def print_table(rows, args) -> None:
    cuda = torch.device(args.device).type == "cuda"
    where = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"CPU, {args.threads} threads"
    print(f"\nUnified-IO {args.size}, random weights, {where}, torch {torch.__version__}, "
          f"median of {args.runs} runs after one warm-up\n")
    print(f"| call | batch | mode | first s | median s | floor s | ratio | ratio at its moment | "
          f"peak {'GPU' if cuda else 'RSS'} GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, dtype, first, median, floor, floor_then, peak in rows:
        ratio, ratio_then = ("" if math.isnan(f) else f"{median / f:.2f}" for f in (floor, floor_then))
        floor_text = "" if math.isnan(floor) else f"{floor:.3f}"
        print(f"| {name} | {batch} | {dtype} | {first:.3f} | {median:.3f} | {floor_text} | {ratio} | {ratio_then} | "
              f"{peak:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
