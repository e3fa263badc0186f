"""MoEModelConfig: a Hugging Face config.json normalised once into one frozen dataclass.

This module and models/families.py (one parsing function per model family) are the only ones
that know Hugging Face attribute names. Everything else reads the normalised fields, so a new
architecture means its name in the maps here and one more function there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moeserve.errors import CheckpointError

if TYPE_CHECKING:
    from moeserve.layers.routing import RoutingConfig   # layers import this module

Architecture = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                       "minimax_m2", "gpt_oss", "llama4"]
QKNorm = Literal["none", "per_head", "full", "l2_rope"]   # l2_rope: Llama 4's weightless L2 norm after rope
RopeType = Literal["default", "linear", "llama3", "yarn"]
# What an expert computes between its two projections: SwiGLU silu(gate) * up, or gpt-oss's
# clamped variant (gate clamped above, up both sides, gate * sigmoid(alpha * gate) * (up + 1)).
ExpertActivation = Literal["swiglu", "clamped_swiglu"]

# HF `architectures[0]` -> moeserve architecture. The registry maps these to model classes.
HF_ARCHITECTURES: dict[str, Architecture] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "GptOssForCausalLM": "gpt_oss",
    "Llama4ForCausalLM": "llama4",
    "Llama4ForConditionalGeneration": "llama4",   # its text model only: vision weights are never read
}
MODEL_TYPES: dict[str, Architecture] = {
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
    "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "glm4_moe": "glm4_moe", "minimax_m2": "minimax_m2",
    "gpt_oss": "gpt_oss", "llama4_text": "llama4", "llama4": "llama4",
}
# Checkpoint weight formats the loader converts (see models/weight_conversion.py); any other
# quantization_config.quant_method is refused by name rather than loaded as garbage.
CHECKPOINT_QUANT_METHODS = ("fp8", "mxfp4")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0        # llama3
    high_freq_factor: float = 4.0       # llama3
    beta_fast: float = 32.0             # yarn
    beta_slow: float = 1.0              # yarn
    attention_factor: float | None = None   # yarn: cos/sin scale; None = from factor and mscale
    mscale: float | None = None         # yarn (DeepSeek): numerator of the attention factor
    mscale_all_dim: float | None = None  # yarn (DeepSeek): its denominator, and the softmax scale
    truncate: bool = True               # yarn


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one low-rank latent
    per token, kv_lora_rank wide, plus one shared rope key qk_rope_head_dim wide."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None      # None: queries from one full projection

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:       # what the KV cache keeps per token and layer
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RouterSpec:
    """How a checkpoint's router turns logits into expert weights (see layers/routing.py)."""
    scoring: Literal["softmax", "sigmoid", "softmax_topk"] = "softmax"
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    correction_bias: bool = False       # DeepSeek-V3: e_score_correction_bias steers the choice
    select_on_logits: bool = False      # Llama 4: top-k over the raw logits (sigmoid saturates: ties)
    float32_logits: bool = False        # DeepSeek, GLM-4.5: router weight and logits in float32


@dataclass(frozen=True)
class CheckpointQuant:
    """Weights stored quantized on disk, dequantized at load (quantization_config)."""
    method: Literal["fp8", "mxfp4"]
    block_size: tuple[int, int] | None = None   # fp8: [rows, cols] covered by one weight_scale_inv entry


