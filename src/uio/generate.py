"""Generation with the reference's semantics: beam search, top-p sampling, answer-option scoring.

The output sequence has ``text_length`` text steps then ``image_length`` image steps. Step 0's
input is BOS (0); at step ``text_length`` the input becomes ``vocab_size - 1`` whatever was
generated before; image ids are ``vocab_size + code``. EOS never ends a sequence (the reference's
end marker is 10,000,000, a token that never occurs): every sequence runs to full length and its
score sums every step's log-probability. Results come back worst-first, as the reference returns them.

``stop_at_eos=True`` departs from that to save time: decoding stops once every sequence has an
EOS among its text tokens. The steps left are not run (their tokens are 0) and scores count the
steps run. Tokens up to each sequence's first EOS are the reference's (a step never depends on
later ones); only scores, and so the order of beams or samples, can differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import ops
from .model.transformer import EncoderOutput, UnifiedIO

BOS, EOS = 0, 1
BEAM_NEG_INF = -1.0e7  # the reference's NEG_INF for dead beams and filtered logits
LOGITS_CHUNK_ELEMS = 1 << 23  # logits scored at once when ranking answer options (32 MB of float32)


@dataclass
class Generation:
    """Decoded sequences ``tokens`` (B, K, T+I) in full-vocabulary ids, and ``scores`` (B, K)."""

    tokens: Tensor
    scores: Tensor


class _Decoder:
    """Feeds one step at a time, applying the reference's input and key-mask rules."""

    def __init__(self, model: UnifiedIO, enc: EncoderOutput, text_length: int, image_length: int,
                 rows_per_example: int):
        self.model, self.text_length = model, text_length
        self.decoding = ops.decoding(model, enc, text_length, image_length, rows_per_example)
        self.start_token = model.cfg.vocab_size - 1

    def release(self) -> None:
        """Done decoding (a faster decoding may keep its cache for a later generation of the same shapes)."""
        self.decoding.release()

    def logits(self, sequences: Tensor, step: int) -> tuple[Tensor, int]:
        """Logits for the next token of each row of ``sequences`` (N, length+1) at ``step``.

        Returns (logits over the allowed vocabulary part, the id offset of that part).
        """
        tokens = sequences[:, step]
        if step < self.text_length:
            valid = ~(sequences[:, :step + 1] == EOS).any(dim=1)
            return self.decoding.step(tokens, step, valid), 0
        if step == self.text_length:
            tokens = torch.full_like(tokens, self.start_token)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        return self.decoding.step(tokens, step, valid), self.model.cfg.vocab_size


def _all_ended(sequences: Tensor, step: int, text_length: int) -> bool:
    """Whether every row of ``sequences`` (N, 1 + length) has an EOS among the text tokens
    generated up to ``step``."""
    return step < text_length and bool((sequences[:, 1:step + 2] == EOS).any(dim=1).all())


@torch.inference_mode()
def beam_search(model: UnifiedIO, enc: EncoderOutput, text_length: int, image_length: int,
                num_beams: int = 1, stop_at_eos: bool = False) -> Generation:
    """Beam search with no length penalty; returns all beams, lowest score first (see the module
    docstring for ``stop_at_eos``)."""
    batch = enc.hidden.shape[0]
    length = text_length + image_length
    decoder = _Decoder(model, enc, text_length, image_length, num_beams)
    device = enc.hidden.device
    sequences = torch.zeros(batch * num_beams, length + 1, dtype=torch.long, device=device)
    beam_scores = torch.full((batch, num_beams), BEAM_NEG_INF, device=device)
    beam_scores[:, 0] = 0.0
    row_base = (torch.arange(batch, device=device) * num_beams)[:, None]
    for step in range(length):
        logits, offset = decoder.logits(sequences, step)
        log_probs = F.log_softmax(logits, dim=-1).view(batch, num_beams, -1) + beam_scores[..., None]
        vocab = log_probs.shape[-1]
        top_scores, top_index = _top(log_probs.view(batch, -1), num_beams)
        # Worst-first within each example, as the reference keeps its live beams.
        beam_scores, top_index = top_scores.flip(1), top_index.flip(1)
        if num_beams > 1:  # with one beam every row keeps its own history: nothing to reorder
            rows = (row_base + torch.div(top_index, vocab, rounding_mode="floor")).view(-1)
            sequences = sequences.index_select(0, rows)
            decoder.decoding.reorder(rows)
        sequences[:, step + 1] = (top_index % vocab).view(-1) + offset
        if stop_at_eos and _all_ended(sequences, step, text_length):
            break
    decoder.release()
    return Generation(sequences[:, 1:].view(batch, num_beams, length), beam_scores)


def _top(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``values.topk(k, dim=1)``; for k = 1 on the CPU each row's first largest value by numpy, ~5x
    faster than torch's topk or argmax for a row of 16-33k logits (0.1 ms a step)."""
    if k > 1 or values.device.type != "cpu":
        return values.topk(k, dim=1)
    rows = values.numpy()
    index = rows.argmax(axis=1)[:, None]
    return torch.from_numpy(np.take_along_axis(rows, index, axis=1)), torch.from_numpy(index)


def _sorted_descending(logits: Tensor) -> Tensor:
    """Each row's values, largest first. On the CPU numpy's vectorised sort is about 20x faster
    than torch's for a row of 16k logits (a top-p step's largest cost otherwise)."""
    if logits.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(logits.numpy(), axis=-1)[..., ::-1]))
    return logits.sort(dim=-1, descending=True).values


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of highest logits whose probabilities sum to at least ``top_p``."""
    sorted_logits = _sorted_descending(logits)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # The number of largest logits summing to less than top_p: those and the next one are kept.
    below = torch.full((logits.shape[0], 1), top_p, dtype=cumulative.dtype, device=logits.device)
    cutoff_index = torch.searchsorted(cumulative, below).clamp(max=logits.shape[-1] - 1)
    cutoff = sorted_logits.gather(-1, cutoff_index)
    return torch.where(logits < cutoff, BEAM_NEG_INF, logits)


def _draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One id per row, with probability softmax(logits): the Gumbel-max trick, which needs one
    uniform draw per logit and no normalisation (cheaper than torch.multinomial on the CPU), and
    all but never parts for logits that differ by rounding (a float64 model samples a float32 one's
    ids; inverting the cumulative distribution at one draw per row would be ~0.3 ms a step faster
    here, but parts at ~1% of 16k-id draws, where a rounding error moves a boundary past it)."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    return _top(logits - (-uniform.log()).log(), 1)[1][:, 0]


@torch.inference_mode()
def sample(model: UnifiedIO, enc: EncoderOutput, text_length: int, image_length: int, num_samples: int = 1,
           top_p: float = 0.9, temperature: float = 1.0, generator: torch.Generator | None = None,
           stop_at_eos: bool = False) -> Generation:
    """Top-p sampling; returns ``num_samples`` per example sorted by increasing log-probability
    (see the module docstring for ``stop_at_eos``)."""
    batch = enc.hidden.shape[0]
    length = text_length + image_length
    decoder = _Decoder(model, enc, text_length, image_length, num_samples)
    device = enc.hidden.device
    sequences = torch.zeros(batch * num_samples, length + 1, dtype=torch.long, device=device)
    scores = torch.zeros(batch * num_samples, device=device)
    for step in range(length):
        logits, offset = decoder.logits(sequences, step)
        if top_p:
            logits = _top_p_filter(logits, top_p)
        token = _draw(logits / (temperature + 1e-7), generator)
        scores += F.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0]
        sequences[:, step + 1] = token + offset
        if stop_at_eos and _all_ended(sequences, step, text_length):
            break
    decoder.release()
    scores = scores.view(batch, num_samples)
    order = scores.argsort(dim=1)
    tokens = sequences[:, 1:].view(batch, num_samples, length).gather(1, order[..., None].expand(-1, -1, length))
    return Generation(tokens, scores.gather(1, order))


@dataclass
class _OptionPass:
    """One teacher-forced decoder pass over answer options: the final hidden states (N, D) and
    targets (N,) of the positions its loss counts, and its mask (rows, L) of those positions."""

    hidden: Tensor
    targets: Tensor
    mask: Tensor


def _shared_cross_kv(model: UnifiedIO, enc: EncoderOutput) -> list:
    """The decoder's cross-attention keys/values of ``enc``, projected once for all option passes."""
    return model.decoder.cross_kv(enc.hidden)


def _option_pass(model: UnifiedIO, enc: EncoderOutput, cross_kv: list, text_inputs: Tensor, text_mask: Tensor,
                 image_inputs: Tensor, image_mask: Tensor, targets: Tensor, is_image: bool) -> _OptionPass:
    """Decode rows of options (``cross_kv``: the decoder's cross-attention keys/values of ``enc``)
    and keep the counted positions of the scored part: image positions for image options, text
    positions for text options."""
    hidden = model.decode_hidden(enc, text_inputs, image_inputs, text_mask, image_mask, cross_kv)
    t = text_inputs.shape[1]
    hidden, mask = (hidden[:, t:], image_mask) if is_image else (hidden[:, :t], text_mask)
    counted = mask.bool()
    return _OptionPass(hidden[counted], targets[counted], counted)


