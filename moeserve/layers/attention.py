"""GQA self-attention over a paged KV cache, for any mix of prefill chunks and decodes.

Legend: T tokens in the step, B decode sequences, L context length, NH query heads,
NKV key/value heads, D head dim, NB KV blocks, BS block size, H hidden.

The flat batch holds the decode tokens first (one per sequence), then each prefill chunk.
Decodes run as one padded SDPA call over their gathered contexts; each prefill chunk runs its
own SDPA call (its queries are many, so padding them to a common length would waste compute).
Layers with attention sinks (gpt-oss: a learned per-head logit in every softmax denominator,
with no value) run the same calls through `sink_attention` instead: SDPA has no sink argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels import native, ops
from moeserve.layers.linear import Linear

from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.models.config import MoEModelConfig


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> 0 / -inf in `dtype`. SDPA converts a bool mask this way on
    every call: a cached prefill chunk's [n, L] mask took longer than its attention that way (a
    102-token chunk over 1,222 keys, bf16: 2.3 ms per SDPA call, 1.1 ms with the mask converted
    once a step)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@dataclass
class PrefillChunk:
    q_start: int                 # first row of this chunk in the flat batch
    q_end: int
    start_pos: int               # position of the chunk's first token (tokens already cached)
    context_slots: torch.Tensor  # [start_pos + n] int64 cache slots of the whole context
    _masks: dict = field(default_factory=dict)   # built once a step, shared by the layers

    def mask(self, window: int | None, device: torch.device, chunk: int | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """prefill_mask of this chunk (None: plain causal), additive in `dtype` when given."""
        key = (window, chunk, dtype)
        if key not in self._masks:
            mask = prefill_mask(self.start_pos, self.q_end - self.q_start, window, device, chunk)
            self._masks[key] = mask if mask is None or dtype is None else additive_mask(mask, dtype)
        return self._masks[key]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor          # [T] int64
    slot_mapping: torch.Tensor       # [T] int64, flat cache slot where each token's K/V is written
    num_decodes: int                 # rows [0, num_decodes) are decode tokens
    decode_slots: torch.Tensor | None = None    # [B, Lmax] int64 (padding points at slot 0)
    decode_lens: torch.Tensor | None = None     # [B] int64 context length including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    _decode_masks: dict = field(default_factory=dict)  # (window, chunk, dtype) -> [B, 1, 1, Lmax], once a step
    rope_cache: dict = field(default_factory=dict)      # rotary cos/sin of `positions`, gathered once a step

    def decode_starts(self, window: int | None, chunk: int | None) -> torch.Tensor | None:
        """[B] int64 first context position a decode attends to (sliding window, chunked
        attention), or None for the whole context; once a step."""
        if window is None and chunk is None:
            return None
        key = ("starts", window, chunk)
        starts = self._decode_masks.get(key)
        if starts is None:
            lens = self.decode_lens
            starts = torch.zeros_like(lens)
            if window is not None:
                starts = torch.maximum(starts, lens - window)
            if chunk is not None:
                starts = torch.maximum(starts, (lens - 1).div(chunk, rounding_mode="floor") * chunk)
            self._decode_masks[key] = starts
        return starts

    def decode_mask(self, window: int | None, chunk: int | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, 1, 1, Lmax]: bool (True = attend), or additive in `dtype` when given."""
        key = (window, chunk, dtype)
        mask = self._decode_masks.get(key)
        if mask is None and dtype is not None:
            mask = self._decode_masks[key] = additive_mask(self.decode_mask(window, chunk), dtype)
        if mask is None:
            assert self.decode_slots is not None and self.decode_lens is not None
            cols = torch.arange(self.decode_slots.shape[1], device=self.decode_slots.device)  # [Lmax]
            lens = self.decode_lens[:, None]                                                 # [B, 1]
            mask = cols[None, :] < lens                                                      # [B, Lmax]
            if window is not None:
                mask &= cols[None, :] > lens - 1 - window
            if chunk is not None:   # the query (position lens - 1) sees only its own chunk
                mask &= cols[None, :] >= (lens - 1).div(chunk, rounding_mode="floor") * chunk
            mask = mask[:, None, None, :]
            self._decode_masks[key] = mask
        return mask


def prefill_mask(start_pos: int, n: int, window: int | None, device: torch.device,
                 chunk: int | None = None) -> torch.Tensor | None:
    """[n, start_pos + n] bool, or None when plain causal attention (is_causal) applies.
    `chunk`: tokens attend only to earlier tokens of their own chunk of positions (Llama 4)."""
    if start_pos == 0 and window is None and (chunk is None or n <= chunk):
        return None
    q_pos = torch.arange(start_pos, start_pos + n, device=device)[:, None]     # [n, 1]
    k_pos = torch.arange(start_pos + n, device=device)[None, :]                # [1, L]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if chunk is not None:
        mask &= k_pos.div(chunk, rounding_mode="floor") == q_pos.div(chunk, rounding_mode="floor")
    return mask


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: query i sees keys 0..i (what is_causal means, as a tensor)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