@dataclass(frozen=True)
class MoEModelConfig:
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int              # dense MLP (layers that are not MoE)
    moe_intermediate_size: int          # one routed expert
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[bool, ...]        # per layer: MoE block (True) or dense MLP (False)
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gated: bool = False   # Qwen2-MoE: sigmoid(Linear(H, 1)) scales the shared expert
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    qk_norm: QKNorm = "none"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()   # per layer, None = full attention
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    dtype: str = "float32"              # checkpoint's declared torch dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mla: MLAConfig | None = None        # set: latent attention instead of GQA
    rope_dim: int | None = None         # partial rotary: RoPE on the first rope_dim dims of a head
    router: RouterSpec = field(default_factory=RouterSpec)
    checkpoint_quant: CheckpointQuant | None = None
    attention_sinks: bool = False       # gpt-oss: a learned per-head logit joins each softmax denominator
    router_bias: bool = False           # gpt-oss: the router Linear has a bias
    expert_bias: bool = False           # gpt-oss: each expert's gate/up and down projections have biases
    expert_activation: ExpertActivation = "swiglu"
    swiglu_alpha: float = 1.702         # clamped_swiglu: sigmoid gain
    swiglu_limit: float = 7.0           # clamped_swiglu: clamp of gate (above) and up (both sides)
    # Llama 4 (empty / default = every other architecture):
    attention_chunks: tuple[int | None, ...] = ()   # per layer: attend only within chunks of positions
    rope_layers: tuple[bool, ...] = ()  # per layer: rotary applied (False = NoPE); empty = every layer
    rope_interleaved: bool = False      # rope over pairs (2i, 2i + 1) (complex rope: DeepSeek, Llama 4)
    attn_temperature: tuple[float, float] | None = None   # NoPE layers' query scale (floor_scale, attn_scale)
    moe_weight_input: bool = False      # the router weight scales each expert's input, not its output
    multimodal: bool = False            # the text model of a vision-language checkpoint

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise CheckpointError(f"num_experts_per_tok ({self.top_k}) must be in [1, {self.num_experts}]")
        if len(self.moe_layers) != self.num_layers:
            raise CheckpointError("moe_layers must have one entry per layer")
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def rotary_dim(self) -> int:
        if self.mla:
            return self.mla.qk_rope_head_dim
        return self.rope_dim or self.head_dim

    @property
    def kv_values_per_token(self) -> int:
        """Cache entries one token keeps per layer: the latent (MLA) or K and V of every KV head."""
        return self.mla.latent_dim if self.mla else 2 * self.num_kv_heads * self.head_dim

    def kv_cache_layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's paged cache: [NB, BS, R + DR] latent rows (MLA), else [2, NB, BS, NKV, D]."""
        if self.mla:
            return (num_blocks, block_size, self.mla.latent_dim)
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk head dim); DeepSeek's YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
        scale = self.head_dim ** -0.5
        rope = self.rope
        if self.mla and rope.type != "default" and rope.mscale_all_dim:
            scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
        return scale

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "MoEModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found; is {model_dir} a Hugging Face checkpoint directory?")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read config.json: {exc}") from exc
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "MoEModelConfig":
        from moeserve.models.families import parse_family   # it builds this class

        return parse_family(raw, _architecture(raw, source), source)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def supported_architectures() -> list[str]:
    return sorted(HF_ARCHITECTURES)


def _architecture(raw: dict, source: str) -> Architecture:
    names = raw.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if not names and raw.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[raw["model_type"]]
    found = names or [raw.get("model_type")]
    raise CheckpointError(
        f"{source}: unsupported architecture {found}; supported: {', '.join(supported_architectures())}")


def routing_from_hf(raw: dict) -> "RoutingConfig":
    """The router policy a checkpoint was trained with, from its config.json (see RouterSpec)."""
    from moeserve.models.families import deepseek_router

    model_type = raw.get("model_type")
    if model_type in ("deepseek_v2", "deepseek_v3"):
        spec = deepseek_router(raw, model_type)
        renormalize = model_type == "deepseek_v3" and bool(raw.get("norm_topk_prob", True))
        return routing_config(spec, raw["n_routed_experts"], raw["num_experts_per_tok"], renormalize)
    cfg = MoEModelConfig.from_hf(raw)
    return routing_config(cfg.router, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob)


def routing_config(spec: RouterSpec, num_experts: int, top_k: int, renormalize: bool) -> "RoutingConfig":
    from moeserve.layers.routing import RoutingConfig

    return RoutingConfig(
        num_experts=num_experts, top_k=top_k, scoring=spec.scoring, renormalize=renormalize,
        routed_scaling_factor=spec.routed_scaling_factor, n_group=spec.n_group, topk_group=spec.topk_group,
        group_score=spec.group_score, select_on_logits=spec.select_on_logits)
