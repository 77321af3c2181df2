"""Position biases: T5's relative-position buckets (1-D among text, the reference's 2-D among image
positions), their learned per-head biases, and the absolute bias of normed position embeddings."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops

TEXT_BUCKETS, TEXT_MAX_DISTANCE = 32, 128
IMAGE_BUCKETS, IMAGE_MAX_DISTANCE = 8, 20


def _log_bucket(n: Tensor, max_exact: int, num_buckets: int, max_distance: int) -> Tensor:
    """Logarithmic bucket for distances >= max_exact, in float32 as the reference computes it."""
    eps = torch.finfo(torch.float32).eps
    scaled = torch.log(n.float() / max_exact + eps) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.int64)
    return torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


def text_relative_bucket(relative_position: Tensor, bidirectional: bool,
                         num_buckets: int = TEXT_BUCKETS, max_distance: int = TEXT_MAX_DISTANCE) -> Tensor:
    """T5's bucket of ``memory_position - query_position``."""
    n = -relative_position
    offset = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        offset = (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    return offset + _log_bucket(n, num_buckets // 2, num_buckets, max_distance)


def image_relative_bucket(rel_x: Tensor, rel_y: Tensor, num_buckets: int = IMAGE_BUCKETS,
                          max_distance: int = IMAGE_MAX_DISTANCE) -> Tensor:
    """The reference's 2-D bucket: a quadrant times (log-bucketed |dx|, |dy|)."""
    nx, ny = -rel_x, -rel_y
    total = num_buckets ** 2
    quadrant = (((nx <= 0) & (ny < 0)).long() * 3 + ((nx < 0) & (ny >= 0)).long() * 2
                + ((nx > 0) & (ny <= 0)).long())
    max_exact = num_buckets // 2
    xx = _log_bucket(nx.abs(), max_exact, num_buckets, max_distance)
    yy = _log_bucket(ny.abs(), max_exact, num_buckets, max_distance)
    return quadrant * total + xx + num_buckets * yy


class RelativePositionBiases(nn.Module):
    """Per-head relative biases: 1-D T5 buckets among text, 2-D buckets among image, 0 across."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.rel_embedding = nn.Parameter(torch.zeros(num_heads, TEXT_BUCKETS))
        self.image_rel_embedding = nn.Parameter(torch.zeros(num_heads, 4 * IMAGE_BUCKETS ** 2))

    def forward(self, text_length: int, image_length: int, image_width: int, bidirectional: bool,
                device: torch.device, keep: Tensor | None = None) -> Tensor:
        """(H, T+I, T+I) biases for ``text_length`` text then ``image_length`` image positions
        (only between positions ``keep``, when given)."""
        shape = (text_length, image_length, image_width, bidirectional, device)
        index = ops.derived("relative buckets", (), shape, lambda: _relative_buckets(*shape))
        if keep is not None:
            index = index[keep[:, None], keep]
        # One gather from the text buckets, then the image buckets, then a zero column (text-image pairs).
        zero = self.rel_embedding.new_zeros(self.rel_embedding.shape[0], 1)
        table = torch.cat([self.rel_embedding, self.image_rel_embedding, zero], dim=1)
        heads = table.shape[0]
        return table.gather(1, index.flatten().expand(heads, -1)).view(heads, *index.shape)


def _relative_buckets(text_length: int, image_length: int, image_width: int, bidirectional: bool,
                      device: torch.device) -> Tensor:
    """(T+I, T+I) column ids into :class:`RelativePositionBiases`' joint table: text buckets among
    text positions, image buckets (offset by the text ones) among the positions of a row-major
    image grid, and the zero column after both for text-image pairs."""
    text = torch.arange(text_length, device=device)
    image = torch.arange(image_length, device=device)
    x, y = image % image_width, image // image_width
    total = text_length + image_length
    index = torch.full((total, total), TEXT_BUCKETS + 4 * IMAGE_BUCKETS ** 2, device=device)
    index[:text_length, :text_length] = text_relative_bucket(text[None, :] - text[:, None], bidirectional)
    index[text_length:, text_length:] = TEXT_BUCKETS + image_relative_bucket(x[None, :] - x[:, None],
                                                                             y[None, :] - y[:, None])
    return index


def position_bias(pos_emb: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, num_heads: int, emb_dim: int,
                  relative: Tensor) -> Tensor:
    """(L, D) normed position embeddings -> (H, L, L) absolute bias, scaled by
    (emb_dim/num_heads)^-0.5, plus the ``relative`` (H, L, L) bias (added within the matmul)."""
    q = ops.linear(pos_emb, q_proj.weight).unflatten(-1, (num_heads, -1)).transpose(0, 1)
    k = ops.linear(pos_emb, k_proj.weight).unflatten(-1, (num_heads, -1)).transpose(0, 1)
    return torch.baddbmm(relative, q, k.transpose(1, 2), alpha=float(emb_dim / num_heads) ** -0.5)
