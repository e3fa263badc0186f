"""config.json -> MoEModelConfig, one function per model family (called by MoEModelConfig.from_hf).

With models/config.py, the only module that knows Hugging Face config attribute names: a new
architecture is one more `_<family>` function here and its name in config.py's maps.
"""

from __future__ import annotations

import dataclasses

from moeserve.errors import CheckpointError
from moeserve.models.config import (
    CHECKPOINT_QUANT_METHODS, Architecture, CheckpointQuant, MLAConfig, MoEModelConfig, RopeConfig, RouterSpec)


def parse_family(raw: dict, arch: Architecture, source: str) -> MoEModelConfig:
    quant = _checkpoint_quant(raw, source)
    try:
        cfg = _FAMILIES[arch](raw, arch)
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing required field {exc.args[0]!r} for {arch}") from exc
    return dataclasses.replace(cfg, checkpoint_quant=quant) if quant else cfg


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
        qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"], q_lora_rank=raw.get("q_lora_rank"))
    common.update(num_kv_heads=common["num_heads"], head_dim=mla.qk_head_dim)   # MLA has no KV heads
    first_dense, freq = raw.get("first_k_dense_replace") or 0, raw.get("moe_layer_freq") or 1
    moe_layers = tuple(i >= first_dense and i % freq == 0 for i in range(common["num_layers"]))
    moe_inter = raw["moe_intermediate_size"]
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=moe_inter,
        num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)) if arch == "deepseek_v3" else False,
        moe_layers=moe_layers, shared_expert_intermediate_size=moe_inter * (raw.get("n_shared_experts") or 0),
        mla=mla, router=deepseek_router(raw, arch),
        rope_interleaved=bool(raw.get("rope_interleave", True)) if arch == "deepseek_v3" else True)


def deepseek_router(raw: dict, arch: Architecture) -> RouterSpec:
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
                          topk_group=raw.get("topk_group") or 1 if grouped else 1, group_score="max",
                          float32_logits=True)
    return RouterSpec(scoring="sigmoid", routed_scaling_factor=scale, n_group=raw.get("n_group") or 1,
                      topk_group=raw.get("topk_group") or 1, group_score="top2_sum", correction_bias=True,
                      float32_logits=True)


def _partial_rope_dim(raw: dict, head_dim: int, default_factor: float | None = None) -> int | None:
    """Rotary dims of a head when only part of it rotates (GLM-4.5, MiniMax-M2), else None."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_factor))
    dim = raw.get("rotary_dim") or (int(head_dim * factor) if factor else None)
    if dim is not None and not (0 < dim <= head_dim and dim % 2 == 0):
        raise CheckpointError(f"rotary dims {dim} must be even and in (0, head_dim {head_dim}]")
    return None if dim == head_dim else dim


def _glm4_moe(raw: dict, arch: Architecture) -> MoEModelConfig:
    """GLM-4.5 / 4.6 / Air: GQA with partial rotary, q/k/v bias, optional per-head q/k norm, and
    DeepSeek-V3's MoE (sigmoid routing with correction bias and groups, shared experts, dense
    first layers, routed_scaling_factor)."""
    common = _common(raw, arch)
    first_dense = raw.get("first_k_dense_replace", 1) or 0     # transformers' Glm4MoeConfig defaults
    moe_inter = raw["moe_intermediate_size"]
    return MoEModelConfig(
        **common, intermediate_size=raw["intermediate_size"], moe_intermediate_size=moe_inter,
        num_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= first_dense for i in range(common["num_layers"])),
        shared_expert_intermediate_size=moe_inter * (raw.get("n_shared_experts") or 0),
        qk_norm="per_head" if raw.get("use_qk_norm") else "none", qkv_bias=bool(raw.get("attention_bias")),
        rope_dim=_partial_rope_dim(raw, common["head_dim"], default_factor=0.5),
        router=RouterSpec(scoring="sigmoid", routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
                          n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                          group_score="top2_sum", correction_bias=True, float32_logits=True))


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
    if not raw.get("layer_types"):   # transformers' GptOssConfig default: sliding, full, sliding, ...
        raw = {**raw, "sliding_window": raw.get("sliding_window", 128), "layer_types": [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(raw["num_hidden_layers"])]}
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
