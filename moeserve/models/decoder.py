"""The decoder shared by every supported architecture (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2/V3,
GLM-4.5, MiniMax-M2, gpt-oss, Llama 4).

These differ only in what MoEModelConfig already says (GQA or latent attention, q/k norm, shared
expert, biases, router policy, dense layers, sliding windows), so one readable model serves them
all; the checkpoint names that differ live in models/weight_names.py, read by the loader only.

Legend: T tokens in the step, H hidden, V vocab, E experts, NB KV blocks, BS block size.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moeserve.layers.linear import Linear

from moeserve.layers.attention import Attention, AttentionMetadata
from moeserve.layers.mla import MLAttention
from moeserve.layers.experts import ExpertOptions
from moeserve.layers.moe import DenseMLP, MoELayer, MoEShape
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.models.config import MoEModelConfig, routing_config
from moeserve.parallel.expert_parallel import ExpertParallel


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEModelConfig, layer_idx: int, rotary: RotaryEmbedding,
                 moe_shape: MoEShape | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, layer_idx, rotary) if cfg.mla else Attention(cfg, layer_idx, rotary)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoELayer(moe_shape) if moe_shape is not None else None
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size) if moe_shape is None else None

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                counts_out: torch.Tensor | None) -> torch.Tensor:
        # x [T, H]; counts_out [2, E] this layer's running (routed, dropped) totals, or None
        x = x + self.attn(self.attn_norm(x), kv_cache, meta)
        h = self.mlp_norm(x)
        if self.moe is None:
            return x + self.mlp(h)
        out, routing = self.moe(h)
        if counts_out is not None:    # cumulative, on the device: no host sync
            counts_out[0].add_(routing.counts)
            if routing.capacity_limited:
                counts_out[1].add_(routing.dropped)
        return x + out


def _expert_options(cfg: MoEModelConfig) -> ExpertOptions:
    return ExpertOptions(activation=cfg.expert_activation, bias=cfg.expert_bias, alpha=cfg.swiglu_alpha,
                         limit=cfg.swiglu_limit)


class MoEDecoder(nn.Module):
    def __init__(self, cfg: MoEModelConfig, first_expert: int = 0, num_local_experts: int | None = None,
                 max_positions: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings, table_len=max_positions,
                                 interleaved=cfg.rope_interleaved)
        routing = routing_config(cfg.router, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob)
        moe_shape = MoEShape(
            hidden=cfg.hidden_size, intermediate=cfg.moe_intermediate_size, routing=routing,
            shared_intermediate=cfg.shared_expert_intermediate_size, shared_gated=cfg.shared_expert_gated,
            first_expert=first_expert, num_local=num_local_experts, correction_bias=cfg.router.correction_bias,
            router_bias=cfg.router_bias, experts=_expert_options(cfg), weight_input=cfg.moe_weight_input,
            router_fp32=cfg.router.float32_logits)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rotary, moe_shape if cfg.moe_layers[i] else None) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # Running totals of routes per (MoE layer, expert), kept on the device and read by metrics
        # at scrape time; dropped routes (capacity limits) beside them. count_experts=False skips it.
        self.register_buffer("expert_totals", torch.zeros(cfg.num_moe_layers, 2, cfg.num_experts, dtype=torch.int64),
                             persistent=False)
        self.count_experts = True
        self._moe_row = [sum(cfg.moe_layers[:i]) for i in range(cfg.num_layers)]

    def tie_weights(self) -> None:
        """Shares the embedding with lm_head when the config says so (Module.to_empty unties them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def post_load(self) -> None:
        """Fills the non-checkpoint buffers after the model was built on the meta device."""
        self.layers[0].attn.rotary.reset_tables()
        for layer in self.layers:
            if isinstance(layer.attn, MLAttention):
                layer.attn.split_kv_b()
        self.expert_totals.zero_()
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: torch.Tensor) -> torch.Tensor:
        # input_ids [T]; kv_caches [layers, *kv_cache_layer_shape] -> hidden [T, H] (final-normed)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            row = self.expert_totals[self._moe_row[i]] if layer.moe is not None and self.count_experts else None
            x = layer(x, kv_caches[i], meta, row)
        return self.norm(x)

    def attach_expert_parallel(self, ep: "ExpertParallel") -> None:
        """Every MoE layer exchanges tokens over ep from now on (models/loader read only this
        rank's experts)."""
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.ep = ep

    @torch.no_grad()
    def serve_peers(self) -> None:
        """alltoall mode, a rank with no tokens this step: take part in every MoE layer's exchange."""
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.serve_peers(self.cfg.hidden_size, self.embed.weight.dtype, self.embed.weight.device)

    @property
    def expert_tokens(self) -> torch.Tensor:
        return self.expert_totals[:, 0]     # [L_moe, E] routes chosen, before any capacity drop

    @property
    def expert_dropped(self) -> torch.Tensor:
        return self.expert_totals[:, 1]     # [L_moe, E] routes dropped by a capacity limit

    def set_capacity(self, capacity_factor: float | None, min_capacity: int, drop_policy: str) -> None:
        """Applies the serving knobs (--capacity-factor ...) to every MoE layer's router."""
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.routing_cfg = dataclasses.replace(
                    layer.moe.routing_cfg, capacity_factor=capacity_factor, min_capacity=min_capacity,
                    drop_policy=drop_policy)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()    # [n, H] -> [n, V] float32 for the sampler
