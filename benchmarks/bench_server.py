"""Time ``uio serve`` on VQA at several concurrencies against direct ``run()`` calls of batch 1 and 8.

    python benchmarks/bench_server.py [--size small] [--concurrency 1 4 8 16] [--requests 4]
                                      [--max-batch 8] [--max-wait-ms 10] [--device cpu] [--dtype fp32]

Writes a random checkpoint of the real size (as ``bench.py`` does), times direct ``run()`` calls in
this process, then starts ``uio serve`` on a free loopback port and sends VQA requests (multipart,
the bundled demo picture) from N client threads at once, each sending ``--requests`` requests one
after another. Prints, per concurrency: throughput, p50/p95/p99 latency and the mean batch size
the server reported; and the direct calls' examples/s and seconds. Needs the serve extra and httpx.
"""
from __future__ import annotations

import argparse
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import tokenizer_source, write_random_checkpoint  # noqa: E402
from bench_vqgan import median_seconds  # noqa: E402

from uio.cli import demo_image  # noqa: E402
from uio.runner import ModelRunner  # noqa: E402
from uio.tasks import TASKS, build_prompt  # noqa: E402

QUESTIONS = ["what color is the sofa ?", "what is on the wall ?", "is there a lamp ?", "what is on the floor ?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_seconds(runner: ModelRunner, image: np.ndarray, batch: int, runs: int) -> float:
    """Median seconds of one VQA ``run()`` call on ``batch`` examples (after a warm-up call)."""
    task = TASKS["vqa"]
    prompts = [build_prompt(task, QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
    return median_seconds(lambda: runner.run([image] * batch, prompts, output_text_len=task.output_text_len), runs)


def start_server(args, weights: Path, tokenizer: Path, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "uio.cli", "serve", "--model", args.size, "--weights", str(weights),
            "--tokenizer", str(tokenizer), "--port", str(port), "--max-batch", str(args.max_batch),
            "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256", "--dtype", args.dtype]
    if args.device:
        argv += ["--device", args.device]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(1)
    process.kill()
    sys.exit("the server did not become ready")


def load(url: str, png: bytes, clients: int, per_client: int) -> dict:
    """``clients`` threads each sending ``per_client`` VQA requests in turn: throughput, latencies, batch sizes."""
    latencies, batch_sizes, failures = [], [], []

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                start = time.perf_counter()
                answer = http.post(f"{url}/v1/vqa", data={"question": QUESTIONS[(index + i) % len(QUESTIONS)]},
                                   files=[("image", ("demo.png", png, "image/png"))])
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    failures.append(answer.text[:200])
                else:
                    batch_sizes.append(answer.json()["batch_size"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95, 99])
    return {"clients": clients, "requests": len(latencies), "failures": len(failures),
            "per_s": len(latencies) / wall, "p50": q[0], "p95": q[1], "p99": q[2],
            "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="timed direct calls per batch size (default 3)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    image = demo_image()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        weights, tokenizer = write_random_checkpoint(args.size, Path(tmp)), tokenizer_source()
        runner = ModelRunner(args.size, weights, tokenizer=tokenizer, device=args.device, dtype=args.dtype,
                             log_inputs=False)
        direct = {batch: direct_seconds(runner, image, batch, args.runs) for batch in (1, 8)}
        del runner
        port = free_port()
        server = start_server(args, weights, tokenizer, port)
        try:
            url = f"http://127.0.0.1:{port}"
            load(url, buffer.getvalue(), 2, 1)  # warm-up
            rows = [load(url, buffer.getvalue(), clients, args.requests) for clients in args.concurrency]
        finally:
            server.terminate()
            server.wait(timeout=120)

    print(f"direct run(), VQA, {args.size} {args.dtype}: batch 1 {direct[1]:.3f} s ({1 / direct[1]:.2f} examples/s); "
          f"batch 8 {direct[8]:.3f} s ({8 / direct[8]:.2f} examples/s)")
    print(f"{'clients':>7} {'requests':>8} {'fail':>4} {'req/s':>7} {'vs b8':>6} {'p50 s':>7} {'p95 s':>7} "
          f"{'p99 s':>7} {'batch':>5}")
    for row in rows:
        print(f"{row['clients']:>7} {row['requests']:>8} {row['failures']:>4} {row['per_s']:>7.2f} "
              f"{row['per_s'] / (8 / direct[8]):>6.0%} {row['p50']:>7.3f} {row['p95']:>7.3f} {row['p99']:>7.3f} "
              f"{row['mean_batch']:>5.2f}")


if __name__ == "__main__":
    main()