def _option_losses(model: UnifiedIO, passes: list[_OptionPass], is_image: bool, average: bool) -> list[Tensor]:
    """Summed (or averaged) cross-entropy of the targets, per row of each pass.

    Only the scored part's logits are computed (text ids at text positions, image ids at image
    ones): the reference masks the other part to -1e10, which adds exactly 0 to the softmax. And
    only at the positions the mask counts (options shorter than the longest pad the rest): the
    reference's loss multiplies the others by 0.
    """
    hidden = torch.cat([p.hidden for p in passes])
    targets = torch.cat([p.targets for p in passes])
    rows = model.output_rows(is_image)
    # Some positions at a time: hundreds of options' logits would take gigabytes at once. (Text
    # rows are the larger part: vocab_size bounds the logits of a position either way.)
    per_chunk = max(1, LOGITS_CHUNK_ELEMS // model.cfg.vocab_size)
    nll = torch.cat([ops.negative_log_likelihood(h, model.token_embedder.weight, rows, y)
                     for h, y in zip(hidden.split(per_chunk), targets.split(per_chunk))])
    losses = []
    for p, counted_nll in zip(passes, nll.split([len(p.targets) for p in passes])):
        per_position = torch.zeros(p.mask.shape, dtype=torch.float32, device=nll.device)
        per_position[p.mask] = counted_nll
        loss = per_position.sum(dim=1)
        losses.append(loss / p.mask.sum(dim=1) if average else loss)
    return losses


def _text_option_batch(options: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder inputs/targets/mask for tokenized options (N, W) that already end in EOS.

    As in the reference, the target gets one more EOS after the tokenizer's, so the loss covers
    ``[..., </s>, </s>]``.
    """
    n = options.shape[0]
    zero = options.new_zeros(n, 1)
    inputs = torch.cat([zero, options], dim=1)
    mask = torch.cat([torch.ones_like(zero, dtype=torch.bool), options > 0], dim=1)
    targets = torch.cat([options, zero], dim=1)
    targets = targets + (mask & (targets == 0)).long()
    return inputs, targets, mask


@torch.inference_mode()
def score_text_options(model: UnifiedIO, enc: EncoderOutput, options: Tensor, max_options: int = 800,
                       average_loss: bool = False) -> Tensor:
    """Loss (B, n_options) of each tokenized option (n_options, W) for each example; lower is better.

    Options of each length are decoded together (up to ``max_options`` at a time), without the
    padding to the longest: an option's positions never see the later ones (the decoder is causal)
    and the padding's losses do not count.
    """
    batch = enc.hidden.shape[0]
    cross_kv = _shared_cross_kv(model, enc)
    positions = torch.arange(1, options.shape[1] + 1, device=options.device)
    lengths = ((options > 0) * positions).amax(dim=1)  # up to the last token (the EOS), padding after
    tile = lambda x: x.repeat(batch, 1)  # noqa: E731 - each example's options in a row (see UnifiedIO.decode)
    chunks, passes = [], []
    for length in lengths.unique().tolist():
        for chunk in (lengths == length).nonzero()[:, 0].split(max_options):
            inputs, targets, mask = (tile(x) for x in _text_option_batch(options[chunk, :length]))
            # No image positions: the reference decodes one (masked) after the text, which a causal
            # decoder's text positions never see.
            image = inputs[:, :0]
            chunks.append(chunk)
            passes.append(_option_pass(model, enc, cross_kv, inputs, mask, image, image, targets, is_image=False))
    losses = torch.empty(batch, options.shape[0], device=options.device)
    for chunk, loss in zip(chunks, _option_losses(model, passes, False, average_loss)):
        losses[:, chunk] = loss.view(batch, len(chunk))
    return losses


@torch.inference_mode()
def score_image_options(model: UnifiedIO, enc: EncoderOutput, option_codes: Tensor, option_masks: Tensor,
                        max_options: int = 800, average_loss: bool = False) -> Tensor:
    """Loss (B, n_options) of each option's VQGAN codes (n_options, 256) under ``option_masks``.

    Reproduces the reference: the image decoder inputs are the raw codes (without the
    ``vocab_size`` offset that generation uses) after the start token ``vocab_size - 1``.
    """
    batch = enc.hidden.shape[0]
    start = model.cfg.vocab_size - 1
    cross_kv = _shared_cross_kv(model, enc)
    passes = []
    for codes, masks in zip(option_codes.split(max_options), option_masks.split(max_options)):
        inputs = torch.cat([torch.full_like(codes[:, :1], start), codes[:, :-1]], dim=1).repeat(batch, 1)
        ones = torch.ones(batch * codes.shape[0], 1, dtype=torch.long, device=codes.device)
        passes.append(_option_pass(model, enc, cross_kv, ones * 0, ones, inputs, masks.repeat(batch, 1),
                                   codes.repeat(batch, 1), is_image=True))
    losses = _option_losses(model, passes, True, average_loss)
    return torch.cat([loss.view(batch, -1) for loss in losses], dim=1)
