"""The public runner beyond the reference's cases (those are in tests/conformance/test_runner_tasks.py):
batching, seeds, precision, packing, conversions, concurrency, bad arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

IMAGE_ATOL = 1e-4
# Tests of the shared runner run on each device.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def make_runner(conformance, device="cpu", **kwargs):
    from uio.runner import ModelRunner

    return ModelRunner(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin",
                       tokenizer=conformance / "tokenizer" / "spiece.model", log_inputs=False, device=device, **kwargs)


@pytest.fixture(scope="module", params=DEVICES)
def runner(conformance, request):
    return make_runner(conformance, request.param)


def test_batched_run_equals_single_runs(runner, test_image):
    flipped = np.ascontiguousarray(test_image[::-1])
    prompts = ["what is in the image ?", "What does the image describe ?"]
    both = runner.run([test_image, flipped], prompts, output_text_len=8)
    for i, (image, prompt) in enumerate(zip([test_image, flipped], prompts)):
        single = runner.run([image], [prompt], output_text_len=8)
        np.testing.assert_array_equal(both["text_tokens"][i], single["text_tokens"][0])
        np.testing.assert_allclose(both["score"][i], single["score"][0], atol=1e-3)


def test_sampling_is_deterministic_per_seed(runner, test_image):
    first = runner.depth(test_image)
    second = runner.depth(test_image)
    np.testing.assert_array_equal(first["image"], second["image"])
    assert first["rescaled_image"].shape == test_image.shape


@pytest.mark.parametrize("bad_call, message", [
    (lambda r, im: r.run([im], ["a", "b"]), "1 input_images but 2 input_texts"),
    (lambda r, im: r.run([im], ["a"], output_text_len=200), "output_text_len"),
    (lambda r, im: r.run([im[..., :2]], ["a"]), r"input_images\[0\] must have shape \(height, width, 3\)"),
    (lambda r, im: r.run([im], ["a"], answer_options=["x"], num_decodes=2), "num_decodes"),
    (lambda r, im: r.segmentation_based_generation([], []), "1 to 16 masks"),
    (lambda r, im: r.segmentation_based_generation([np.ones((4, 4), bool)], ["a", "b"]), "1 binary_masks but 2 labels"),
    (lambda r, im: r.segmentation_based_generation([np.ones((4, 4), bool), np.ones((4, 5), bool)], ["a", "b"]),
     "same height and width"),
    (lambda r, im: r.run([], []), "at least one prompt"),
    (lambda r, im: r.run([im], ["a"], num_decodes=0), "num_decodes must be at least 1"),
    (lambda r, im: r.run([im], ["a"], mask_regions=[None, None]), "mask_regions must hold one box .* per image"),
])
def test_bad_input_raises_clear_errors(runner, test_image, bad_call, message):
    with pytest.raises(ValueError, match=message):
        bad_call(runner, test_image)


def test_models_replay_recorded_steps(runner):
    """Decoding steps replay traces on the CPU, CUDA graphs on a GPU."""
    from uio.accel import settings, steps

    chosen = settings(runner.model)
    if runner.device.type == "cuda":
        assert chosen.cuda_graphs and not chosen.step_traces
    else:
        assert not chosen.cuda_graphs and chosen.step_traces == steps.StepTraces.available


def test_compiled_runner_matches_eager(conformance, runner, test_image):
    """``compiled=True`` pads prompts to a fixed length and replays compiled graphs: same answer."""
    compiled = make_runner(conformance, runner.device, compiled=True)
    assert compiled.pad_to_max
    for _ in range(2):  # compile, then replay
        out = compiled.run([test_image], ["what is on the left ?"], output_text_len=6)
    ref = runner.run([test_image], ["what is on the left ?"], output_text_len=6)
    np.testing.assert_array_equal(out["text_tokens"], ref["text_tokens"])
    np.testing.assert_allclose(out["score"], ref["score"], atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_runner_runs_every_output_kind(conformance, test_image, device):
    """bf16 weights (the VQGAN's where the device has bf16 kernels): outputs have the documented
    types and ranges."""
    from uio.accel.hardware import computes_natively

    bf16 = make_runner(conformance, device, dtype="bf16")
    assert bf16.model.token_embedder.weight.dtype == torch.bfloat16
    vqgan_dtype = torch.bfloat16 if computes_natively(torch.bfloat16, torch.device(device)) else torch.float32
    assert bf16.model.discrete_vae.quantize.weight.dtype == vqgan_dtype
    depth = bf16.depth(test_image, beam_search=True)
    assert depth["image"].dtype == np.float32 and 0 <= depth["image"].min() <= depth["image"].max() <= 1
    assert depth["rescaled_image"].shape == test_image.shape
    assert isinstance(bf16.caption(test_image)["text"], str)
    scores = bf16.run([test_image], ["what ?"], output_text_len=1, generate_image=True,
                      answer_options=[test_image, test_image[::2]])["all_scores"]
    assert scores.shape == (1, 1, 2) and np.isfinite(scores).all()


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_bf16_vqgan_only_where_the_cpu_has_bf16_kernels(conformance, monkeypatch, caplog, bf16_kernels):
    """Emulated bf16 convolutions are ~8x slower than fp32 ones: without bf16 kernels the VQGAN
    stays fp32 and the user is told why bf16 is slow here."""
    from uio import runner as runner_module

    monkeypatch.setattr(runner_module, "computes_natively", lambda dtype, device: bf16_kernels)
    with caplog.at_level("WARNING", logger="uio.runner"):
        model = make_runner(conformance, dtype="bf16").model
    assert model.discrete_vae.quantize.weight.dtype == (torch.bfloat16 if bf16_kernels else torch.float32)
    assert model.token_embedder.weight.dtype == torch.bfloat16
    assert ("no bf16 kernels" in caplog.text) != bf16_kernels


@pytest.mark.parametrize("dtype, rtol", [("fp32", 1e-5), ("bf16", 1e-3)])
def test_cpu_decoding_with_packed_weights_matches_plain(conformance, test_image, dtype, rtol, without_cpu_kernel):
    from uio.accel.packing import packed_matmul_supported
    from uio.accel.transformer_ops import drop_packed, packed_copies, step_weight_groups
    from uio.runner import resolve_dtype

    if not packed_matmul_supported(resolve_dtype(dtype)):
        pytest.skip(f"this CPU has no oneDNN packed matmul for {dtype}")
    runner = make_runner(conformance, dtype=dtype)
    assert len(packed_copies(runner.model)) == len(step_weight_groups(runner.model))  # every step weight, at load
    call = lambda: runner.run([test_image], ["what is on the left ?"], output_text_len=6, generate_image=True)  # noqa: E731
    packed = call()
    drop_packed(runner.model)
    plain = call()
    assert packed_copies(runner.model) == []
    np.testing.assert_array_equal(packed["text_tokens"], plain["text_tokens"])
    np.testing.assert_array_equal(packed["image_tokens"], plain["image_tokens"])
    np.testing.assert_allclose(packed["score"], plain["score"], rtol=rtol)
    assert packed_copies(make_runner(conformance, dtype=dtype, prepack=False).model) == []


def test_converted_models_keep_the_packing_asked_for(conformance):
    """``prepack`` holds through ``.to()``: a model is packed whenever it lands on a dtype and
    device packed there, even when loaded on one that is not; never with ``prepack=False``; by
    default where uio's CPU kernels do not serve that dtype's steps."""
    from uio.accel import cpu_kernels
    from uio.accel.packing import packed_matmul_supported
    from uio.accel.transformer_ops import packed_copies

    if not packed_matmul_supported(torch.float32):
        pytest.skip("this CPU has no oneDNN packed matmul for fp32")
    model = make_runner(conformance, dtype="fp16", prepack=True).model  # fp16 is never packed
    assert packed_copies(model) == [] and packed_copies(model.to(torch.float32))
    plain = make_runner(conformance, prepack=False).model
    assert packed_copies(plain.to(torch.float64).to(torch.float32)) == []
    by_default = make_runner(conformance, dtype="fp16").model.to(torch.float32)
    assert bool(packed_copies(by_default)) == (not cpu_kernels.in_use(torch.float32))


def test_a_converted_model_runs_with_inputs_in_its_dtype(conformance, runner, test_image):
    """``runner.model.to(...)`` after loading: the runner's inputs follow the model's dtype, and
    text, image tokens and score match the fp32 model's (float64 only rounds differently)."""
    wide = make_runner(conformance, runner.device)
    wide.model.to(torch.float64)
    assert wide.dtype == torch.float64 and wide.device == runner.device
    call = lambda r: r.run([test_image], ["what is on the left ?"], output_text_len=6, generate_image=True)  # noqa: E731
    got, expected = call(wide), call(runner)
    np.testing.assert_array_equal(got["text_tokens"], expected["text_tokens"])
    np.testing.assert_array_equal(got["image_tokens"], expected["image_tokens"])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5)
    np.testing.assert_allclose(got["image"], expected["image"], atol=IMAGE_ATOL)


def test_stop_at_eos_gives_the_same_text_in_fewer_steps(runner, test_image, monkeypatch):
    """With EOS forced at step 2, a VQA call stops after 3 of its 33 steps: same text, a score
    over those steps only; image outputs still decode every step."""
    from uio import generate
    from uio.model import ops

    steps_run, real_decoding = [], ops.decoding

    def decoding_ending_at_2(*args):
        decoding = real_decoding(*args)
        real_step = decoding.step

        def step_ending_at_2(tokens, step, valid):
            logits = real_step(tokens, step, valid)
            steps_run.append(step)
            if step == 2:
                logits[:, generate.EOS] = 1e4
            return logits

        decoding.step = step_ending_at_2
        return decoding

    monkeypatch.setattr(ops, "decoding", decoding_ending_at_2)
    vqa = lambda: runner.run([test_image], ["what is this ?"], output_text_len=32)  # noqa: E731
    full, full_depth = vqa(), runner.depth(test_image)
    assert len(steps_run) == 33 + 257
    steps_run.clear()
    monkeypatch.setattr(runner, "stop_at_eos", True)
    fast, fast_depth = vqa(), runner.depth(test_image)
    assert len(steps_run) == 3 + 257
    assert fast["text"] == full["text"] and fast["text_tokens"].shape == full["text_tokens"].shape
    assert (fast["score"] > full["score"]).all()  # the skipped steps' log-probabilities are negative
    np.testing.assert_array_equal(fast_depth["image"], full_depth["image"])


