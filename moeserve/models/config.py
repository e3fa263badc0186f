"""MoEModelConfig: a Hugging Face config.json normalised once into one frozen dataclass.

This is the only module that knows Hugging Face attribute names. Everything else reads the
normalised fields, so a new architecture means one more `_from_<family>` function here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moeserve.errors import CheckpointError

Architecture = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
QKNorm = Literal["none", "per_head", "full"]
RopeType = Literal["default", "linear", "llama3", "yarn"]

# HF `architectures[0]` -> moeserve architecture. The registry maps these to model classes.
HF_ARCHITECTURES: dict[str, Architecture] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
MODEL_TYPES: dict[str, Architecture] = {
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
}


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
    mscale: float | None = None         # yarn attention factor override
    truncate: bool = True               # yarn


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
        try:
            return _FAMILIES[arch](raw, arch)
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing required field {exc.args[0]!r} for {arch}") from exc


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
        theta=float(theta), type=rope_type, factor=float(params.get("factor", 1.0)),
        original_max_position=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
    )


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


_FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "olmoe": _olmoe}


def routing_from_hf(raw: dict) -> "RoutingConfig":
    """The router policy a checkpoint was trained with, from its config.json.

    Mixtral / Qwen-MoE / OLMoE: softmax top-k, renormalised per config (Mixtral always).
    DeepSeek-V2: softmax, greedy or group_limited_greedy (group score = max), times
    routed_scaling_factor, never renormalised. DeepSeek-V3: sigmoid scores, the
    e_score_correction_bias for choosing only, grouped top-k (group score = sum of the top 2),
    renormalised if norm_topk_prob, times routed_scaling_factor.
    """
    from moeserve.layers.routing import RoutingConfig   # layers import this module

    model_type = raw.get("model_type")
    if model_type == "deepseek_v2":
        grouped = raw.get("topk_method", "greedy") == "group_limited_greedy"
        return RoutingConfig(
            num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"], scoring="softmax",
            renormalize=False, routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            n_group=raw.get("n_group", 1) if grouped else 1, topk_group=raw.get("topk_group", 1) if grouped else 1,
            group_score="max")
    if model_type == "deepseek_v3":
        return RoutingConfig(
            num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"], scoring="sigmoid",
            renormalize=bool(raw.get("norm_topk_prob", True)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            n_group=raw.get("n_group", 1), topk_group=raw.get("topk_group", 1), group_score="top2_sum")
    cfg = MoEModelConfig.from_hf(raw)
    return RoutingConfig(num_experts=cfg.num_experts, top_k=cfg.top_k, scoring="softmax",
                         renormalize=cfg.norm_topk_prob)