_SINK_SCORE_BUDGET = 1 << 24   # float32 scores one sink_attention block may hold (64 MiB)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention whose softmax denominator also holds exp(sink) of each head (gpt-oss).

    q [B, NH, n, D]; keys, values [B, NKV, L, D]; mask bool broadcastable to [B, NH, n, L]
    (True = attend); sinks [NH] -> [B, NH, n, D]. Explicit matmul-softmax, as transformers'
    eager gpt-oss attention, in blocks of sequences and query rows whose [b, NH, rows, L] scores
    fit 2^24 floats: gpt-oss-120b (64 heads) over a 2,048-token chunk would otherwise hold 1 GiB
    of scores per layer, and 16 decodes at 128k context 512 MiB.
    """
    b, nh, n, _ = q.shape
    length = keys.shape[2]
    rows = max(1, min(n, _SINK_SCORE_BUDGET // (nh * length)))       # query rows per block
    seqs = max(1, min(b, _SINK_SCORE_BUDGET // (nh * length * rows)))  # sequences per block
    if rows == n and seqs == b:
        return _sink_attention_block(q, keys, values, mask, sinks, scale)
    full_mask = mask.expand(b, nh, n, length)                          # a view: slices per block
    out = torch.empty_like(q)
    for s0 in range(0, b, seqs):
        bs = slice(s0, s0 + seqs)
        for r0 in range(0, n, rows):
            rs = slice(r0, r0 + rows)
            out[bs, :, rs] = _sink_attention_block(q[bs, :, rs], keys[bs], values[bs], full_mask[bs, :, rs],
                                                   sinks, scale)
    return out


def _sink_attention_block(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                          sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """sink_attention for one block of queries; the score matrix [B, NH, n, L] float32 is
    materialised. GQA without copying K/V: a KV head's G query heads become G*n rows."""
    b, nh, n, d = q.shape
    nkv, length = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, nkv, (nh // nkv) * n, d)                                # [B, NKV, G*n, D]
    scores = (qg @ keys.transpose(-2, -1)) * scale                            # [B, NKV, G*n, L]
    scores = scores.view(b, nh, n, length).float().masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, nh, 1, 1).expand(b, nh, n, 1)               # [B, NH, n, 1]
    logits = torch.cat((scores, sink), dim=-1)                                # [B, NH, n, L + 1]
    probs = (logits - logits.amax(-1, keepdim=True)).softmax(-1)[..., :length]   # the sink takes its share
    out = probs.to(values.dtype).reshape(b, nkv, (nh // nkv) * n, length) @ values  # [B, NKV, G*n, D]
    return out.view(b, nh, n, d)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless q/k norm over each head's D, in float32: [..., D] -> [..., D]."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4's NoPE-layer query scale (arXiv 2501.19399): 1 + attn_scale * log(1 + floor((pos + 1)
    / floor_scale)), per token: positions [T] -> [T, 1, 1] float32."""
    floors = torch.floor((positions.float() + 1.0) / floor_scale)
    return (torch.log1p(floors) * attn_scale + 1.0)[:, None, None]


class Attention(nn.Module):
    def __init__(self, cfg: MoEModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)  # fused: one weight read
        self.o = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "full":      # OLMoE: norm over the whole projection, before splitting heads
            self.q_norm, self.k_norm = RMSNorm(q_size, cfg.rms_norm_eps), RMSNorm(kv_size, cfg.rms_norm_eps)
        elif cfg.qk_norm == "per_head":  # Qwen3-MoE: norm over each head's D
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps), RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_windows[layer_idx]
        self.rotary = rotary
        self.scale = cfg.softmax_scale
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads)) if cfg.attention_sinks else None   # [NH]
        # Llama 4: chunked attention on rope layers; NoPE layers skip rotary, attend to the whole
        # context and scale their queries by position (attn_temperature).
        self.chunk = cfg.attention_chunks[layer_idx] if cfg.attention_chunks else None
        self.use_rope = cfg.rope_layers[layer_idx] if cfg.rope_layers else True
        self.l2_eps = cfg.rms_norm_eps if cfg.qk_norm == "l2_rope" and self.use_rope else None
        self.temperature = cfg.attn_temperature if not self.use_rope else None

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x [T, H]; kv_cache [2, NB, BS, NKV, D]
        qk, v = self._project(x)                                     # [T, NH + NKV, D], [T, NKV, D]
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # [NB*BS, NKV, D]
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        if self._native_rope(qk):   # rotary and the cache write in one native call
            ops.rope_write_cache(qk, v, self.rotary.cos, self.rotary.sin, meta.positions, meta.slot_mapping,
                                 self.num_heads, k_flat, v_flat)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            return self._attend(q, k, v, k_flat, v_flat, meta)
        if self.use_rope:
            qk = self.rotary(meta.positions, qk, meta.rope_cache)
        if self.l2_eps is not None:                                  # after rope, as Llama 4
            qk = l2_norm(qk, self.l2_eps)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, NH, D], [T, NKV, D]
        if self.temperature is not None:
            q = (q * self._temperature_scales(meta)).to(q.dtype)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        return self._attend(q, k, v, k_flat, v_flat, meta)

    def _native_rope(self, qk: torch.Tensor) -> bool:
        """The native rotary + cache write applies: neox rotary on every head, nothing between
        rotary and the cache write (Llama 4's l2 norm, NoPE temperature), a native dtype."""
        return (self.use_rope and self.l2_eps is None and self.temperature is None and not self.rotary.interleaved
                and native.supports(qk))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                v_flat: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, NH, D], k / v [T, NKV, D] (already in the cache) -> [T, H]
        if not meta.prefills:                                        # decode-only step: no copy
            out = self._decode(q, k_flat, v_flat, meta)
        else:
            out = torch.empty_like(q)                                # [T, NH, D]
            if meta.num_decodes:
                out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], k_flat, v_flat, meta)
            for chunk in meta.prefills:
                out[chunk.q_start: chunk.q_end] = self._prefill(q, k, v, k_flat, v_flat, chunk)
        return self.o(out.reshape(out.shape[0], -1))                 # [T, H]

    def _temperature_scales(self, meta: AttentionMetadata) -> torch.Tensor:
        """[T, 1, 1] float32, computed once a step and shared by every NoPE layer (kept beside the
        step's rotary tables)."""
        key = ("attn_temperature", self.temperature)
        scales = meta.rope_cache.get(key)
        if scales is None:
            scales = meta.rope_cache[key] = temperature_scales(meta.positions, *self.temperature)
        return scales

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        qkv = self.qkv(x)                                            # [T, (NH + 2 NKV) D]
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = qk.split([self.q_size, self.kv_size], dim=-1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=-1)
        qk = qk.reshape(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        return qk, v.reshape(t, self.num_kv_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q [B, NH, D] -> [B, NH, 1, D]; contexts gathered [B, Lmax, NKV, D] -> [B, NKV, Lmax, D]
        if native.supports(q, k_flat):   # in place over the paged cache: no gather, no mask
            return ops.decode_attention(q, k_flat, v_flat, meta.decode_slots, meta.decode_lens, self.scale,
                                        meta.decode_starts(self.window, self.chunk), self.sinks)
        b, lmax = meta.decode_slots.shape
        slots = meta.decode_slots.reshape(-1)                        # index_select: ~4x faster than [] here
        keys = k_flat.index_select(0, slots).view(b, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = v_flat.index_select(0, slots).view(b, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.sinks is not None:
            out = sink_attention(q[:, :, None, :], keys, values, meta.decode_mask(self.window, self.chunk),
                                 self.sinks, self.scale)
            return out[:, :, 0, :]                                   # [B, NH, D]
        # A KV head's G query heads run as G queries of one head (GQA folded into the query
        # length; the mask [B, 1, 1, Lmax] is the same for all of them): 1.5 ms less per int8
        # decode step at batch 16 than SDPA's enable_gqa over single-query heads.
        g = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.view(b, self.num_kv_heads, g, self.head_dim), keys, values,
            attn_mask=meta.decode_mask(self.window, self.chunk, q.dtype), scale=self.scale)   # [B, NKV, G, D]
        return out.reshape(b, self.num_heads, self.head_dim)                            # [B, NH, D]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                 v_flat: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        rows = slice(chunk.q_start, chunk.q_end)
        if chunk.start_pos == 0:   # the whole context is this chunk: use it as computed
            keys, values = k[rows], v[rows]                          # [n, NKV, D]
        else:
            keys = k_flat.index_select(0, chunk.context_slots)      # [L, NKV, D]
            values = v_flat.index_select(0, chunk.context_slots)
        if self.sinks is not None:
            n = chunk.q_end - chunk.q_start
            mask = chunk.mask(self.window, q.device, self.chunk)
            mask = causal_mask(n, q.device) if mask is None else mask
            out = sink_attention(q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                 values.transpose(0, 1)[None], mask, self.sinks, self.scale)
            return out[0].transpose(0, 1)                            # [n, NH, D]
        mask = chunk.mask(self.window, q.device, self.chunk, q.dtype)
        out = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)                                # [n, NH, D]
