"""Throughput of ``uio batch`` against direct ``run()`` calls of batch 8, in the same process.

    python benchmarks/bench_batch.py [--size small] [--requests 200] [--runs 3] [--threads 2]

Writes a random checkpoint of the real size (as ``bench.py`` does) and ``--requests`` VQA requests
over a few different JPEG files, then alternates: ``run()`` on 8 copies of one image and question
(``--runs`` times after a warm-up), the whole batch job (reading the files, batching, writing the
results), and ``run()`` again, so that a change in the machine's load shows as a difference
between the two ``run()`` rates. Prints examples/s of each, by wall time and by the process's
CPU time (which other processes' load disturbs less), and the job's share of ``run()``'s rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import tokenizer_source, write_random_checkpoint  # noqa: E402

from uio import batch  # noqa: E402
from uio.runner import ModelRunner  # noqa: E402

QUESTION = "What color is the sofa?"
DISTINCT_IMAGES = 10
BATCH = 8


def write_requests(folder: Path, count: int) -> Path:
    """``count`` VQA requests over ``DISTINCT_IMAGES`` 640x480 JPEG files in ``folder``."""
    rng = np.random.default_rng(0)
    for i in range(DISTINCT_IMAGES):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.jpg", quality=90)
    lines = [{"id": f"q{i}", "task": "vqa", "image": f"image{i % DISTINCT_IMAGES}.jpg", "question": QUESTION}
             for i in range(count)]
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_rate(runner: ModelRunner, image: np.ndarray, runs: int) -> tuple[float, float]:
    """Examples per second of ``run()`` on a batch of 8, by wall time and by this process's CPU
    time (less sensitive to other processes' load): the medians of ``runs`` calls."""
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        runner.run([image] * BATCH, [QUESTION] * BATCH, output_text_len=32)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return BATCH / statistics.median(walls), BATCH / statistics.median(cpus)


def job_rate(runner: ModelRunner, requests: Path, output: Path) -> tuple[float, float, batch.Summary]:
    """Examples per second of a whole ``uio batch`` job (inputs read, batched, results written),
    by wall time and by CPU time."""
    options = batch.JobOptions(output, output.with_name("images"), batch_size=BATCH, quiet=True)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = batch.run_job(batch.read_jsonl(requests), options, batch.LocalExecutor(lambda: runner))
    return (summary.succeeded / (time.perf_counter() - wall), summary.succeeded / (time.process_time() - cpu),
            summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="run() calls timed before and after the job")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runner = ModelRunner(args.size, write_random_checkpoint(args.size, folder), tokenizer=tokenizer_source(),
                             device=args.device, log_inputs=False)
        requests = write_requests(folder, args.requests)
        image = np.array(Image.open(folder / "image0.jpg").convert("RGB"))
        run_rate(runner, image, 1)  # warm-up
        before = run_rate(runner, image, args.runs)
        *job, summary = job_rate(runner, requests, folder / "results.jsonl")
        after = run_rate(runner, image, args.runs)
    assert summary.succeeded == args.requests and summary.failed == 0, summary
    print(f"Unified-IO {args.size}, random weights, {args.device}, {args.threads} threads, torch {torch.__version__}")
    print("examples/s                     by wall time   by CPU time")
    for name, (wall, cpu) in ((f"run() batch {BATCH}, before", before), (f"uio batch, {args.requests} VQA", job),
                              (f"run() batch {BATCH}, after", after)):
        print(f"{name:<30} {wall:12.2f} {cpu:13.2f}")
    for i, what in enumerate(("wall", "CPU")):
        baseline = (before[i] + after[i]) / 2
        print(f"by {what} time: uio batch / run() (mean of before and after) {job[i] / baseline:.0%}; "
              f"run() before and after differ by {abs(before[i] - after[i]) / baseline:.0%}")


if __name__ == "__main__":
    main()
