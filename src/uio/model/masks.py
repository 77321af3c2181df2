"""Attention masks as the reference makes them: an additive -1e10 where a query may not attend a key."""
from __future__ import annotations

import torch
from torch import Tensor

MASK_VALUE = -1e10  # the reference's additive mask, also used for masked logits


def pair_valid(query_valid: Tensor, key_valid: Tensor) -> Tensor:
    """(B, 1, Lq, Lk) bool: both the query and the key position are valid."""
    return query_valid[:, None, :, None].bool() & key_valid[:, None, None, :].bool()


def masked(bias: Tensor, valid: Tensor) -> Tensor:
    """``bias`` where ``valid``, -1e10 elsewhere (broadcast). The reference adds -1e10 to the bias
    instead; in float32 that rounds to -1e10 for any bias under 512 in magnitude, so both agree,
    and one pass over the (B, H, Lq, Lk) tensor is cheaper than two. float16 ends at -65504, its
    lowest value is used instead: as -1e10 it gets no weight next to any valid key, and a row with
    no valid key (a padding query) stays finite (-inf, what newer torch makes of -1e10 there, would
    make it NaN in some attention kernels; older torch raises)."""
    return torch.where(valid, bias, max(MASK_VALUE, torch.finfo(bias.dtype).min))


def cross_attention_bias(query_valid: Tensor, key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, Lq, Lk) bias of cross-attention, which has no position bias: 0, or -1e10 where masked."""
    zero = torch.zeros((), dtype=dtype, device=key_valid.device)
    return masked(zero, pair_valid(query_valid, key_valid))
