"""Where a decoding step's time goes on a GPU: kernels per step, and a step's time replayed alone
against the same step inside beam search and sampling.

    python benchmarks/profile_step.py [--size small] [--dtypes fp32 bf16] [--compile] [--device cuda]

Random weights of the released size. For each dtype prints: the kernels one eager step launches
(count and GPU time, largest first), the time of one step run eagerly, of one CUDA-graph replay
alone (inputs copied in, logits copied out), and per step of whole text and image generations
(graphs on: the replays plus the generation loop's own work between them), with the kernels of
sampling's steps. ``--device cpu`` runs the same on the CPU (operators instead of kernels, traced
steps instead of graphs).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from uio import generate
from uio.config import CONFIGS
from uio.accel import settings
from uio.model import ops

import bench


def per_call(fn, repeats: int, device: torch.device) -> float:
    fn()
    bench.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    bench.synchronize(device)
    return (time.perf_counter() - start) / repeats


def kernel_table(fn, steps: int, device: torch.device, rows: int = 18) -> str:
    """The kernels ``fn`` (``steps`` decoding steps) launches, per step, most time first (on a
    CPU: every operator, nested ones too)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        bench.synchronize(device)

    def busy(event) -> float:
        return event.device_time_total if cuda else event.self_cpu_time_total

    kernels = sorted((e for e in prof.key_averages() if e.device_type.name == device.type.upper()), key=busy,
                     reverse=True)
    count, micros = (sum(f(e) for e in kernels) / steps for f in (lambda e: e.count, busy))
    lines = [f"  {count:.0f} kernels per step, {micros:.0f} us busy per step"]
    lines += [f"  {e.count / steps:6.1f} x {busy(e) / e.count:7.1f} us  {e.key[:110]}" for e in kernels[:rows]]
    return "\n".join(lines)


@torch.inference_mode()
def profile_dtype(args, dtype: str, checkpoint_path: Path) -> None:
    device = torch.device(args.device)
    runner = bench.make_runner(args.size, checkpoint_path, bench.tokenizer_source(), dtype, args.compile, args.device)
    model = runner.model
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    enc = runner._encode([image], ["what color is the sofa ?"], None)
    print(f"\n## {args.size} {dtype}{' compiled' if args.compile else ''}", flush=True)

    def steps(first: int, count: int):
        decoding = ops.decoding(model, enc, 32, 256, 1)  # graphed or not, as the model's settings say now
        tokens = torch.zeros(1, dtype=torch.long, device=device)
        valid = torch.ones(1, dtype=torch.bool, device=device)
        return lambda: [decoding.step(tokens, s, valid) for s in range(first, first + count)]

    graphs = settings(model).cuda_graphs
    settings(model).cuda_graphs = False
    eager = steps(32, 32)
    print("eager image steps:\n" + kernel_table(eager, 32, device))
    print(f"eager image step: {per_call(eager, 5, device) / 32 * 1e3:.3f} ms")
    settings(model).cuda_graphs = graphs
    replay = steps(32, 32)
    print(f"graph replay of an image step: {per_call(replay, 5, device) / 32 * 1e3:.3f} ms")
    print("graphed image steps:\n" + kernel_table(replay, 32, device, rows=6))
    sampling = lambda: generate.sample(model, enc, 1, 256)  # noqa: E731
    for name, call, count in [
        ("beam search, 32 text steps + 1 image step", lambda: generate.beam_search(model, enc, 32, 1), 33),
        ("beam search, 1 text step + 256 image steps", lambda: generate.beam_search(model, enc, 1, 256), 257),
        ("sampling, 1 text step + 256 image steps", sampling, 257),
    ]:
        print(f"{name}: {per_call(call, 3, device) / count * 1e3:.3f} ms per step", flush=True)
    print("sampling, per step, all kernels:\n" + kernel_table(sampling, 257, device, rows=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = bench.write_random_checkpoint(args.size, Path(tmp))
        for dtype in args.dtypes:
            profile_dtype(args, dtype, path)


if __name__ == "__main__":
    main()
