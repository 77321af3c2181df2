"""The Unified-IO encoder-decoder transformer (T5-style, with image patches in and image tokens out).

Module and parameter names mirror the released checkpoints (see ``uio.checkpoint.torch_key``).
Numerics follow the reference exactly where outputs depend on them: attention logits are not
scaled by 1/sqrt(head_dim); masks are an additive -1e10 (a fully masked row attends uniformly);
norms are T5 RMS norms computed in float32; the MLP is gated GELU (tanh approximation).

The math runs through the operations of :mod:`uio.model.ops`, whose plain versions are the
reference and which :mod:`uio.accel` may replace with faster ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import UnifiedIOConfig
from . import ops
from .embedding import Embedding
from .masks import MASK_VALUE, cross_attention_bias, masked, pair_valid
from .positions import RelativePositionBiases, position_bias

DECODER_IMAGE_WIDTH = 16  # the decoder's 256 image tokens form a 16x16 grid


class RMSNorm(nn.Module):
    """T5 layer norm: scale * x / rms(x), no mean subtraction and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MlpBlock(nn.Module):
    """Gated-GELU feed-forward: wo(gelu(wi_0 x) * wi_1 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.wi_0 = nn.Linear(dim, hidden, bias=False)
        self.wi_1 = nn.Linear(dim, hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return ops.mlp(x, self.wi_0.weight, self.wi_1.weight, self.wo.weight)


class Attention(nn.Module):
    """Multi-head attention without logit scaling; ``bias`` is added to the logits."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.value = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def project(self, x: Tensor, which: str) -> tuple[Tensor, ...]:
        """Project ``x`` (B, L, dim) into heads (B, H, L, D) for each of ``which`` ("qkv", "kv" or "q")."""
        weights = [{"q": self.query, "k": self.key, "v": self.value}[c].weight for c in which]
        return tuple(y.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for y in ops.project(x, weights))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q (B,H,Lq,D), k/v (B,H,Lk,D), bias (q's dtype) broadcastable to (B,H,Lq,Lk) -> (B, Lq, dim).

        k/v may instead have B/n rows, each shared by n consecutive rows of q (an example's beams,
        samples or answer options): those are attended as one query sequence of n*Lq, as each
        query row is on its own, instead of copying the keys and values n times. ``bias`` then
        has a row per query row, or per key/value row with one query position.
        """
        rows, _, length, _ = q.shape
        sharing = rows // k.shape[0]
        if sharing > 1:
            q = q.unflatten(0, (-1, sharing)).transpose(1, 2).flatten(2, 3)
            if bias.shape[0] == rows:  # a bias per query row (else one per key row, or for all)
                bias = bias.expand(-1, -1, length, -1).unflatten(0, (-1, sharing)).transpose(1, 2).flatten(2, 3)
        # Keys/values may be kept in a wider dtype than q (a decoding cache's choice).
        x = ops.attention(q.to(k.dtype), k, v, bias).to(q.dtype)
        x = x.transpose(1, 2).flatten(2).reshape(rows, length, -1)
        return ops.linear(x, self.out.weight)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.pre_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
        self.pre_mlp_layer_norm = RMSNorm(cfg.emb_dim)
        self.mlp = MlpBlock(cfg.emb_dim, cfg.mlp_dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attention.attend(*self.attention.project(self.pre_attention_layer_norm(x), "qkv"), bias)
        return x + self.mlp(self.pre_mlp_layer_norm(x))


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder: states, key validity, and position embeddings."""

    hidden: Tensor  # (B, S, D) after the final norm
    mask: Tensor  # (B, S) int32, 1 for valid positions
    position_embedding: Tensor  # (1, S, D) normed position embeddings (the reference's 2nd output)


def positions_to_keep(mask: Tensor) -> Tensor | None:
    """Indices of the positions valid in some example of ``mask`` (B, L); None when that is all of
    them (or none). Valid positions never attend to masked ones (-1e10 gives them a weight of
    exactly 0), so the others can be left out without changing what the valid ones compute."""
    valid = mask.bool().any(dim=0)
    return None if bool(valid.all()) or not bool(valid.any()) else valid.nonzero()[:, 0]


class Encoder(nn.Module):
    """Embeds text tokens and image patches, then runs the bidirectional transformer."""

    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.emb_dim
        self.position_embedding = Embedding(cfg.encoder_max_text_length + cfg.encoder_max_image_length, d)
        self.segment_embedding = Embedding(cfg.num_seg_emb, d)
        self.image_projection = nn.Linear(cfg.image_patch_size ** 2 * 3, d, bias=False)
        self.txt_emb_pre_ln = RMSNorm(d)
        self.img_emb_pre_ln = RMSNorm(d)
        self.pe_pre_ln = RMSNorm(d)
        self.position_q_linear = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.position_k_linear = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.relpos_bias = RelativePositionBiases(cfg.num_heads)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.encoder_norm = RMSNorm(d)

    def position_bias(self, text_length: int, image_length: int, grid_width: int, keep: Tensor | None,
                      pos: Tensor) -> Tensor:
        """(H, L, L) relative and absolute position biases between the (``keep``) positions, from their
        normed position embeddings ``pos``: they depend on nothing but these arguments and the weights."""
        relpos = self.relpos_bias
        weights = (self.position_embedding.weight, self.pe_pre_ln.weight, self.position_q_linear.weight,
                   self.position_k_linear.weight, relpos.rel_embedding, relpos.image_rel_embedding)
        key = (text_length, image_length, grid_width, None if keep is None else keep.cpu().numpy().tobytes(),
               pos.device, pos.dtype)
        return ops.derived("encoder position bias", weights, key,
                           lambda: self._position_bias(text_length, image_length, grid_width, keep, pos))

    def _position_bias(self, text_length: int, image_length: int, grid_width: int, keep: Tensor | None,
                       pos: Tensor) -> Tensor:
        cfg = self.cfg
        relative = self.relpos_bias(text_length, image_length, grid_width, bidirectional=True, device=pos.device,
                                    keep=keep)
        return position_bias(pos, self.position_q_linear, self.position_k_linear, cfg.num_heads, cfg.emb_dim,
                             relative)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) -> (B, H/p * W/p, p*p*3), patch vectors ordered (row, col, channel)."""
        p = self.cfg.image_patch_size
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def image_position_embedding(self, num_patches: int, grid_width: int) -> Tensor:
        """(num_patches, D); the 24x24 table is bicubic-resized for other square grids."""
        cfg = self.cfg
        table = self.position_embedding.weight[cfg.encoder_max_text_length:]
        if num_patches == cfg.encoder_max_image_length:
            return table
        side = math.isqrt(cfg.encoder_max_image_length)
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(num_patches // grid_width, grid_width), mode="bicubic",
                             antialias=True, align_corners=False).to(table.dtype)
        return grid.permute(0, 2, 3, 1).reshape(num_patches, -1)

    def forward(self, tokens: Tensor, token_embedder: nn.Embedding, images: Tensor, text_mask: Tensor,
                image_mask: Tensor, skip_padding: bool = False) -> EncoderOutput:
        """tokens (B, T) int; images (B, H, W, 3) normalized; masks (B, T) / (B, N) -> EncoderOutput.

        ``skip_padding`` leaves out the positions masked in every example (see :meth:`UnifiedIO.encode`).
        """
        cfg = self.cfg
        b, t = tokens.shape
        patches = self.patchify(images)
        n = patches.shape[1]
        grid_width = images.shape[2] // cfg.image_patch_size
        text_pos = self.position_embedding.weight[:t]
        image_pos = self.image_position_embedding(n, grid_width)

        seg = self.segment_embedding.weight
        txt = token_embedder(tokens) + seg[0] + text_pos
        img = ops.linear(patches, self.image_projection.weight) + seg[1] + image_pos
        x = torch.cat([self.txt_emb_pre_ln(txt), self.img_emb_pre_ln(img)], dim=1)
        pos = torch.cat([text_pos, image_pos], dim=0)
        mask = torch.cat([text_mask.int(), image_mask.int()], dim=1)
        keep = positions_to_keep(mask) if skip_padding else None
        if keep is not None:
            x, pos, mask = x.index_select(1, keep), pos.index_select(0, keep), mask.index_select(1, keep)

        pos = self.pe_pre_ln(pos)
        bias = self.position_bias(t, n, grid_width, keep, pos)
        # Examples with one mask (prompts of one length, images of one shape) share one masked
        # bias, broadcast over the batch, instead of a copy each.
        shared = bool((mask == mask[:1]).all())
        rows = mask[:1] if shared else mask
        bias = masked(bias[None], pair_valid(rows, rows))
        for layer in self.layers:
            x = layer(x, bias)
        return EncoderOutput(self.encoder_norm(x), mask, pos[None])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.pre_self_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.self_attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
        self.pre_cross_attention_layer_norm = RMSNorm(cfg.emb_dim)
        self.encoder_decoder_attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
        self.pre_mlp_layer_norm = RMSNorm(cfg.emb_dim)
        self.mlp = MlpBlock(cfg.emb_dim, cfg.mlp_dim)

    def forward(self, x: Tensor, self_bias: Tensor, cross_kv: tuple[Tensor, Tensor], cross_bias: Tensor,
                cache: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Self-attention over ``x`` itself (teacher forcing) or, with ``cache`` = (keys, values,
        index), over the cached keys/values after writing this step's at ``index`` (decoding)."""
        if cache is not None:
            stepped = ops.decoder_layer_step(self, x, cache, self_bias, cross_kv, cross_bias)
            if stepped is not None:
                return stepped
        attn, cross = self.self_attention, self.encoder_decoder_attention
        q, k, v = attn.project(self.pre_self_attention_layer_norm(x), "qkv")
        if cache is not None:
            keys, values, index = cache
            k, v = keys.index_copy_(2, index, k.to(keys.dtype)), values.index_copy_(2, index, v.to(values.dtype))
        x = x + attn.attend(q, k, v, self_bias)
        q, = cross.project(self.pre_cross_attention_layer_norm(x), "q")
        x = x + cross.attend(q, *cross_kv, cross_bias)
        return x + self.mlp(self.pre_mlp_layer_norm(x))


