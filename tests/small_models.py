"""Small randomly initialised networks, their encodings and generations, for oracle-free tests of
decoding and of the acceleration layer (uio.accel)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from uio import accel, generate
from uio.accel import layout, steps, transformer_ops
from uio.accel.derived import FORMS
from uio.accel.steps import StepTraces
from uio.config import UnifiedIOConfig, VAEConfig
from uio.model.transformer import EncoderOutput, UnifiedIO

SMALL_CONFIG = UnifiedIOConfig(vocab_size=96, image_vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                              num_encoder_layers=2, num_decoder_layers=2)
SMALL_VAE_CONFIG = VAEConfig(embed_dim=32, n_embed=64, z_channels=32, ch=32, ch_mult=(1,), num_res_blocks=1,
                             attn_resolutions=())


def random_model(dtype: torch.dtype = torch.float32, packed: bool = False) -> UnifiedIO:
    """A small randomly initialised network on the CPU in ``dtype``. Where uio.accel is on, laid out
    and fused like a loaded one, with packed copies of its step weights where ``packed`` (and none
    made by its generations otherwise)."""
    torch.manual_seed(0)
    model = UnifiedIO(SMALL_CONFIG, SMALL_VAE_CONFIG).eval().requires_grad_(False)
    for table in (model.decoder.relpos_bias.rel_embedding, model.decoder.relpos_bias.image_rel_embedding):
        torch.nn.init.normal_(table)  # initialised to zeros: give the position biases a part
    model.to(dtype)
    if accel.enabled():
        layout.lay_out(model)
        accel.settings(model).prepack = packed
        if packed:
            transformer_ops.pack_step_weights(model)
    return model


def random_encoding(model: UnifiedIO, batch: int, prompt_length: int) -> EncoderOutput:
    """The encoding of ``batch`` random prompts of ``prompt_length`` tokens and random 32x32 images."""
    generator = torch.Generator().manual_seed(batch * 100 + prompt_length)
    tokens = torch.randint(2, model.cfg.vocab_size, (batch, prompt_length), generator=generator)
    images = torch.randn(batch, 32, 32, 3, generator=generator)
    weight = model.token_embedder.weight
    with torch.inference_mode():
        return model.encode(tokens.to(weight.device), images.to(weight.device, weight.dtype))


@contextlib.contextmanager
def on_one_thread() -> Iterator[None]:
    """Within it, torch on one thread; then as before. (These models are tiny: on a loaded machine,
    more threads only wait for each other.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def traces_of(model) -> StepTraces | None:
    """The step traces kept for ``model``'s current step weights, if any were made."""
    return FORMS.get("step traces", steps.step_weights(model), StepTraces, create=False)


def generations(model, traced: bool) -> list[torch.Tensor]:
    """Beam search (which reorders the caches), greedy search and sampling, text then image steps,
    for two prompt lengths and two batch sizes (so two examples' greedy rows and one example's two
    beams both decode two rows)."""
    accel.settings(model).step_traces = traced
    outputs = []
    for prompt_length in (5, 9):
        for batch in (1, 2):
            enc = random_encoding(model, batch, prompt_length)
            beams = generate.beam_search(model, enc, 8, 9, num_beams=2)
            greedy = generate.beam_search(model, enc, 8, 9, num_beams=1)
            generator = torch.Generator(enc.hidden.device).manual_seed(1)
            samples = generate.sample(model, enc, 8, 9, num_samples=2, generator=generator)
            outputs += [beams.tokens, beams.scores, greedy.tokens, greedy.scores, samples.tokens, samples.scores]
    return outputs


def assert_generations_equal(got: list, expected: list) -> None:
    """Bit-identical token ids and scores."""
    for tensor, reference in zip(got, expected, strict=True):
        assert torch.equal(tensor, reference)


def assert_generations_match(got: list, expected: list, tolerance: float) -> None:
    """Token ids equal, scores within ``tolerance`` (relative and absolute) of ``expected``'s."""
    for tensor, reference in zip(got, expected, strict=True):
        if tensor.dtype == torch.long:
            assert torch.equal(tensor, reference)
        else:
            torch.testing.assert_close(tensor.float(), reference, rtol=tolerance, atol=tolerance)
