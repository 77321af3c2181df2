"""Beam search, sampling and answer-option scoring against the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uio import generate

SCORE_ATOL = 1e-2  # sums of up to 257 log-probs (the golden README's hint)


def t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def encode(model, g, prefix):
    with torch.inference_mode():
        return model.encode(t(g[prefix + "text_encoder_inputs"]).long(), t(g[prefix + "image_encoder_inputs"]), None,
                            t(g[prefix + "image_input_masks"]))


@pytest.mark.parametrize("num_beams", [1, 4])
def test_text_beam_search(tiny_model, golden, num_beams):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "text/"), 32, 1, num_beams)
    np.testing.assert_array_equal(out.tokens.numpy(), g[f"text/nd{num_beams}/text_tokens"])
    np.testing.assert_allclose(out.scores.numpy(), g[f"text/nd{num_beams}/scores"], atol=SCORE_ATOL, rtol=0)
    assert (out.scores.diff(dim=1) >= 0).all(), "beams come back worst-first"


def test_image_beam_search(tiny_model, golden):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "image/"), 1, 256, 1)
    np.testing.assert_array_equal(out.tokens[..., :1].numpy(), g["image/text_tokens"])
    np.testing.assert_array_equal(out.tokens[..., 1:].numpy() - 33152, g["image/image_tokens"])
    np.testing.assert_allclose(out.scores.numpy(), g["image/scores"], atol=SCORE_ATOL, rtol=0)
    with torch.inference_mode():
        image = tiny_model.discrete_vae.decode_codes(out.tokens[:, 0, 1:] - 33152)
    np.testing.assert_allclose(((image + 1) / 2).clamp(0, 1).numpy(), g["image/image"][:, 0], atol=1e-4)


def test_sampling_is_reproducible_and_sorted(tiny_model, golden):
    g = golden("generation.npz")
    enc = encode(tiny_model, g, "text/")
    runs = [generate.sample(tiny_model, enc, 8, 1, 3, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].scores.diff(dim=1) >= 0).all()
    text, image = runs[0].tokens[..., :8], runs[0].tokens[..., 8:]
    assert (text < 33152).all() and (image >= 33152).all()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = generate._top_p_filter(logits, 0.7) > generate.BEAM_NEG_INF
    assert kept.tolist() == [[True, True, False, False]]
    kept = generate._top_p_filter(logits, 0.9) > generate.BEAM_NEG_INF
    assert kept.tolist() == [[True, True, True, False]]


def test_draw_follows_the_distribution_and_never_picks_filtered_ids():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = torch.log(probs).clamp(min=generate.BEAM_NEG_INF).expand(40000, 4)
    drawn = generate._draw(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4) / drawn.numel()
    np.testing.assert_allclose(frequencies.numpy(), probs.numpy(), atol=0.01)
    assert frequencies[3] == 0


def test_sorted_descending_matches_torch_sort():
    logits = torch.randn(3, 1000)
    assert torch.equal(generate._sorted_descending(logits), logits.sort(dim=-1, descending=True).values)


def test_sampling_with_tiny_top_p_is_greedy(tiny_model, golden):
    g = golden("generation.npz")
    enc = encode(tiny_model, g, "text/")
    sampled = generate.sample(tiny_model, enc, 32, 1, 1, top_p=1e-9)
    np.testing.assert_array_equal(sampled.tokens.numpy(), g["text/nd1/text_tokens"])


@pytest.mark.parametrize("average", [0, 1])
def test_text_answer_options(tiny_model, golden, average):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/")
    options = t(a["inputs/output_options"][0]).long()
    losses = generate.score_text_options(tiny_model, enc, options, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"text/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)
    best = losses.argmin(1)
    np.testing.assert_array_equal(options[best].numpy(), a[f"text/avg{average}/text_tokens"])


def test_text_answer_options_in_chunks(tiny_model, golden):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/")
    losses = generate.score_text_options(tiny_model, enc, t(a["inputs/output_options"][0]).long(), max_options=2)
    np.testing.assert_allclose(losses.numpy(), a["text/avg0_max_options2/all_scores"], atol=SCORE_ATOL, rtol=1e-4)


@pytest.mark.parametrize("average", [0, 1])
def test_image_answer_options(tiny_model, golden, average):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/")
    with torch.inference_mode():
        codes = tiny_model.discrete_vae.encode_to_codes(t(a["inputs/image_output_options"]))
    masks = t(a["inputs/image_output_options_masks"]).long()
    losses = generate.score_image_options(tiny_model, enc, codes, masks, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"image/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)
