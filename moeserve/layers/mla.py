"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv 2405.04434) over a paged latent cache.

Legend: T tokens in the step, B decode sequences, L context length, NH heads, H hidden,
R kv_lora_rank (latent), DR qk_rope_head_dim, DN qk_nope_head_dim, DV v_head_dim, QR q_lora_rank,
NB KV blocks, BS block size.

Each token caches one row of R + DR values per layer: its normalised latent c and its rope key
k_pe, shared by every head (per-head K and V would be NH * (DN + DR + DV) values). Head h's key
is [W_uk[h] c, k_pe] and its value W_uv[h] c, with W_uk [NH, DN, R] and W_uv [NH, DV, R] the two
parts of kv_b_proj.
- Decode (absorbed, as DeepSeek's and vLLM's MLA): q_nope . (W_uk c) = (W_uk^T q_nope) . c, so
  each query is projected once into the latent space and attends over the cached rows directly;
  all NH heads share those rows, so they run as NH queries of one single-head attention. The
  output, a mix of latents, goes through W_uv once. Nothing per-head is built from the context.
- Prefill (expanded): a chunk has many queries, so expanding its context to per-head K and V
  once (one GEMM through kv_b) and running ordinary attention is cheaper than absorbing.
kv_b_proj is split once at load into contiguous W_uk and W_uv (split_kv_b).
`absorb=False` decodes the expanded way too (for benchmarks: scripts/bench_mla.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.attention import AttentionMetadata, PrefillChunk
from moeserve.layers.linear import Linear, linear
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.models.config import MoEModelConfig

_LORA_NORM_EPS = 1e-6   # q_a_layernorm / kv_a_layernorm: DeepSeek builds them with the default eps


class MLAttention(nn.Module):
    def __init__(self, cfg: MoEModelConfig, layer_idx: int, rotary: RotaryEmbedding, absorb: bool = True) -> None:
        super().__init__()
        mla = cfg.mla
        if cfg.sliding_windows[layer_idx] is not None:
            raise ValueError("MLA layers have no sliding window")
        self.num_heads, self.absorb = cfg.num_heads, absorb
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.rank, self.latent_dim = mla.kv_lora_rank, mla.latent_dim
        q_out = cfg.num_heads * mla.qk_head_dim
        self.q_lora = mla.q_lora_rank
        # The query's first projection and kv_a_proj_with_mqa both read x: fused, one weight read.
        if self.q_lora:
            self.q_a_kv_a = Linear(cfg.hidden_size, self.q_lora + self.latent_dim, bias=False)
            self.q_a_norm = RMSNorm(self.q_lora, _LORA_NORM_EPS)
            self.q_b = Linear(self.q_lora, q_out, bias=False)
        else:
            self.q_kv_a = Linear(cfg.hidden_size, q_out + self.latent_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.rank, _LORA_NORM_EPS)
        # kv_b_proj as loaded [NH * (DN + DV), R]; split_kv_b() turns it into W_uk and W_uv.
        self.kv_b_weight = nn.Parameter(torch.empty(cfg.num_heads * (self.nope + self.v_dim), self.rank))
        self.w_uk: torch.Tensor | None = None        # [NH, DN, R]
        self.w_uv: torch.Tensor | None = None        # [NH, DV, R]
        self.o = Linear(cfg.num_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x [T, H]; kv_cache [NB, BS, R + DR] -> [T, H]
        q, latent = self._project(x, meta)                   # [T, NH, DN + DR], [T, R + DR]
        cache = kv_cache.view(-1, self.latent_dim)           # [NB*BS, R + DR]
        cache.index_copy_(0, meta.slot_mapping, latent)
        decode = self._decode_absorbed if self.absorb else self._decode_expanded
        if not meta.prefills:
            out = decode(q, cache, meta)                     # [T, NH, DV]
        else:
            out = q.new_empty(q.shape[0], self.num_heads, self.v_dim)
            if meta.num_decodes:
                out[: meta.num_decodes] = decode(q[: meta.num_decodes], cache, meta)
            for chunk in meta.prefills:
                out[chunk.q_start: chunk.q_end] = self._prefill(q, latent, cache, chunk)
        return self.o(out.reshape(out.shape[0], -1))

    def _project(self, x: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [T, NH, DN + DR] and cache rows [T, R + DR] (normed latent, rotated k_pe)."""
        t = x.shape[0]
        if self.q_lora:
            q_a, kv = self.q_a_kv_a(x).split([self.q_lora, self.latent_dim], dim=-1)
            q = self.q_b(self.q_a_norm(q_a))                                # [T, NH * (DN + DR)]
        else:
            q, kv = self.q_kv_a(x).split([self.num_heads * (self.nope + self.rope_dim), self.latent_dim], dim=-1)
        q = q.view(t, self.num_heads, self.nope + self.rope_dim)
        c, k_pe = kv.split([self.rank, self.rope_dim], dim=-1)              # [T, R], [T, DR]
        # Rope once over the NH query parts and the one shared key part together: [T, NH + 1, DR].
        pe = self.rotary(meta.positions, torch.cat((q[..., self.nope:], k_pe[:, None, :]), dim=1), meta.rope_cache)
        q = torch.cat((q[..., : self.nope], pe[:, : self.num_heads]), dim=-1)
        return q, torch.cat((self.kv_a_norm(c), pe[:, self.num_heads]), dim=-1)

    @torch.no_grad()
    def split_kv_b(self) -> None:
        """kv_b_proj -> contiguous W_uk and W_uv (after loading). bmm over the strided halves of
        kv_b copied them every call: 0.15 + 0.62 ms a layer per decode step vs 0.08 + 0.08."""
        w = self.kv_b_weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = nn.Parameter(w[:, : self.nope].contiguous(), requires_grad=False)
        self.w_uv = nn.Parameter(w[:, self.nope:].contiguous(), requires_grad=False)
        self.kv_b_weight = None

    def _decode_absorbed(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [B, NH, DN + DR] -> [B, NH, DV]
        b, lmax = meta.decode_slots.shape
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk)             # [NH, B, DN] @ [NH, DN, R] -> [NH, B, R]
        query = torch.cat((q_latent.transpose(0, 1), q_pe), dim=-1)         # [B, NH, R + DR]
        rows = cache.index_select(0, meta.decode_slots.reshape(-1)).view(b, 1, lmax, self.latent_dim)
        # The NH heads share one key/value set: NH queries of a single-head attention. The values
        # are the whole rows (the rope part's outputs are dropped after): with one head dim for
        # queries, keys and values SDPA takes its fused kernel, 0.84 ms instead of 6.3 ms a layer
        # at batch 16 over 512 tokens (the latent-only values sent it down the math path).
        out = F.scaled_dot_product_attention(
            query[:, None], rows, rows, attn_mask=meta.decode_mask(None, dtype=query.dtype), scale=self.scale)[..., : self.rank]
        out = torch.bmm(out[:, 0].transpose(0, 1), self.w_uv.transpose(1, 2))  # [NH, B, R] @ [NH, R, DV] -> [NH, B, DV]
        return out.transpose(0, 1)

    def _decode_expanded(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [B, NH, DN + DR] -> [B, NH, DV]; every step re-expands every context row per head
        b, lmax = meta.decode_slots.shape
        keys, values = self._expand(cache.index_select(0, meta.decode_slots.reshape(-1)))  # [B*L, NH, *]
        keys = keys.view(b, lmax, self.num_heads, -1).transpose(1, 2)       # [B, NH, L, DN + DR]
        values = values.view(b, lmax, self.num_heads, -1).transpose(1, 2)   # [B, NH, L, DV]
        out = _attention(q[:, :, None], keys, values, attn_mask=meta.decode_mask(None, dtype=q.dtype), scale=self.scale)
        return out[:, :, 0]

    def _prefill(self, q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor,
                 chunk: PrefillChunk) -> torch.Tensor:
        rows = slice(chunk.q_start, chunk.q_end)
        context = latent[rows] if chunk.start_pos == 0 else cache.index_select(0, chunk.context_slots)
        keys, values = self._expand(context)                                # [L, NH, DN + DR], [L, NH, DV]
        mask = chunk.mask(None, q.device, dtype=q.dtype)
        out = _attention(q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                         attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out[0].transpose(0, 1)                                       # [n, NH, DV]

    def _expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [N, R + DR] -> per-head keys [N, NH, DN + DR] and values [N, NH, DV]."""
        n, latent = rows.shape[0], rows[:, : self.rank]
        k_nope = linear(latent, self.w_uk.view(-1, self.rank)).view(n, self.num_heads, self.nope)
        values = linear(latent, self.w_uv.view(-1, self.rank)).view(n, self.num_heads, self.v_dim)
        k_pe = rows[:, None, self.rank:].expand(n, self.num_heads, self.rope_dim)
        return torch.cat((k_nope, k_pe), dim=-1), values


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA with values narrower than queries and keys (DV < DN + DR): values zero-padded to the
    key width, the output cut back. On CPU, SDPA's fused (flash) kernel wants one head dim for all
    three; otherwise it takes the math path, which materialises every [NH, n, L] score: a
    512-token chunk over 2,048 keys (16 heads) took 126 ms that way, 16.5 ms padded.
    q [.., n, DQK], keys [.., L, DQK], values [.., L, DV] -> [.., n, DV]."""
    dv = values.shape[-1]
    if dv == q.shape[-1]:
        return F.scaled_dot_product_attention(q, keys, values, **kwargs)
    padded = F.pad(values, (0, q.shape[-1] - dv))
    return F.scaled_dot_product_attention(q, keys, padded, **kwargs)[..., :dv]