class Decoder(nn.Module):
    """Causal decoder over text positions 0..T-1 followed by image positions 0..I-1."""

    def __init__(self, cfg: UnifiedIOConfig):
        super().__init__()
        self.cfg = cfg
        d, inner = cfg.emb_dim, cfg.num_heads * cfg.head_dim
        self.position_embedding = Embedding(cfg.decoder_max_text_length + cfg.decoder_max_image_length, d)
        self.segments_embedding = Embedding(cfg.num_seg_emb, d)
        self.pre_ln = RMSNorm(d)
        self.pe_pre_ln = RMSNorm(d)
        self.self_position_q_linear = nn.Linear(d, inner, bias=False)
        self.self_position_k_linear = nn.Linear(d, inner, bias=False)
        # Present in the checkpoints but never used by the reference (cross-attention gets no bias).
        self.cross_position_q_linear = nn.Linear(d, inner, bias=False)
        self.cross_position_k_linear = nn.Linear(d, inner, bias=False)
        self.relpos_bias = RelativePositionBiases(cfg.num_heads)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = RMSNorm(d)

    def position_ids(self, text_length: int, image_length: int, device) -> Tensor:
        """Rows of the position table: text 0..T-1, image max_text_length + 0..I-1."""
        return torch.cat([torch.arange(text_length, device=device),
                          self.cfg.decoder_max_text_length + torch.arange(image_length, device=device)])

    def self_bias(self, text_length: int, image_length: int, device) -> Tensor:
        """(H, L, L) relative + absolute position bias for the whole output sequence."""
        cfg = self.cfg
        pos = self.pe_pre_ln(self.position_embedding(self.position_ids(text_length, image_length, device)))
        relative = self.relpos_bias(text_length, image_length, DECODER_IMAGE_WIDTH, bidirectional=False,
                                    device=device)
        return position_bias(pos, self.self_position_q_linear, self.self_position_k_linear, cfg.num_heads,
                             cfg.emb_dim, relative)

    def embed(self, tokens: Tensor, token_embedder: nn.Embedding, positions: Tensor, segments: Tensor) -> Tensor:
        """tokens (B, L); positions (L,) rows of the position table; segments (L,) 0 text / 1 image."""
        y = token_embedder(tokens) + self.position_embedding(positions) + self.segments_embedding(segments)
        return self.pre_ln(y)

    def cross_kv(self, encoded: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Project the encoder states once per call for every layer's cross-attention."""
        return [[kv.contiguous() for kv in layer.encoder_decoder_attention.project(encoded, "kv")]
                for layer in self.layers]

    def run_layers(self, y: Tensor, self_bias: Tensor, cross_kv: list, cross_bias: Tensor,
                   caches: list[tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        """Run every layer (layer i with ``caches[i]`` when decoding) and the final norm."""
        for i, layer in enumerate(self.layers):
            y = layer(y, self_bias, cross_kv[i], cross_bias, caches[i] if caches else None)
        return self.decoder_norm(y)


class UnifiedIO(nn.Module):
    """The whole network: shared token embedding, encoder, decoder and the VQGAN."""

    def __init__(self, cfg: UnifiedIOConfig, vae_cfg):
        super().__init__()
        from .vqgan import VQGAN

        self.cfg = cfg
        self.token_embedder = Embedding(cfg.vocab_size + cfg.image_vocab_size, cfg.emb_dim)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.discrete_vae = VQGAN(vae_cfg)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda()... convert each weight on its own: the seam may lay them out again.
        before = [p.data_ptr() for p in self.parameters()]
        super()._apply(fn, recurse)
        if [p.data_ptr() for p in self.parameters()] != before:
            ops.converted(self)
        return self

    def __setstate__(self, state):
        # Deep copies clone each parameter on its own (views of one matrix become matrices of their
        # own), as unpickling may: the seam may lay them out again.
        super().__setstate__(state)
        ops.converted(self)

    def output_rows(self, is_image: bool) -> slice:
        """The embedding rows a decoding step scores: image ids or text ids."""
        return slice(self.cfg.vocab_size, None) if is_image else slice(0, self.cfg.vocab_size)

    def step_logits(self, hidden: Tensor, is_image: bool) -> Tensor:
        """A decoding step's float32 logits over the part of the vocabulary it may emit (see :meth:`output_rows`)."""
        return ops.logits(hidden, self.token_embedder.weight, self.output_rows(is_image))

    def encode(self, tokens: Tensor, images: Tensor, text_mask: Tensor | None = None,
               image_mask: Tensor | None = None, skip_padding: bool = False) -> EncoderOutput:
        """Encode a batch: tokens (B, T), images (B, H, W, 3) normalized, masks default to all valid.

        With ``skip_padding``, positions masked in every example (prompt padding, the patches of
        padding around a non-square image) are not computed and are left out of the output. The
        decoder's valid positions never attend to them, so generated tokens, scores and the losses
        of answer options are the same as without, up to float rounding, at less work (a 4:3 image
        pads a quarter of its patches). Without it, every position is computed, padded ones as the
        reference computes them (their values are meaningless but deterministic)."""
        if text_mask is None:
            text_mask = tokens > 0
        if image_mask is None:
            p = self.cfg.image_patch_size
            image_mask = torch.ones(images.shape[0], (images.shape[1] // p) * (images.shape[2] // p),
                                    dtype=torch.int32, device=images.device)
        return self.encoder(tokens, self.token_embedder, images, text_mask, image_mask, skip_padding)

    def decode(self, enc: EncoderOutput, text_inputs: Tensor, image_inputs: Tensor, text_mask: Tensor,
               image_mask: Tensor) -> Tensor:
        """Teacher-forced decoder pass over whole sequences -> masked logits (N, T+I, vocab), float32.

        ``enc`` holds B examples and the decoder inputs N = n * B rows, n consecutive ones per
        example (its answer options, say), which share that example's cross-attention keys and values.
        """
        t = text_inputs.shape[1]
        logits = ops.logits(self.decode_hidden(enc, text_inputs, image_inputs, text_mask, image_mask),
                            self.token_embedder.weight)
        is_image_step = torch.arange(logits.shape[1], device=logits.device)[:, None] >= t
        is_image_id = torch.arange(logits.shape[-1], device=logits.device)[None, :] >= self.cfg.vocab_size
        return logits.masked_fill(is_image_step != is_image_id, MASK_VALUE)

    def decode_hidden(self, enc: EncoderOutput, text_inputs: Tensor, image_inputs: Tensor, text_mask: Tensor,
                      image_mask: Tensor, cross_kv: list | None = None) -> Tensor:
        """:meth:`decode`'s final hidden states (N, T+I, D), before the output embedding.

        ``cross_kv``: ``self.decoder.cross_kv(enc.hidden)``, for passes sharing one encoding."""
        dec = self.decoder
        rows_per_example, remainder = divmod(text_inputs.shape[0], enc.mask.shape[0])
        if remainder or not rows_per_example:
            raise ValueError(f"got {text_inputs.shape[0]} rows of decoder inputs for {enc.mask.shape[0]} encoded "
                             "examples: each example needs the same number of rows")
        t, i = text_inputs.shape[1], image_inputs.shape[1]
        device = text_inputs.device
        tokens = torch.cat([text_inputs, image_inputs], dim=1)
        segments = torch.cat([torch.zeros(t, dtype=torch.long, device=device),
                              torch.ones(i, dtype=torch.long, device=device)])
        y = dec.embed(tokens, self.token_embedder, dec.position_ids(t, i, device), segments)
        valid = torch.cat([text_mask.int(), image_mask.int()], dim=1)
        causal = torch.ones(t + i, t + i, dtype=torch.bool, device=device).tril()
        self_bias = masked(dec.self_bias(t, i, device)[None], causal & pair_valid(valid, valid))
        key_valid = enc.mask.repeat_interleave(rows_per_example, dim=0)
        cross_bias = cross_attention_bias(valid, key_valid, y.dtype)
        return dec.run_layers(y, self_bias, dec.cross_kv(enc.hidden) if cross_kv is None else cross_kv, cross_bias)
