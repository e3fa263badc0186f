"""MoEModelConfig.from_hf: Hugging Face config.json normalisation, checked against transformers."""

from __future__ import annotations

import pytest
import transformers as hf

from checkpoints import hf_config
from moeserve.errors import CheckpointError
from moeserve.models.config import MoEModelConfig, RopeConfig


def raw_config(arch: str, **overrides) -> dict:
    """config.json as save_pretrained writes it (to_dict plus `architectures`)."""
    cfg = hf_config(arch, **overrides)
    raw = cfg.to_dict()
    raw["architectures"] = [hf.AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    return raw


def test_checkpoint_configs_normalise(make_checkpoint) -> None:
    mixtral = MoEModelConfig.from_dir(make_checkpoint("mixtral", "mixtral"))
    assert (mixtral.architecture, mixtral.num_experts, mixtral.top_k, mixtral.norm_topk_prob) == \
        ("mixtral", 8, 2, True)
    assert (mixtral.moe_intermediate_size, mixtral.head_dim, mixtral.sliding_windows) == (96, 16, (None,) * 3)
    qwen2 = MoEModelConfig.from_dir(make_checkpoint("qwen2_moe", "qwen2_moe"))
    assert qwen2.moe_layers == (True, False, True) and qwen2.qkv_bias and not qwen2.o_bias
    assert (qwen2.shared_expert_intermediate_size, qwen2.shared_expert_gated, qwen2.norm_topk_prob) == \
        (80, True, False)
    qwen3 = MoEModelConfig.from_dir(make_checkpoint("qwen3_moe", "qwen3_moe"))
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.top_k, qwen3.shared_expert_intermediate_size) == \
        ("per_head", 32, 3, 0)
    olmoe = MoEModelConfig.from_dir(make_checkpoint("olmoe", "olmoe"))
    assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.eos_token_ids, olmoe.norm_topk_prob) == \
        ("full", 8.0, (2,), False)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize(("mlp_only", "step"), [([], 1), ([1], 1), ([], 2), ([0, 3], 1), ([3], 2), ([], 3)])
def test_qwen_moe_layers_match_hf_model(arch: str, mlp_only: list[int], step: int) -> None:
    # hf_config sets overrides after construction, so layer_types must follow num_hidden_layers by hand
    overrides = dict(num_hidden_layers=4, layer_types=["full_attention"] * 4, mlp_only_layers=mlp_only,
                     decoder_sparse_step=step)
    ours = MoEModelConfig.from_hf(raw_config(arch, **overrides))
    model = hf.AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    expected = tuple("SparseMoeBlock" in type(layer.mlp).__name__ for layer in model.model.layers)
    assert ours.moe_layers == expected
    assert ours.num_moe_layers == sum(expected)


def test_qwen_moe_without_mlp_only_layers_key() -> None:
    raw = raw_config("qwen2_moe", num_hidden_layers=4)
    del raw["mlp_only_layers"], raw["decoder_sparse_step"]
    assert MoEModelConfig.from_hf(raw).moe_layers == (True,) * 4


def _with_rope(arch: str, **fields) -> dict:
    raw = raw_config(arch)
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        raw.pop(key, None)
    raw.update(fields)
    return raw


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, RopeConfig(theta=10000.0)),
    ({"rope_theta": 1e6}, RopeConfig(theta=1e6)),
    # pre-v5 hub configs: rope_theta beside rope_scaling, "type" or "rope_type"
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
     RopeConfig(theta=5e5, type="linear", factor=2.0)),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     RopeConfig(theta=5e5, type="llama3", factor=8.0, original_max_position=8192)),
    # v5: everything inside rope_parameters
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                          "original_max_position_embeddings": 32768, "attention_factor": 0.8}},
     RopeConfig(theta=1e6, type="yarn", factor=4.0, original_max_position=32768, attention_factor=0.8)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 2e4}}, RopeConfig(theta=2e4)),
])
def test_rope_old_and_new_style(fields: dict, expected: RopeConfig) -> None:
    assert MoEModelConfig.from_hf(_with_rope("qwen3_moe", **fields)).rope == expected