def test_bad_runner_arguments_are_refused_before_loading(conformance):
    bad = [({"device": "tpu9"}, "unknown device 'tpu9'"), ({"device": "cuda:99"}, "CUDA"),
           ({"dtype": torch.int8}, "floating-point"), ({"dtype": "int8"}, "unknown dtype"),
           ({"max_input_len": 0}, "at least 1"), ({"max_options": 0}, "at least 1")]
    if not torch.cuda.is_available():
        bad.append(({"device": "cuda"}, "needs CUDA, which is not available here"))
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            make_runner(conformance, **kwargs)


def test_concurrent_calls_give_what_calls_in_turn_give(conformance, test_image, recwarn):
    """One runner serving several threads at once, as a web server would, from its first calls
    (which make the shared step traces, one at a time, silently): each call returns what it
    returns alone."""
    from concurrent.futures import ThreadPoolExecutor

    runner = make_runner(conformance)
    questions = ["what is this ?", "what color is the sofa ?", "how many are there ?"] * 2
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda q: runner.vqa(test_image, q)["text"], questions))
        depths = list(pool.map(lambda _: runner.depth(test_image)["image"], range(2)))
    assert texts == [runner.vqa(test_image, q)["text"] for q in questions]
    for depth in depths:
        np.testing.assert_array_equal(depth, runner.depth(test_image)["image"])
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]


def test_calls_derive_nothing_again_until_a_weight_changes(conformance, test_image):
    """A loaded runner's fused matrices and traces serve call after call; loading other weights
    into it in place (``load_state_dict``) makes the next call derive them again, from those weights,
    outside inference mode (a later load could not write into inference tensors)."""
    from uio.accel.derived import FORMS
    from uio.accel.steps import StepTraces, step_weights
    from uio.accel.transformer_ops import fused

    runner = make_runner(conformance)
    model = runner.model
    mlp = model.decoder.layers[0].mlp
    fused_wi = lambda: fused([mlp.wi_0.weight, mlp.wi_1.weight])  # noqa: E731
    kept_traces = lambda: FORMS.get("step traces", step_weights(model), StepTraces, create=False)  # noqa: E731
    fused_before = fused_wi()
    first = runner.vqa(test_image, "what is this?")
    traces = kept_traces()
    assert runner.vqa(test_image, "what is this?")["score"] == first["score"]
    assert fused_wi() is fused_before and kept_traces() is traces
    model.load_state_dict({name: tensor * 1.1 for name, tensor in model.state_dict().items()})
    changed = runner.vqa(test_image, "what is this?")
    fused_again = fused_wi()
    assert fused_again is not fused_before and not fused_again.is_inference()
    assert (traces is None or kept_traces() is not traces) and changed["score"] != first["score"]
    model.load_state_dict({name: tensor / 1.1 for name, tensor in model.state_dict().items()})
    np.testing.assert_allclose(runner.vqa(test_image, "what is this?")["score"], first["score"], rtol=1e-4)
