"""MoEModelConfig: a Hugging Face config.json normalised once into one frozen dataclass.

This is the only module that knows Hugging Face attribute names. Everything else reads the
normalised fields, so a new architecture means one more `_from_<family>` function here.
"""

from __future__ import annotations

import dataclasses
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
    rope_interleave: bool = True        # rope over interleaved pairs (x0, x1), (x2, x3), ...

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
    rope_interleaved: bool = False      # rope over pairs (2i, 2i + 1) (complex rope), GQA layers too
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
        arch = _architecture(raw, source)
        quant = _checkpoint_quant(raw, source)
        try:
            cfg = _FAMILIES[arch](raw, arch)
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing required field {exc.args[0]!r} for {arch}") from exc
        return dataclasses.replace(cfg, checkpoint_quant=quant) if quant else cfg


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


def _rope(raw: dict) -> RopeConfig:
    # v5 writes rope_parameters; older hub configs have rope_theta + rope_scaling.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported (default, linear, llama3, yarn)")
    return RopeConfig(
        theta=float(theta), type=rope_type, factor=_rope_factor(raw, params),
        original_max_position=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
    )


def _rope_factor(raw: dict, params: dict) -> float:
    factor = params.get("factor")
    if factor is None and params.get("original_max_position_embeddings"):   # yarn: from the two lengths
        return raw.get("max_position_embeddings", 4096) / params["original_max_position_embeddings"]
    return float(1.0 if factor is None else factor)


def _checkpoint_quant(raw: dict, source: str) -> CheckpointQuant | None:
    qcfg = raw.get("quantization_config")
    if not qcfg:
        return None
    method = qcfg.get("quant_method")
    if method == "mxfp4":   # gpt-oss: e2m1 blocks + e8m0 scales, 32 values a scale; no other parameter
        return CheckpointQuant(method="mxfp4")
    if method not in CHECKPOINT_QUANT_METHODS:
        raise CheckpointError(
            f"{source}: quantization_config.quant_method {method!r} is not supported (moeserve loads "
            f"{', '.join(CHECKPOINT_QUANT_METHODS)} checkpoints, or unquantized ones with --quantization int8)")
    block = qcfg.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{source}: fp8 checkpoints are loaded with block scales (weight_block_size [rows, cols] and "
            f"weight_scale_inv tensors, as DeepSeek-V3 ships them); weight_block_size is {block!r}")
    return CheckpointQuant(method="fp8", block_size=(block[0], block[1]))


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict, arch: Architecture) -> dict:
    heads = raw["num_attention_heads"]
    layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") or None
    layer_types = raw.get("layer_types")
    if layer_types:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    elif arch == "mixtral":
        windows = (window,) * layers
    elif raw.get("use_sliding_window") and window:
        start = raw.get("max_window_layers", 0)
        windows = tuple(window if i >= start else None for i in range(layers))
    else:
        windows = (None,) * layers
    return dict(
        architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope=_rope(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        sliding_windows=windows, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=raw.get("hidden_act", "silu"),
        dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos_ids(raw),
    )


def _mixtral(raw: dict, arch: Architecture) -> MoEModelConfig:
    common = _common(raw, arch)
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=raw["intermediate_size"],
        num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], norm_topk_prob=True,
        moe_layers=(True,) * common["num_layers"],
    )


def _qwen_moe(raw: dict, arch: Architecture) -> MoEModelConfig:
    common = _common(raw, arch)
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = set(raw.get("mlp_only_layers") or [])
    moe_layers = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0
                       for i in range(common["num_layers"]))
    shared = raw.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
    qkv_bias = raw.get("qkv_bias", True) if arch == "qwen2_moe" else raw.get("attention_bias", False)
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=num_experts, top_k=raw["num_experts_per_tok"], norm_topk_prob=bool(raw.get("norm_topk_prob")),
        moe_layers=moe_layers, shared_expert_intermediate_size=shared, shared_expert_gated=shared > 0,
        qk_norm="per_head" if arch == "qwen3_moe" else "none", qkv_bias=qkv_bias,
        o_bias=arch == "qwen3_moe" and bool(raw.get("attention_bias")),
    )


def _olmoe(raw: dict, arch: Architecture) -> MoEModelConfig:
    common = _common(raw, arch)
    bias = bool(raw.get("attention_bias", False))
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=raw["intermediate_size"],
        num_experts=raw["num_experts"], top_k=raw["num_experts_per_tok"],
        norm_topk_prob=bool(raw.get("norm_topk_prob")), moe_layers=(True,) * common["num_layers"],
        qk_norm="full", qkv_bias=bias, o_bias=bias, clip_qkv=raw.get("clip_qkv"),
    )


def _deepseek(raw: dict, arch: Architecture) -> MoEModelConfig:
    """DeepSeek-V2 / V2-Lite / V2.5, DeepSeek-V3 / V3.1 / R1, and the V3 architecture reused by
    Kimi-K2 and Moonlight: MLA, dense first layers, shared experts, DeepSeekMoE routing."""
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{arch}: attention_bias / mlp_bias are not supported (no DeepSeek checkpoint sets them)")
    if not raw.get("n_routed_experts"):
        raise CheckpointError(f"{arch}: n_routed_experts is not set: a dense model, not an MoE checkpoint")
    common = _common(raw, arch)
    mla = MLAConfig(
        kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
        qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"], q_lora_rank=raw.get("q_lora_rank"),
        rope_interleave=bool(raw.get("rope_interleave", True)) if arch == "deepseek_v3" else True)
    common.update(num_kv_heads=common["num_heads"], head_dim=mla.qk_head_dim)   # MLA has no KV heads
    first_dense, freq = raw.get("first_k_dense_replace") or 0, raw.get("moe_layer_freq") or 1
    moe_layers = tuple(i >= first_dense and i % freq == 0 for i in range(common["num_layers"]))
    moe_inter = raw["moe_intermediate_size"]
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=moe_inter,
        num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)) if arch == "deepseek_v3" else False,
        moe_layers=moe_layers, shared_expert_intermediate_size=moe_inter * (raw.get("n_shared_experts") or 0),
        mla=mla, router=_deepseek_router(raw, arch))


def _deepseek_router(raw: dict, arch: Architecture) -> RouterSpec:
    """DeepSeek-V2: softmax, greedy or group_limited_greedy (group score = max), times
    routed_scaling_factor, never renormalised (as transformers' V2 router). DeepSeek-V3: sigmoid
    scores, e_score_correction_bias for choosing only, grouped top-k (group score = sum of the
    top 2), renormalised if norm_topk_prob, times routed_scaling_factor."""
    scale = float(raw.get("routed_scaling_factor") or 1.0)
    method, scoring = raw.get("topk_method"), raw.get("scoring_func")
    known = ("greedy", "group_limited_greedy", None) if arch == "deepseek_v2" else ("noaux_tc", None)
    if method not in known or scoring not in ((None, "softmax") if arch == "deepseek_v2" else (None, "sigmoid")):
        raise CheckpointError(f"{arch}: router topk_method={method!r} scoring_func={scoring!r} is not supported "
                              f"(topk_method {' / '.join(m for m in known if m)})")
    if arch == "deepseek_v2":
        grouped = raw.get("topk_method", "greedy") == "group_limited_greedy"
        return RouterSpec(scoring="softmax", routed_scaling_factor=scale,
                          n_group=raw.get("n_group") or 1 if grouped else 1,
                          topk_group=raw.get("topk_group") or 1 if grouped else 1, group_score="max")
    return RouterSpec(scoring="sigmoid", routed_scaling_factor=scale, n_group=raw.get("n_group") or 1,
                      topk_group=raw.get("topk_group") or 1, group_score="top2_sum", correction_bias=True)


