"""Time VQGAN.decode_codes (256 codes -> 256x256 image) on random weights of the released size.

    python benchmarks/bench_vqgan.py [--batch 1 8] [--dtype fp32 bf16] [--runs 5] [--threads N]
                                     [--module path/to/vqgan.py] [--accel on|off]

Weights are N(0, 0.02) (the default VAEConfig), codes uniform at random. Prints one table: each
(dtype, batch) cell's median seconds over ``--runs`` runs after a warm-up, the throughput in GFLOP/s
counted on the reference algorithm's convolutions (nearest x2 upsample then 3x3 conv; the model
may do fewer), and for bf16 the PSNR of its output against the float32 output on the same codes
(peak = the float32 output's range, see :func:`psnr`). A last line gives the bf16 PSNR on the codes of
golden/test_image.png (encoded in float32). ``--module`` times another copy of vqgan.py (e.g. an
older revision) for before/after comparisons. ``--accel off`` times the seam's reference operations
(:mod:`uio.model.ops`) instead of :mod:`uio.accel.convolution`'s faster ones.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from uio.config import VAEConfig

TEST_IMAGE = Path(__file__).resolve().parents[2] / "shared/conformance/golden/test_image.png"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_vqgan_class(module: str | None):
    if module is None:
        from uio.model.vqgan import VQGAN
        return VQGAN
    spec = importlib.util.spec_from_file_location("bench_vqgan_module", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.VQGAN


def use_fast_convolution_ops() -> None:
    """The VQGAN's seam operations by :mod:`uio.accel.convolution`'s faster versions."""
    from uio.accel.convolution import FAST_OPS
    from uio.model import ops

    for name, function in FAST_OPS.items():
        ops.register(name, function)


def reference_conv_flops(model, codes: torch.Tensor) -> int:
    """Multiply-add FLOPs (x2) of decode_codes' convolutions as the reference computes them."""
    total = 0

    def conv_hook(mod, inp, out):
        nonlocal total
        k = mod.weight.shape[2] * mod.weight.shape[3]
        total += 2 * mod.weight.shape[0] * mod.weight.shape[1] * k * out.shape[0] * out.shape[2] * out.shape[3]

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and not name.endswith("upsample.conv"):
            handles.append(mod.register_forward_hook(conv_hook))
        if type(mod).__name__ == "Upsample":
            handles.append(mod.register_forward_hook(
                lambda m, i, o: conv_hook(m.conv, i, o)))  # 3x3 conv at the output size
        if type(mod).__name__ == "AttnBlock":
            def attn_hook(m, i, o):
                nonlocal total
                b, c, h, w = i[0].shape
                total += 2 * b * (h * w) ** 2 * c * 2  # q.k and attn.v
            handles.append(mod.register_forward_hook(attn_hook))
    with torch.no_grad():
        model.decode_codes(codes)
    for h in handles:
        h.remove()
    return total


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up (weight packing, allocator)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of ``out`` against ``ref`` with the peak taken as ref's range (max - min).

    Random N(0, 0.02) weights give outputs far smaller than the [-1, 1] image range, so a fixed
    peak of 2 would report meaninglessly high numbers; the range keeps it relative to the signal.
    """
    out, ref = out.float(), ref.float()
    mse = float((out - ref).square().mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def test_image_codes(model) -> torch.Tensor | None:
    if not TEST_IMAGE.exists():
        return None
    from PIL import Image

    from uio.processing import preprocess_target_image
    image, _ = preprocess_target_image(np.asarray(Image.open(TEST_IMAGE).convert("RGB")))
    with torch.no_grad():
        return model.encode_to_codes(torch.from_numpy(image)[None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--module", default=None, help="time the VQGAN of another vqgan.py file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accel", choices=["on", "off"], default="on",
                        help="the VQGAN's operations by uio.accel.convolution (on) or the reference (off)")
    args = parser.parse_args()
    if args.accel == "on":
        use_fast_convolution_ops()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = VAEConfig()
    torch.manual_seed(args.seed)
    base = load_vqgan_class(args.module)(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    models = {"fp32": base}
    for name in args.dtype:
        if name != "fp32":
            models[name] = copy.deepcopy(base).to(DTYPES[name])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"module {args.module or 'uio.model.vqgan'}, accel {args.accel}")
    print(f"{'dtype':>5} {'batch':>5} {'median s':>9} {'GFLOP/s':>8} {'PSNR vs fp32 (dB)':>18}")
    for batch in args.batch:
        codes = torch.randint(0, cfg.n_embed, (batch, (cfg.resolution // 16) ** 2))
        flops = reference_conv_flops(base, codes)
        with torch.no_grad():
            ref = base.decode_codes(codes) if len(args.dtype) > 1 or "fp32" not in args.dtype else None
            for name in args.dtype:
                model = models[name]
                seconds = median_seconds(lambda: model.decode_codes(codes), args.runs)
                quality = "" if name == "fp32" or ref is None else f"{psnr(model.decode_codes(codes), ref):.2f}"
                print(f"{name:>5} {batch:>5} {seconds:>9.3f} {flops / seconds / 1e9:>8.0f} {quality:>18}",
                      flush=True)
    image_codes = test_image_codes(base)
    if image_codes is not None:
        with torch.no_grad():
            ref = base.decode_codes(image_codes)
            for name in args.dtype:
                if name != "fp32":
                    print(f"{name} PSNR vs fp32 on test_image.png codes: "
                          f"{psnr(models[name].decode_codes(image_codes), ref):.2f} dB")


if __name__ == "__main__":
    main()
