"""Rotary position embedding (RoPE) with the scaling types the supported MoE configs use.

Legend: T tokens, NH heads, D head dim.
The cos/sin table is built once for every position up to max_position and indexed per step,
so the per-token path does a gather and two multiply-adds, no trigonometry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeserve.models.config import RopeConfig, yarn_mscale


def inverse_frequencies(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [D/2] float32, attention scaling applied to cos and sin)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(inv_freq, rope, max_position), 1.0
    return _yarn(rope, dim, max_position)


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig, max_position: int) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the middle band blended.
    old_len = rope.original_max_position or max_position
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, scaled)


def _yarn(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, ramp between.
    factor = rope.factor
    original = rope.original_max_position or max_position
    attention_factor = rope.attention_factor
    if attention_factor is None:   # DeepSeek's mscale pair, else the paper's 0.1 ln(factor) + 1
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim) \
            if rope.mscale and rope.mscale_all_dim else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half: dims i and i + D/2 form a pair), as in Mixtral, Qwen-MoE and
    OLMoE; or `interleaved` (dims 2i and 2i + 1 form a pair), as DeepSeek's MLA. The interleaved
    output lists the rotated even dims, then the odd ones (transformers' DeepSeek-V3 layout): a
    fixed permutation of both queries and keys, so their dot products are unchanged."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int, interleaved: bool = False,
                 table_len: int | None = None) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_position = rope, head_dim, max_position
        self.interleaved = interleaved
        # Positions the tables hold: the served context (--max-model-len), not always the model's
        # max_position_embeddings (Llama-4-Scout's 10.5M positions would take 10.7 GB of tables).
        self.table_len = min(table_len or max_position, max_position)
        self.register_buffer("cos", torch.empty(self.table_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(self.table_len, head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)computes the float32 cos/sin tables; called after building on the meta device."""
        inv_freq, scaling = inverse_frequencies(self.rope, self.head_dim, self.max_position)
        positions = torch.arange(self.table_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)                 # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [P, D]
        self.cos = (emb.cos() * scaling).to(self.cos.device)
        self.sin = (emb.sin() * scaling).to(self.sin.device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, step_cache: dict | None = None) -> torch.Tensor:
        # positions [T]; x [T, heads, Dh] (queries and keys side by side: one pass for both). With
        # partial rotary (D < Dh: GLM-4.5, MiniMax-M2) only the first D dims of a head rotate.
        if self.head_dim < x.shape[-1]:
            rot, rest = x.split([self.head_dim, x.shape[-1] - self.head_dim], dim=-1)
            return torch.cat((self.forward(positions, rot, step_cache), rest), dim=-1)
        cos, sin = self.lookup(positions, x.dtype, step_cache)  # [T, 1, D] x2
        if self.interleaved:
            half = self.head_dim // 2
            cos, sin = cos[..., :half], sin[..., :half]          # [T, 1, D/2]: one angle per pair
            even, odd = x[..., 0::2], x[..., 1::2]
            return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
        return x * cos + _rotate_half(x) * sin

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype,
               step_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] of the step's positions; gathered once a step when given the step's cache."""
        key = (id(self), dtype)
        if step_cache is not None and key in step_cache:
            return step_cache[key]
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)
        if step_cache is not None:
            step_cache[key] = (cos, sin)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