def _partial_rope_dim(raw: dict, head_dim: int) -> int | None:
    """Rotary dims of a head when only part of it rotates (GLM-4.5, MiniMax-M2), else None."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    dim = raw.get("rotary_dim") or (int(head_dim * factor) if factor else None)
    if dim is not None and not (0 < dim <= head_dim and dim % 2 == 0):
        raise CheckpointError(f"rotary dims {dim} must be even and in (0, head_dim {head_dim}]")
    return None if dim == head_dim else dim


def _glm4_moe(raw: dict, arch: Architecture) -> MoEModelConfig:
    """GLM-4.5 / 4.6 / Air: GQA with partial rotary, q/k/v bias, optional per-head q/k norm, and
    DeepSeek-V3's MoE (sigmoid routing with correction bias and groups, shared experts, dense
    first layers, routed_scaling_factor)."""
    common = _common(raw, arch)
    first_dense = raw.get("first_k_dense_replace") or 0
    moe_inter = raw["moe_intermediate_size"]
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=moe_inter,
        num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= first_dense for i in range(common["num_layers"])),
        shared_expert_intermediate_size=moe_inter * (raw.get("n_shared_experts") or 0),
        qk_norm="per_head" if raw.get("use_qk_norm") else "none", qkv_bias=bool(raw.get("attention_bias")),
        rope_dim=_partial_rope_dim(raw, common["head_dim"]),
        router=RouterSpec(scoring="sigmoid", routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
                          n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                          group_score="top2_sum", correction_bias=True))


def _minimax_m2(raw: dict, arch: Architecture) -> MoEModelConfig:
    """MiniMax-M2: Mixtral-shaped experts, sigmoid routing with a correction bias (renormalised
    over the top-k), q/k RMSNorm over the whole projection, partial rotary."""
    common = _common(raw, arch)
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise CheckpointError(f"minimax_m2: scoring_func {raw['scoring_func']!r} is not supported (sigmoid)")
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=raw["intermediate_size"],
        num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], norm_topk_prob=True,
        moe_layers=(True,) * common["num_layers"], qk_norm="full",
        rope_dim=_partial_rope_dim(raw, common["head_dim"]),
        router=RouterSpec(scoring="sigmoid", correction_bias=True))


def _gpt_oss(raw: dict, arch: Architecture) -> MoEModelConfig:
    """gpt-oss-20b / 120b: alternating sliding / full attention layers (layer_types) with attention
    sinks and q/k/v/o biases, YaRN; a biased router whose softmax runs over the chosen k only;
    experts with biases and the clamped SwiGLU."""
    common = _common(raw, arch)
    bias = bool(raw.get("attention_bias", True))
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=raw["intermediate_size"],
        num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], norm_topk_prob=True,
        moe_layers=(True,) * common["num_layers"], qkv_bias=bias, o_bias=bias,
        router=RouterSpec(scoring="softmax_topk"), attention_sinks=True, router_bias=True, expert_bias=True,
        expert_activation="clamped_swiglu", swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)))


def _llama4(raw: dict, arch: Architecture) -> MoEModelConfig:
    """Llama 4 Scout / Maverick (Llama4ForCausalLM, or the text model of Llama4ForConditionalGeneration):
    chunked local attention with rope, full-attention NoPE layers with query temperature tuning,
    top-1 sigmoid routing that scales the expert's input, a shared expert, interleaved dense layers.
    Absent fields take transformers' Llama4TextConfig defaults."""
    multimodal = "text_config" in raw
    text = _llama4_text(raw) if multimodal else dict(raw)
    text.setdefault("rope_theta", 500000.0)
    if text.get("attention_bias"):
        raise CheckpointError(f"{arch}: attention_bias is not supported (no Llama 4 checkpoint sets it)")
    common = _common(text, arch)
    layers = common["num_layers"]
    rope_layers = _llama4_rope_layers(text, layers)
    inter = text["intermediate_size"]   # one expert and the shared expert; dense layers: intermediate_size_mlp
    temperature = (float(text.get("floor_scale", 8192)), float(text.get("attn_scale", 0.1))) \
        if text.get("attn_temperature_tuning", True) else None
    return MoEModelConfig(
        **common, intermediate_size=text.get("intermediate_size_mlp", 16384), moe_intermediate_size=inter,
        num_experts=text.get("num_local_experts", 16), top_k=text.get("num_experts_per_tok", 1),
        norm_topk_prob=False, moe_layers=_llama4_moe_layers(text, layers), shared_expert_intermediate_size=inter,
        qk_norm="l2_rope" if text.get("use_qk_norm", True) else "none",
        router=RouterSpec(scoring="sigmoid", select_on_logits=True),
        attention_chunks=_llama4_chunks(text, rope_layers), rope_layers=rope_layers, rope_interleaved=True,
        attn_temperature=temperature, moe_weight_input=True, multimodal=multimodal)


def _llama4_text(raw: dict) -> dict:
    """The nested text_config of a Llama4ForConditionalGeneration config.json; dtype and token ids
    the top level sets fill in what it leaves out."""
    text = dict(raw["text_config"] or {})
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id"):
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    return text


def _llama4_rope_layers(text: dict, layers: int) -> tuple[bool, ...]:
    # no_rope_layers[i] == 1 means layer i DOES use rope (transformers' naming); empty or absent:
    # a NoPE layer every no_rope_layer_interval layers (the last of each group).
    flags = text.get("no_rope_layers") or []
    if not flags:
        interval = text.get("no_rope_layer_interval", 4)
        return tuple((i + 1) % interval != 0 for i in range(layers))
    if len(flags) < layers:
        raise CheckpointError(f"llama4: no_rope_layers has {len(flags)} entries for {layers} layers")
    return tuple(bool(f) for f in flags[:layers])


def _llama4_moe_layers(text: dict, layers: int) -> tuple[bool, ...]:
    # moe_layers (layer indices) when given, else every interleave_moe_layer_step-th layer, last of each step
    listed = text.get("moe_layers")
    if listed is None:
        step = text.get("interleave_moe_layer_step", 1)
        listed = range(step - 1, layers, step)
    moe = set(listed)
    return tuple(i in moe for i in range(layers))


def _llama4_chunks(text: dict, rope_layers: tuple[bool, ...]) -> tuple[int | None, ...]:
    # layer_types decides the mask (chunked_attention / full_attention); absent, rope layers are chunked
    types = text.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope_layers]
    unknown = sorted(set(types[: len(rope_layers)]) - {"chunked_attention", "full_attention"})
    if unknown or len(types) < len(rope_layers):
        raise CheckpointError(f"llama4: layer_types {unknown or types} not supported "
                              "(one chunked_attention or full_attention per layer)")
    chunk = text.get("attention_chunk_size")
    return tuple(chunk if t == "chunked_attention" and chunk else None for t in types[: len(rope_layers)])


_FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "olmoe": _olmoe,
             "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "glm4_moe": _glm4_moe, "minimax_m2": _minimax_m2,
             "gpt_oss": _gpt_oss, "llama4": _llama4}


def routing_from_hf(raw: dict) -> "RoutingConfig":
    """The router policy a checkpoint was trained with, from its config.json (see RouterSpec)."""
    model_type = raw.get("model_type")
    if model_type in ("deepseek_v2", "deepseek_v3"):
        spec = _deepseek_router(raw, model_type)
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
