"""Incremental decoding: the key/value cache and one decoder step, a free function of fixed-shape tensors.

``model`` is a :class:`~uio.model.transformer.UnifiedIO` and ``enc`` its encoder's output
(:class:`~uio.model.transformer.EncoderOutput`); this module imports neither, so that the seam
(:mod:`uio.model.ops`), whose reference ``decoding`` it is, imports nothing that imports it."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import cross_attention_bias, masked


class DecoderCache:
    """Preallocated state for incremental decoding of ``N`` sequences of ``T`` text + ``I`` image steps,
    ``rows_per_example`` consecutive ones per encoded example (its beams or samples).

    Holds each layer's self-attention keys/values, the cross-attention keys/values projected once,
    the position-bias table for the whole output (those three in ``attention_dtype``), and which
    cached keys are still attendable (the reference masks a sequence's keys from the step whose
    input follows an EOS onwards). Every step sees tensors of the same shapes (keys not yet
    written are masked), so a step can be traced, compiled or recorded once and replayed; with
    ``in_place``, :meth:`reorder` and :meth:`refill` keep every tensor where it is.
    """

    def __init__(self, model: nn.Module, enc, text_length: int, image_length: int,
                 rows_per_example: int = 1, attention_dtype: torch.dtype | None = None, in_place: bool = False):
        cfg, dec = model.cfg, model.decoder
        n, device = enc.hidden.shape[0] * rows_per_example, enc.hidden.device
        self.attention_dtype = dtype = attention_dtype or enc.hidden.dtype
        self.text_length, self.image_length, self.length = text_length, image_length, text_length + image_length
        self.in_place = in_place
        shape = (n, cfg.num_heads, self.length, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in dec.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in dec.layers]
        self.key_valid = torch.zeros(n, self.length, dtype=torch.bool, device=device)
        self.cross_kv, self.cross_bias, self.self_bias = self._encoding_state(model, enc)
        self.positions = dec.position_ids(text_length, image_length, device)
        self.step_index = torch.arange(self.length, device=device)

    def _encoding_state(self, model: nn.Module, enc) -> tuple[list, Tensor, Tensor]:
        """(cross-attention keys/values, cross-attention bias, self-attention bias) for ``enc``."""
        dtype, device = self.attention_dtype, enc.hidden.device
        # One per example, shared by its rows; a wider dtype holds the values exactly.
        cross_kv = [[t.to(dtype) for t in kv] for kv in model.decoder.cross_kv(enc.hidden)]
        cross_bias = cross_attention_bias(torch.ones_like(enc.mask[:, :1]), enc.mask, dtype)
        return cross_kv, cross_bias, model.decoder.self_bias(self.text_length, self.image_length, device).to(dtype)

    def step_inputs(self, step: int, tokens: Tensor, valid: Tensor) -> tuple:
        """:func:`decode_step`'s tensors for decoding ``tokens`` (N,) at output position ``step``."""
        return (self.keys, self.values, self.key_valid, self.cross_kv, self.cross_bias, self.self_bias,
                self.positions, self.step_index[step:step + 1], tokens, valid)

    def nbytes(self) -> int:
        """Memory held by the cache's tensors."""
        tensors = [*self.keys, *self.values, self.key_valid, *(t for kv in self.cross_kv for t in kv),
                   self.cross_bias, self.self_bias, self.positions, self.step_index]
        return sum(t.numel() * t.element_size() for t in tensors)

    def refill(self, model: nn.Module, enc) -> None:
        """Start a new generation for ``enc`` (of the shapes this cache was made for) in place. Keys
        left from the last generation stay masked until overwritten (a masked logit is -1e10 whatever the key)."""
        cross_kv, cross_bias, self_bias = self._encoding_state(model, enc)
        for old, new in zip([t for kv in self.cross_kv for t in kv], [t for kv in cross_kv for t in kv]):
            old.copy_(new)
        self.cross_bias.copy_(cross_bias)
        self.self_bias.copy_(self_bias)
        self.key_valid.zero_()

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search); cross-attention state is shared by an example's beams."""
        if self.in_place:
            for t in [*self.keys, *self.values, self.key_valid]:
                t.copy_(t.index_select(0, index))
            return
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, index)


def decode_step(model: nn.Module, keys: list[Tensor], values: list[Tensor], key_valid: Tensor, cross_kv: list,
                cross_bias: Tensor, self_bias: Tensor, positions: Tensor, index: Tensor, tokens: Tensor,
                valid: Tensor, is_image: bool) -> Tensor:
    """One decoder step for ``tokens`` (N,) at output position ``index`` (a 1-element tensor), on the
    tensors of :meth:`DecoderCache.step_inputs`; ``valid`` (N,) says whether this step's key stays
    attendable. Returns float32 logits over the vocabulary part allowed at this step (text ids
    before ``text_length``, image ids from it on, offset by ``vocab_size``): the reference masks
    the other part to -1e10 anyway.

    Its Python code (and that of the layers it runs) may branch on ``is_image``, the number of rows
    and the number of examples they belong to only: a trace or graph of one step replays it for others.
    """
    dec = model.decoder
    segment = torch.full((1,), int(is_image), dtype=torch.long, device=tokens.device)
    y = dec.embed(tokens[:, None], model.token_embedder, positions.index_select(0, index), segment)
    key_valid.index_copy_(1, index, valid[:, None])
    attendable = key_valid & (torch.arange(key_valid.shape[1], device=index.device) <= index)
    bias = masked(self_bias.index_select(1, index)[None], attendable[:, None, None, :])
    caches = [(k, v, index) for k, v in zip(keys, values)]
    hidden = dec.run_layers(y, bias, cross_kv, cross_bias, caches)[:, 0]
    return model.step_logits(hidden, is_image)


class Decoding:
    """One generation's decoding: a :class:`DecoderCache` and eager steps (:func:`decode_step`)."""

    def __init__(self, model: nn.Module, enc, text_length: int, image_length: int,
                 rows_per_example: int = 1):
        self.model = model
        self.cache = DecoderCache(model, enc, text_length, image_length, rows_per_example)

    def step(self, tokens: Tensor, step: int, valid: Tensor) -> Tensor:
        """:func:`decode_step` of ``tokens`` at output position ``step``."""
        return decode_step(self.model, *self.cache.step_inputs(step, tokens, valid), step >= self.cache.text_length)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` of the cache (beam search)."""
        self.cache.reorder(index)

    def release(self) -> None:
        """The generation is over (nothing to keep here)."""