def test_rope_parameters_written_by_v5_config_class() -> None:
    raw = raw_config("mixtral", rope_parameters={"rope_type": "linear", "rope_theta": 1e5, "factor": 3.0})
    assert MoEModelConfig.from_hf(raw).rope == RopeConfig(theta=1e5, type="linear", factor=3.0)


def test_unsupported_rope_type() -> None:
    raw = _with_rope("mixtral", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope type 'dynamic' is not supported"):
        MoEModelConfig.from_hf(raw)


def test_sliding_windows_per_layer() -> None:
    assert MoEModelConfig.from_hf(raw_config("mixtral", sliding_window=4096)).sliding_windows == (4096,) * 3
    raw = raw_config("qwen2_moe", use_sliding_window=True, sliding_window=64, max_window_layers=2)
    raw.pop("layer_types")   # older configs: the window starts at max_window_layers
    assert MoEModelConfig.from_hf(raw).sliding_windows == (None, None, 64)
    raw = raw_config("qwen2_moe", sliding_window=64,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert MoEModelConfig.from_hf(raw).sliding_windows == (64, None, 64)


def test_model_type_without_architectures() -> None:
    raw = raw_config("olmoe")
    del raw["architectures"]
    assert MoEModelConfig.from_hf(raw).architecture == "olmoe"


def test_missing_required_field_is_named() -> None:
    raw = raw_config("mixtral")
    del raw["num_experts_per_tok"]
    with pytest.raises(CheckpointError, match=r"cfg\.json: missing required field 'num_experts_per_tok'"):
        MoEModelConfig.from_hf(raw, source="cfg.json")


def test_inconsistent_heads_rejected() -> None:
    with pytest.raises(CheckpointError, match="multiple of num_key_value_heads"):
        MoEModelConfig.from_hf(raw_config("mixtral", num_key_value_heads=3))


# --- DeepSeek-V2 / V3 (MLA) ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_normalises_against_the_hf_model(arch: str) -> None:
    raw = raw_config(arch)
    ours = MoEModelConfig.from_hf(raw)
    model = hf.AutoModelForCausalLM.from_config(hf_config(arch))
    attn = model.model.layers[0].self_attn
    assert ours.moe_layers == tuple(hasattr(layer.mlp, "experts") for layer in model.model.layers) == \
        (False, True, True)
    assert ours.softmax_scale == pytest.approx(attn.scaling)             # YaRN's mscale_all_dim correction
    assert ours.softmax_scale != pytest.approx(ours.mla.qk_head_dim ** -0.5)
    assert (ours.mla.q_lora_rank, ours.num_kv_heads, ours.head_dim) == (attn.q_lora_rank, ours.num_heads, 24)
    assert ours.kv_values_per_token == raw["kv_lora_rank"] + raw["qk_rope_head_dim"]
    assert ours.shared_expert_intermediate_size == raw["moe_intermediate_size"] * raw["n_shared_experts"]
    assert ours.router.correction_bias == (arch == "deepseek_v3")
    assert ours.router.scoring == ("sigmoid" if arch == "deepseek_v3" else "softmax")


def test_deepseek_moe_layer_freq_and_dense_prefix() -> None:
    raw = raw_config("deepseek_v2", num_hidden_layers=6, first_k_dense_replace=2)
    raw["moe_layer_freq"] = 2      # DeepSeek's own code: MoE where i >= first_k and i % freq == 0
    assert MoEModelConfig.from_hf(raw).moe_layers == (False, False, True, False, True, False)


def test_deepseek_v3_rope_interleave_flag_and_v3_kv_heads_ignored() -> None:
    raw = raw_config("deepseek_v3", rope_interleave=False)
    raw["num_key_value_heads"] = 128          # DeepseekV3Config's default: meaningless under MLA
    cfg = MoEModelConfig.from_hf(raw)
    assert not cfg.rope_interleaved and cfg.num_kv_heads == cfg.num_heads


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_deepseek_biases_are_refused(field: str) -> None:
    raw = raw_config("deepseek_v2")
    raw[field] = True
    with pytest.raises(CheckpointError, match=field):
        MoEModelConfig.from_hf(raw)


def test_yarn_factor_from_the_two_lengths() -> None:
    raw = raw_config("deepseek_v3", max_position_embeddings=4096)
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": None,
                              "original_max_position_embeddings": 1024}
    assert MoEModelConfig.from_hf(raw).rope.factor == 4.0


@pytest.mark.parametrize(("arch", "fields"), [
    ("deepseek_v2", {"topk_method": "noaux_tc"}), ("deepseek_v3", {"topk_method": "greedy"}),
    ("deepseek_v3", {"scoring_func": "softmax"})])
def test_deepseek_unknown_router_is_refused(arch: str, fields: dict) -> None:
    raw = raw_config(arch)
    raw.update(fields)
    with pytest.raises(CheckpointError, match="is not supported"):
        MoEModelConfig.from_hf(raw)


def test_deepseek_hub_style_router_fields_accepted() -> None:
    raw = raw_config("deepseek_v3")
    raw.update(topk_method="noaux_tc", scoring_func="sigmoid")       # as DeepSeek-V3's config.json
    assert MoEModelConfig.from_hf(raw).router.scoring == "sigmoid"


# --- GLM-4.5 and MiniMax-M2 ---------------------------------------------------------------------

def test_glm4_moe_normalises() -> None:
    cfg = MoEModelConfig.from_hf(raw_config("glm4_moe"))
    assert (cfg.rotary_dim, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias, cfg.o_bias) == (12, 24, "per_head", True, False)
    assert cfg.moe_layers == (False, True, True) and cfg.shared_expert_intermediate_size == 32
    assert (cfg.router.scoring, cfg.router.correction_bias, cfg.router.n_group, cfg.router.topk_group,
            cfg.router.group_score, cfg.router.routed_scaling_factor) == ("sigmoid", True, 4, 2, "top2_sum", 2.5)


def test_glm4_moe_hub_style_top_level_partial_rotary_factor() -> None:
    raw = raw_config("glm4_moe")
    raw["rope_parameters"].pop("partial_rotary_factor")
    raw["partial_rotary_factor"] = 0.25        # as GLM-4.5's config.json has it
    assert MoEModelConfig.from_hf(raw).rotary_dim == 6


def test_minimax_m2_normalises() -> None:
    cfg = MoEModelConfig.from_hf(raw_config("minimax_m2"))
    assert (cfg.rotary_dim, cfg.head_dim, cfg.qk_norm, cfg.norm_topk_prob) == (8, 16, "full", True)
    assert (cfg.router.scoring, cfg.router.correction_bias, cfg.router.n_group) == ("sigmoid", True, 1)


def test_odd_rotary_dim_is_refused() -> None:
    raw = raw_config("minimax_m2")
    raw["rotary_dim"] = 7
    with pytest.raises(CheckpointError, match="rotary dims 7"):
        MoEModelConfig.from_hf(raw)


def test_fields_left_out_take_transformers_defaults() -> None:
    """Older or hand-written config.json files omit fields whose transformers defaults matter."""
    glm = raw_config("glm4_moe")
    glm["rope_parameters"].pop("partial_rotary_factor")
    del glm["first_k_dense_replace"]
    cfg = MoEModelConfig.from_hf(glm)
    assert cfg.rotary_dim == glm["head_dim"] // 2 and cfg.moe_layers[0] is False
    oss = raw_config("gpt_oss")
    del oss["layer_types"], oss["sliding_window"]
    assert MoEModelConfig.from_hf(oss).sliding_windows == (128, None, 128)
