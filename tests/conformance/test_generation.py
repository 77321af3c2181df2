"""Beam search, sampling and answer-option scoring against the reference, and generation options
on a small random network (with acceleration on and off)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from small_models import random_encoding, random_model

from uio import generate

SCORE_ATOL = 1e-2  # sums of up to 257 log-probs (the golden README's hint)


def t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def encode(model, g, prefix, skip_padding=False):
    with torch.inference_mode():
        return model.encode(t(g[prefix + "text_encoder_inputs"]).long(), t(g[prefix + "image_encoder_inputs"]), None,
                            t(g[prefix + "image_input_masks"]), skip_padding)


# The goldens' images pad 144 of 576 patches (and "image/" pads a prompt and masks a whole image):
# generation and scoring must match the reference with padded positions computed or skipped.


skip_padding = pytest.mark.parametrize("skip", [False, True], ids=["all_positions", "skip_padding"])


@skip_padding
@pytest.mark.parametrize("num_beams", [1, 4])
def test_text_beam_search(tiny_model, golden, num_beams, skip):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "text/", skip), 32, 1, num_beams)
    np.testing.assert_array_equal(out.tokens.numpy(), g[f"text/nd{num_beams}/text_tokens"])
    np.testing.assert_allclose(out.scores.numpy(), g[f"text/nd{num_beams}/scores"], atol=SCORE_ATOL, rtol=0)
    assert (out.scores.diff(dim=1) >= 0).all(), "beams come back worst-first"


@skip_padding
def test_image_beam_search(tiny_model, golden, skip):
    g = golden("generation.npz")
    out = generate.beam_search(tiny_model, encode(tiny_model, g, "image/", skip), 1, 256, 1)
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
    probs = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.2, 0.0])  # filtered ids first, between and last
    logits = torch.log(probs).clamp(min=generate.BEAM_NEG_INF).expand(40000, 6)
    drawn = generate._draw(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=6) / drawn.numel()
    np.testing.assert_allclose(frequencies.numpy(), probs.numpy(), atol=0.01)
    assert frequencies[[0, 3, 5]].sum() == 0
    rows = torch.randn(3, 50)
    assert torch.equal(generate._draw(generate._top_p_filter(rows, 1e-9), None), rows.argmax(dim=1))


def test_sorted_descending_matches_torch_sort():
    logits = torch.randn(3, 1000)
    assert torch.equal(generate._sorted_descending(logits), logits.sort(dim=-1, descending=True).values)


def test_top_matches_torch_topk_and_keeps_the_first_of_ties():
    values = torch.randn(3, 1000)
    for k in (1, 3):
        expected = values.topk(k, dim=1)
        got = generate._top(values, k)
        assert torch.equal(got[0], expected.values) and torch.equal(got[1], expected.indices)
    tied = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    top_values, top_index = generate._top(tied, 1)
    assert top_index.tolist() == [[1], [0]] and top_values.tolist() == [[2.0], [5.0]]


def test_sampling_with_tiny_top_p_is_greedy(tiny_model, golden):
    g = golden("generation.npz")
    enc = encode(tiny_model, g, "text/")
    sampled = generate.sample(tiny_model, enc, 32, 1, 1, top_p=1e-9)
    np.testing.assert_array_equal(sampled.tokens.numpy(), g["text/nd1/text_tokens"])


@skip_padding
@pytest.mark.parametrize("average", [0, 1])
def test_text_answer_options(tiny_model, golden, average, skip):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/", skip)
    options = t(a["inputs/output_options"][0]).long()
    losses = generate.score_text_options(tiny_model, enc, options, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"text/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)
    best = losses.argmin(1)
    np.testing.assert_array_equal(options[best].numpy(), a[f"text/avg{average}/text_tokens"])


def test_text_answer_options_in_chunks(tiny_model, golden, monkeypatch):
    """Two options per decoder pass, and the logits of one position at a time."""
    monkeypatch.setattr(generate, "LOGITS_CHUNK_ELEMS", 1)
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/")
    losses = generate.score_text_options(tiny_model, enc, t(a["inputs/output_options"][0]).long(), max_options=2)
    np.testing.assert_allclose(losses.numpy(), a["text/avg0_max_options2/all_scores"], atol=SCORE_ATOL, rtol=1e-4)


@skip_padding
@pytest.mark.parametrize("average", [0, 1])
def test_image_answer_options(tiny_model, golden, average, skip):
    a = golden("answer_options.npz")
    enc = encode(tiny_model, a, "inputs/", skip)
    with torch.inference_mode():
        codes = tiny_model.discrete_vae.encode_to_codes(t(a["inputs/image_output_options"]))
    masks = t(a["inputs/image_output_options_masks"]).long()
    losses = generate.score_image_options(tiny_model, enc, codes, masks, average_loss=bool(average))
    np.testing.assert_allclose(losses.numpy(), a[f"image/avg{average}/all_scores"], atol=SCORE_ATOL, rtol=1e-4)


# Oracle-free: the semantics of generation options on a small random network, on both paths.


@pytest.fixture(scope="module")
def small_model(accel_mode):
    """A small random network built on this module's path (laid out by uio.accel, or plain)."""
    return random_model()


