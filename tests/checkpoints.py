"""Tiny random checkpoints of every supported architecture, written by transformers itself.

`save_pretrained` writes the real hub file layout, so moeserve's loader reads exactly what it
would read from a downloaded model. Nothing here touches the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as hf

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                 "minimax_m2", "gpt_oss", "llama4")
_COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
               rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_config(arch: str, **overrides) -> hf.PretrainedConfig:
    if arch == "mixtral":
        cfg = hf.MixtralConfig(**_COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                               rope_theta=10000.0)
    elif arch == "qwen2_moe":
        cfg = hf.Qwen2MoeConfig(**_COMMON, intermediate_size=112, moe_intermediate_size=48, num_experts=8,
                                num_experts_per_tok=2, shared_expert_intermediate_size=80,
                                norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1)
    elif arch == "qwen3_moe":
        cfg = hf.Qwen3MoeConfig(**_COMMON, intermediate_size=112, moe_intermediate_size=48, num_experts=8,
                                num_experts_per_tok=3, norm_topk_prob=True, head_dim=32)
    elif arch == "olmoe":
        cfg = hf.OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False, clip_qkv=8.0, pad_token_id=1, eos_token_id=2)
    elif arch in ("deepseek_v2", "deepseek_v3"):
        cfg = _deepseek_config(arch)
    elif arch == "glm4_moe":   # partial rotary, q/k/v bias, per-head q/k norm, V3 routing with groups
        cfg = hf.Glm4MoeConfig(**_COMMON, head_dim=24, partial_rotary_factor=0.5, use_qk_norm=True,
                               attention_bias=True, intermediate_size=96, moe_intermediate_size=32,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                               first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    elif arch == "minimax_m2":  # partial rotary through the legacy rotary_dim, full-projection q/k norm
        cfg = hf.MiniMaxM2Config(**_COMMON, head_dim=16, rotary_dim=8, intermediate_size=48, num_local_experts=8,
                                 num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
    elif arch == "gpt_oss":
        cfg = hf.GptOssConfig(**_GPT_OSS)
    elif arch == "llama4":
        cfg = hf.Llama4TextConfig(**LLAMA4_TEXT)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# DeepSeek: MLA with YaRN (DeepSeek's mscale pair) and v_head_dim != the q/k head dim, a dense
# first layer, shared experts, grouped routing. V2: q_lora_rank null, softmax group_limited_greedy.
# V3: q_lora_rank set, sigmoid scores with a non-zero correction bias (hf_model randomises it).
_MLA = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1,
            n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, intermediate_size=96,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256,
                                 mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1))


# gpt-oss: sliding (window 8, reached by the 17-130 token prompts) / full / sliding layers, head_dim
# 16 != hidden / heads, YaRN with truncate false, attention sinks and biases, 8 experts top-2 with
# router and expert biases (hf_model randomises the expert biases, HF starts them at zero), and a
# swiglu_limit low enough (gpt-oss ships 7.0) that these small activations are clamped.
_GPT_OSS = dict(**_COMMON, head_dim=16, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                swiglu_limit=0.6, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0,
                                                       original_max_position_embeddings=256, beta_fast=32.0,
                                                       beta_slow=1.0, truncate=False))
# Llama 4: 4 layers, so rope layers (0-2, chunked attention) and a NoPE layer (3, full attention,
# temperature-tuned queries), dense (0, 2) and MoE (1, 3) layers. Chunks of 16 positions: the test
# prompts (17-130 tokens) cross chunk boundaries; floor_scale 8 makes the temperature differ from 1
# from position 7 on (8192 in the real models). llama3 rope scaling with all three bands in play.
LLAMA4_TEXT = dict(_COMMON, num_hidden_layers=4, head_dim=16, intermediate_size=48, intermediate_size_mlp=96,
                   num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=16,
                   floor_scale=8, attn_scale=0.1, use_qk_norm=True,
                   rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=64))
LLAMA4_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vision_output_dim=32, image_size=28, patch_size=14, projector_input_dim=32,
                     projector_output_dim=32)


def write_llama4_multimodal(out_dir: Path, seed: int = 0, **text_overrides) -> Path:
    """A Llama4ForConditionalGeneration checkpoint (text model under `language_model.`, a tiny vision
    tower beside it) written by transformers' save_pretrained."""
    cfg = hf.Llama4Config(text_config=dict(LLAMA4_TEXT, **text_overrides), vision_config=LLAMA4_VISION,
                          image_token_index=317, boi_token_index=318, eoi_token_index=319)
    torch.manual_seed(seed)
    model = hf.Llama4ForConditionalGeneration(cfg).eval()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir)
    return out_dir


def _deepseek_config(arch: str) -> hf.PretrainedConfig:
    common = {**_COMMON, "num_key_value_heads": _COMMON["num_attention_heads"]}   # MLA: no KV heads
    if arch == "deepseek_v2":
        return hf.DeepseekV2Config(**common, **_MLA, q_lora_rank=None, num_experts_per_tok=2,
                                   topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   routed_scaling_factor=2.0)
    return hf.DeepseekV3Config(**common, **_MLA, q_lora_rank=20, num_experts_per_tok=3, n_group=4, topk_group=2,
                               norm_topk_prob=True, routed_scaling_factor=2.5)


def hf_model(cfg: hf.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = hf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():   # HF initialises DeepSeek-V3's correction bias to zero: make it matter
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.3)
        # gpt-oss: expert biases start at zero and sinks at N(0, 0.1): make both matter
        for name, param in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias", "self_attn.sinks")):
                param.copy_(torch.randn(param.shape) * (1.0 if name.endswith("sinks") else 0.3))
    return model.eval()


def write_checkpoint(out_dir: Path, arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, **overrides) -> Path:
    model = hf_model(hf_config(arch, **overrides), seed).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir
