"""How much bf16/fp16 changes the outputs: token agreement with the reference on the conformance
generation cases, and PSNR of the decoded images against the fp32 ones.

    python benchmarks/bf16_quality.py [--conformance ../shared/conformance]

On random tiny weights the logits have small margins, so this is a pessimistic bound: a trained
model's top tokens are usually far more separated.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from uio import generate
from uio.runner import build_model, resolve_dtype, to_unit_range

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "conformance"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def generate_case(model, g, prefix: str, text_length: int, image_length: int, dtype) -> generate.Generation:
    t = lambda k: torch.from_numpy(g[prefix + k])  # noqa: E731
    with torch.inference_mode():
        enc = model.encode(t("text_encoder_inputs").long(), t("image_encoder_inputs").to(dtype), None,
                           t("image_input_masks"))
    return generate.beam_search(model, enc, text_length, image_length, 1)


def teacher_forced_agreement(model, d, golden_dir: Path, dtype) -> float:
    """Share of teacher-forced image steps whose argmax equals the reference's (no drift)."""
    t = lambda k: torch.from_numpy(d[k])  # noqa: E731
    e = np.load(golden_dir / "encoder.npz")
    with torch.inference_mode():
        enc = model.encode(torch.from_numpy(e["text_encoder_inputs"]).long(),
                           torch.from_numpy(e["image_encoder_inputs"]).to(dtype), None,
                           torch.from_numpy(e["image_input_masks"]))
        logits = model.decode(enc, t("text_decoder_inputs").long(), t("image_decoder_inputs").long(),
                              t("text_decoder_targets") > 0, torch.ones(2, 256))
    steps = d["text_decoder_inputs"].shape[1]
    return float(np.mean(logits[:, steps:].argmax(-1).numpy() == d["image_logits_argmax"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conformance", type=Path, default=DEFAULT)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    args = parser.parse_args()
    g = dict(np.load(args.conformance / "golden" / "generation.npz"))
    config, weights = args.conformance / "tiny" / "config.json", args.conformance / "tiny" / "tiny.bin"
    d = dict(np.load(args.conformance / "golden" / "decode.npz"))
    print("| dtype | teacher-forced argmax = reference | generated text tokens = reference | "
          "generated image tokens = reference | image PSNR vs reference (dB) |")
    print("|---|---|---|---|---|")
    for name in ["fp32"] + args.dtypes:
        dtype = resolve_dtype(name)
        model = build_model(config, weights, dtype=dtype)
        text = generate_case(model, g, "text/", 32, 1, dtype).tokens.numpy()
        image = generate_case(model, g, "image/", 1, 256, dtype).tokens[..., 1:].numpy() - 33152
        with torch.inference_mode():
            pixels = to_unit_range(model.discrete_vae.decode_codes(torch.from_numpy(image[:, 0])))
        text_agree = float(np.mean(text == g["text/nd1/text_tokens"]))
        image_agree = float(np.mean(image == g["image/image_tokens"]))
        quality = psnr(pixels.numpy(), g["image/image"][:, 0])
        forced = teacher_forced_agreement(model, d, args.conformance / "golden", dtype)
        print(f"| {name} | {forced:.1%} | {text_agree:.1%} | {image_agree:.1%} | {quality:.1f} |")


if __name__ == "__main__":
    main()