def force_eos(monkeypatch, steps: list[int]) -> list[int]:
    """Make row ``r`` of every step's logits pick EOS at step ``steps[r]``; returns the list of
    steps run, which grows as decoding goes."""
    run, real_logits = [], generate._Decoder.logits

    def logits_forcing_eos(decoder, sequences, step):
        logits, offset = real_logits(decoder, sequences, step)
        run.append(step)
        for row, at in enumerate(steps):
            if step == at:
                logits[row, generate.EOS] = 1e4
        return logits, offset

    monkeypatch.setattr(generate._Decoder, "logits", logits_forcing_eos)
    return run


@pytest.mark.parametrize("decoding", ["greedy", "sampling"])
def test_stop_at_eos_skips_the_steps_after_every_sequence_ended(small_model, monkeypatch, decoding):
    """Row 0 ends at step 2, row 1 at step 4: decoding stops after step 4 (of 8 text steps and
    one image step), with the full run's tokens up to there, zeros after, and the scores of a
    run of those 5 steps only."""
    model = small_model
    enc = random_encoding(model, 2, 5)
    steps_run = force_eos(monkeypatch, [2, 4])

    def decode(text_length: int, image_length: int, **kwargs) -> generate.Generation:
        if decoding == "greedy":
            return generate.beam_search(model, enc, text_length, image_length, **kwargs)
        return generate.sample(model, enc, text_length, image_length, generator=torch.Generator().manual_seed(3),
                               **kwargs)

    full = decode(8, 1)
    assert steps_run == list(range(9))
    steps_run.clear()
    stopped = decode(8, 1, stop_at_eos=True)
    assert steps_run == list(range(5))
    assert stopped.tokens.shape == full.tokens.shape
    assert torch.equal(stopped.tokens[..., :5], full.tokens[..., :5]) and not stopped.tokens[..., 5:].any()
    assert (stopped.tokens[..., :5] == generate.EOS).any(-1).all()
    torch.testing.assert_close(stopped.scores, decode(5, 0).scores)


def test_stop_at_eos_stops_beam_search_once_every_beam_ended(small_model, monkeypatch):
    model = small_model
    steps_run = force_eos(monkeypatch, [5] * 4)  # 2 examples x 2 beams
    beams = generate.beam_search(model, random_encoding(model, 2, 5), 8, 1, num_beams=2, stop_at_eos=True)
    assert steps_run == list(range(6))
    assert (beams.tokens[..., :6] == generate.EOS).any(-1).all() and not beams.tokens[..., 6:].any()


@pytest.mark.parametrize("max_options", [1, 2, 800])
@pytest.mark.parametrize("average", [False, True])
def test_text_options_of_different_lengths_score_as_padded_ones(small_model, max_options, average):
    """Options decoded by length without their padding get the losses of the teacher-forced
    pass over all of them padded to the longest (positions past an option's own EOS masked)."""
    model = small_model
    enc = random_encoding(model, 2, 5)
    options = torch.tensor([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [8, 9, 10, 11, 1], [12, 1, 0, 0, 0], [13, 14, 1, 0, 0]])
    losses = generate.score_text_options(model, enc, options, max_options, average)
    inputs, targets, mask = (x.repeat(2, 1) for x in generate._text_option_batch(options))
    with torch.inference_mode():
        logits = model.decode(enc, inputs, inputs[:, :0], mask, inputs[:, :0])[..., :model.cfg.vocab_size]
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask
    expected = nll.sum(1) / mask.sum(1) if average else nll.sum(1)
    torch.testing.assert_close(losses, expected.view(2, 5), rtol=1e-5, atol=1e-5)
