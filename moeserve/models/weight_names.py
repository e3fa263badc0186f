"""Checkpoint tensor names per architecture, as data. Read by the loader only.

Each moeserve parameter is built from one or more checkpoint tensors concatenated along dim 0
(q/k/v fuse into qkv; gate/up into gate_up). Routed experts are stacked over the expert index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ExpertNames:
    prefix: str          # under the layer prefix, e.g. "block_sparse_moe.experts"
    gate: str            # per-expert names, after "{prefix}.{e}."
    up: str
    down: str
    fused_gate_up: str = "gate_up_proj"   # fused 3-D layout some checkpoints use on disk
    fused_down: str = "down_proj"
    # Fused layouts stored for x @ W, [E, in, out] (gpt-oss, Llama 4; gpt-oss's MXFP4 blocks are
    # [E, out, in] all the same): transposed at load. gpt-oss also alternates gate and up along 2I
    # and keeps biases beside the weights.
    fused_transposed: bool = False
    gate_up_interleaved: bool = False
    fused_gate_up_bias: str = "gate_up_proj_bias"
    fused_down_bias: str = "down_proj_bias"


@dataclass(frozen=True)
class WeightNames:
    layer_prefix: str                      # "model.layers.{i}."
    layer_map: dict[str, tuple[str, ...]]  # moeserve suffix -> checkpoint suffixes to concatenate
    experts: ExpertNames
    top_map: dict[str, tuple[str, ...]]    # non-layer parameters


_ATTN = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.o.weight": ("self_attn.o_proj.weight",),
    "attn.o.bias": ("self_attn.o_proj.bias",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
}
_TOP = {
    "embed.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
_QWEN_LAYER = {
    **_ATTN,
    "moe.router.weight": ("mlp.gate.weight",),
    "moe.shared.gate_up.weight": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
    "moe.shared.down.weight": ("mlp.shared_expert.down_proj.weight",),
    "moe.shared_gate.weight": ("mlp.shared_expert_gate.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight",),
}
_QWEN_EXPERTS = ExpertNames("mlp.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight")

_DEEPSEEK_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    # the query's first projection fused with kv_a_proj_with_mqa (q_lora_rank null / set)
    "attn.q_kv_a.weight": ("self_attn.q_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    "attn.q_a_kv_a.weight": ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    "attn.q_a_norm.weight": ("self_attn.q_a_layernorm.weight",),
    "attn.q_b.weight": ("self_attn.q_b_proj.weight",),
    "attn.kv_a_norm.weight": ("self_attn.kv_a_layernorm.weight",),
    "attn.kv_b_weight": ("self_attn.kv_b_proj.weight",),
    "attn.o.weight": ("self_attn.o_proj.weight",),
    "moe.router.weight": ("mlp.gate.weight",),
    "moe.score_bias": ("mlp.gate.e_score_correction_bias",),
    "moe.shared.gate_up.weight": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "moe.shared.down.weight": ("mlp.shared_experts.down_proj.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight",),
}

_DEEPSEEK_MLP = {k: v for k, v in _DEEPSEEK_LAYER.items() if k.startswith(("moe.", "mlp."))}
_GLM4_MOE_LAYER = {**_ATTN, **_DEEPSEEK_MLP}     # GQA attention, DeepSeek-V3's MoE names
_MINIMAX_M2_LAYER = {
    **_ATTN,
    "moe.router.weight": ("block_sparse_moe.gate.weight",),
    "moe.score_bias": ("block_sparse_moe.e_score_correction_bias",),
}
_GPT_OSS_LAYER = {
    **_ATTN,
    "attn.sinks": ("self_attn.sinks",),
    "moe.router.weight": ("mlp.router.weight",),
    "moe.router.bias": ("mlp.router.bias",),
}
_GPT_OSS_EXPERTS = ExpertNames("mlp.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                               fused_transposed=True, gate_up_interleaved=True)
_LLAMA4_LAYER = {
    **_ATTN,
    "moe.router.weight": ("feed_forward.router.weight",),
    "moe.shared.gate_up.weight": ("feed_forward.shared_expert.gate_proj.weight",
                                  "feed_forward.shared_expert.up_proj.weight"),
    "moe.shared.down.weight": ("feed_forward.shared_expert.down_proj.weight",),
    "mlp.gate_up.weight": ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight"),
    "mlp.down.weight": ("feed_forward.down_proj.weight",),
}
# Only the fused layout exists for Llama 4; the per-expert names are never present.
_LLAMA4_EXPERTS = ExpertNames("feed_forward.experts", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                              fused_transposed=True)

WEIGHT_NAMES: dict[str, WeightNames] = {
    "mixtral": WeightNames(
        "model.layers.{i}.",
        {**_ATTN, "moe.router.weight": ("block_sparse_moe.gate.weight",)},
        ExpertNames("block_sparse_moe.experts", "w1.weight", "w3.weight", "w2.weight"),
        _TOP),
    "qwen2_moe": WeightNames("model.layers.{i}.", _QWEN_LAYER, _QWEN_EXPERTS, _TOP),
    "qwen3_moe": WeightNames("model.layers.{i}.", _QWEN_LAYER, _QWEN_EXPERTS, _TOP),
    "olmoe": WeightNames("model.layers.{i}.", _QWEN_LAYER, _QWEN_EXPERTS, _TOP),
    # DeepSeek-V3 checkpoints also hold the multi-token-prediction layer (model.layers.61 in V3);
    # it is never read: only the layers the config counts are.
    "deepseek_v2": WeightNames("model.layers.{i}.", _DEEPSEEK_LAYER, _QWEN_EXPERTS, _TOP),
    "deepseek_v3": WeightNames("model.layers.{i}.", _DEEPSEEK_LAYER, _QWEN_EXPERTS, _TOP),
    # GLM-4.5 checkpoints carry their next-token-prediction layer after the last one: never read.
    "glm4_moe": WeightNames("model.layers.{i}.", _GLM4_MOE_LAYER, _QWEN_EXPERTS, _TOP),
    "minimax_m2": WeightNames(
        "model.layers.{i}.", _MINIMAX_M2_LAYER,
        ExpertNames("block_sparse_moe.experts", "w1.weight", "w3.weight", "w2.weight"), _TOP),
    "gpt_oss": WeightNames("model.layers.{i}.", _GPT_OSS_LAYER, _GPT_OSS_EXPERTS, _TOP),
    "llama4": WeightNames("model.layers.{i}.", _LLAMA4_LAYER, _LLAMA4_EXPERTS, _TOP),
}
# Where the text model's tensors live in a vision-language checkpoint (MoEModelConfig.multimodal):
# Llama4ForConditionalGeneration keeps its Llama4ForCausalLM as `language_model` (the hub's
# Llama-4-Scout / Maverick checkpoints too); the vision tower's tensors are never read.
MULTIMODAL_TEXT_PREFIX: dict[str, str] = {"llama4": "language_model."}


def weight_names(architecture: str, multimodal: bool = False) -> WeightNames:
    """The names to read for a checkpoint: the text-only ones, under the vision-language prefix if any."""
    names = WEIGHT_NAMES[architecture]
    if not multimodal:
        return names
    prefix = MULTIMODAL_TEXT_PREFIX[architecture]
    top = {ours: tuple(prefix + n for n in theirs) for ours, theirs in names.top_map.items()}
    return replace(names, layer_prefix=prefix + names.layer_prefix, top_map=top)
