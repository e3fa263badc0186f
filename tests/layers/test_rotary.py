"""RoPE frequencies against transformers' ROPE_INIT_FUNCTIONS, and the applied rotation against HF's.

The moeserve RopeConfig comes from MoEModelConfig.from_hf(config.to_dict()), so these tests also
cover how the v5 `rope_parameters` dict is normalised.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

from moeserve.layers.rotary import RotaryEmbedding, inverse_frequencies
from moeserve.models.config import MoEModelConfig, RopeConfig

HEAD_DIM = 128
MAX_POSITION = 131072

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default_theta_1e6": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn_no_original": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
    "yarn_tuned": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0, "attention_factor": 0.9,
                   "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                   "original_max_position_embeddings": 4096},
    # gpt-oss-20b / 120b as shipped (head_dim 64)
    "yarn_gpt_oss": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
}


def hf_config(rope_parameters: dict, head_dim: int = HEAD_DIM) -> hf.PretrainedConfig:
    return hf.Qwen3MoeConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                             num_hidden_layers=2, max_position_embeddings=MAX_POSITION,
                             rope_parameters=dict(rope_parameters))


def ours_from(config: hf.PretrainedConfig) -> MoEModelConfig:
    raw = config.to_dict()
    raw["architectures"] = ["Qwen3MoeForCausalLM"]
    return MoEModelConfig.from_hf(raw)


def hf_frequencies(config: hf.PretrainedConfig) -> tuple[torch.Tensor, float]:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":   # v5 keeps the default in each model's rotary class, not in the table
        return MixtralRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inverse_frequencies_match_hf(case: str, head_dim: int) -> None:
    config = hf_config(ROPE_CASES[case], head_dim)
    cfg = ours_from(config)
    assert cfg.rope.type == ROPE_CASES[case]["rope_type"]
    inv_freq, scaling = inverse_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    ref_inv_freq, ref_scaling = hf_frequencies(config)
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, ref_inv_freq.float(), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(ref_scaling, rel=1e-9)


def test_scaled_types_actually_change_frequencies() -> None:
    """Guards the comparison above against comparing two unscaled tables."""
    default, _ = inverse_frequencies(ours_from(hf_config(ROPE_CASES["default"])).rope, HEAD_DIM, MAX_POSITION)
    for case in ("linear", "yarn"):
        scaled, _ = inverse_frequencies(ours_from(hf_config(ROPE_CASES[case])).rope, HEAD_DIM, MAX_POSITION)
        assert not torch.allclose(scaled, default)


@pytest.mark.parametrize("case", ["default", "yarn", "llama3"])
def test_rotation_matches_hf_apply(case: str) -> None:
    """The cos/sin table lookup and rotate_half give HF's rotated q and k at scattered positions."""
    config = hf_config(ROPE_CASES[case], head_dim=64)
    cfg = ours_from(config)
    max_pos = 4096
    ours = RotaryEmbedding(cfg.rope, cfg.head_dim, max_pos)
    positions = torch.tensor([0, 1, 2, 17, 511, 4095])
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 4, 64, generator=gen), torch.randn(6, 2, 64, generator=gen)   # [T, NH, D]
    rq, rk = ours(positions, torch.cat((q, k), dim=1)).split([4, 2], dim=1)   # one pass for q and k
    inv_freq, scaling = hf_frequencies(config)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)                                           # [T, D]
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    eq, ek = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos, sin, unsqueeze_dim=0)
    torch.testing.assert_close(rq, eq.transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk, ek.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_tables_sized_to_the_served_context_keep_the_frequencies() -> None:
    """A table as long as --max-model-len, not max_position_embeddings (Llama-4-Scout: 10.5M
    positions, 10.7 GB of float32 tables), with the same values where both exist."""
    rope = RopeConfig(theta=5e5, type="llama3", factor=8.0, original_max_position=8192)
    full = RotaryEmbedding(rope, 64, 10_485_760 // 1024)
    short = RotaryEmbedding(rope, 64, 10_485_760 // 1024, table_len=300)
    assert short.cos.shape == (300, 64) and full.cos.shape == (10_240, 64)
    assert torch.equal(short.cos, full.cos[:300]) and torch.equal(short.sin, full.sin[:300])
