"""Llama 4 specifics: hub-style config.json parsing, that each attention feature the parity tests
pass with actually changes the logits, the text model of a Llama4ForConditionalGeneration
checkpoint (vision tower never read), and the configurations refused at startup."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf

from checkpoints import write_llama4_multimodal
from moeserve.errors import CheckpointError
from moeserve.layers.attention import prefill_mask
from moeserve.models.config import MoEModelConfig
from moeserve.models.loader import CheckpointReader, load_model
from test_parity import Harness, Models




# Llama-4-Scout-17B-16E(-Instruct)'s config.json, abridged (sizes and the fields moeserve reads).
SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1,
        "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760, "no_rope_layers": [], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "use_qk_norm": True, "vocab_size": 202048,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408},
}


def _maverick() -> dict:
    raw = copy.deepcopy(SCOUT)
    raw["text_config"].update(interleave_moe_layer_step=2, num_local_experts=128, use_qk_norm=False,
                              rope_scaling=None)
    return raw


def test_scout_config() -> None:
    cfg = MoEModelConfig.from_hf(SCOUT)
    assert cfg.architecture == "llama4" and cfg.multimodal and cfg.dtype == "bfloat16"
    assert cfg.moe_layers == (True,) * 48 and cfg.num_experts == 16 and cfg.top_k == 1
    assert cfg.moe_intermediate_size == cfg.shared_expert_intermediate_size == 8192
    assert cfg.intermediate_size == 16384
    assert cfg.rope_layers == tuple((i + 1) % 4 != 0 for i in range(48))        # every 4th layer NoPE
    assert cfg.attention_chunks == tuple(8192 if (i + 1) % 4 else None for i in range(48))
    assert cfg.qk_norm == "l2_rope" and cfg.attn_temperature == (8192.0, 0.1) and cfg.rope_interleaved
    assert cfg.rope.type == "llama3" and cfg.rope.theta == 500000.0 and cfg.rope.factor == 16.0
    assert cfg.eos_token_ids == (200001, 200007, 200008) and cfg.bos_token_id == 200000
    assert cfg.router.scoring == "sigmoid" and cfg.moe_weight_input and not cfg.norm_topk_prob


def test_maverick_config() -> None:
    cfg = MoEModelConfig.from_hf(_maverick())
    assert cfg.moe_layers == tuple(i % 2 == 1 for i in range(48)) and cfg.num_moe_layers == 24
    assert cfg.qk_norm == "none" and cfg.rope.type == "default"


def test_text_only_config_and_explicit_lists() -> None:
    text = dict(SCOUT["text_config"], architectures=["Llama4ForCausalLM"], num_hidden_layers=4,
                moe_layers=[0, 2], no_rope_layers=[1, 0, 1, 1], attn_temperature_tuning=False,
                layer_types=["chunked_attention", "full_attention", "full_attention", "chunked_attention"])
    cfg = MoEModelConfig.from_hf(text)
    assert not cfg.multimodal and cfg.moe_layers == (True, False, True, False)
    assert cfg.rope_layers == (True, False, True, True) and cfg.attn_temperature is None
    assert cfg.attention_chunks == (8192, None, None, 8192)


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(layer_types=["sliding_attention"] * 48), "layer_types"),
    (dict(no_rope_layers=[1, 0]), "no_rope_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_refused_configs(change: dict, match: str) -> None:
    raw = copy.deepcopy(SCOUT)
    raw["text_config"].update(change)
    with pytest.raises(CheckpointError, match=match):
        MoEModelConfig.from_hf(raw)


def test_chunked_prefill_mask() -> None:
    mask = prefill_mask(start_pos=14, n=5, window=None, device=torch.device("cpu"), chunk=8)
    assert mask.shape == (5, 19)
    for row, q in zip(mask, range(14, 19)):   # positions 14, 15 | 16, 17, 18 (chunks of 8)
        assert row.nonzero().flatten().tolist() == list(range(q // 8 * 8, q + 1))
    assert prefill_mask(0, 8, None, torch.device("cpu"), chunk=8) is None   # one chunk: plain causal


@pytest.fixture(scope="module")
def llama4_dir(make_checkpoint):
    return make_checkpoint("llama4", "llama4")


@pytest.mark.parametrize("name, hf_override", [
    ("chunked attention", dict(attention_chunk_size=1024)),
    ("temperature tuning", dict(attn_temperature_tuning=False)),
    ("q/k L2 norm", dict(use_qk_norm=False)),
])
def test_each_feature_changes_the_logits(llama4_dir, name, hf_override) -> None:
    """The parity tests would pass without a feature if it changed nothing at these shapes."""
    with torch.no_grad():
        tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
        ref = hf.AutoModelForCausalLM.from_pretrained(llama4_dir).eval()(tokens).logits[0, -1]
        other = hf.AutoModelForCausalLM.from_pretrained(llama4_dir, **hf_override).eval()(tokens).logits[0, -1]
    assert (ref - other).abs().max() > 1e-2, name


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory):
    return write_llama4_multimodal(tmp_path_factory.mktemp("llama4_mm"))


def test_multimodal_checkpoint_matches_transformers(multimodal_dir) -> None:
    """Llama4ForConditionalGeneration on text input, prefill then decodes through the paged cache."""
    ours = load_model(multimodal_dir, torch.float32, progress=False)
    assert ours.cfg.multimodal
    ref = hf.Llama4ForConditionalGeneration.from_pretrained(multimodal_dir).eval()
    h = Harness(Models(ours, ref), seed=5)
    seqs = [h.new_seq(n + 3) for n in (5, 17, 40)]
    h.step([(s, s.chunk(len(s.tokens) - 3)) for s in seqs])
    for _ in range(3):
        h.step([(s, s.chunk(1)) for s in seqs])


def test_multimodal_serves_its_text_model(multimodal_dir, tmp_path, monkeypatch) -> None:
    """The same tokens as its language model saved alone (Llama4ForCausalLM); no vision tensor read."""
    from moeserve.llm import LLM
    from moeserve.request import SamplingParams

    text_dir = tmp_path / "text"
    hf.Llama4ForConditionalGeneration.from_pretrained(multimodal_dir).language_model.save_pretrained(text_dir)
    read: list[str] = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name, rows=None: read.append(name)
                        or original(self, name, rows))
    prompts = [torch.randint(0, 317, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = []
    for directory in (multimodal_dir, text_dir):
        with LLM(str(directory), dtype="float32", kv_cache_memory=2**24, seed=0) as llm:
            tokens.append([out.outputs[0].token_ids for out in llm.generate(prompts, [params] * len(prompts))])
    assert tokens[0] == tokens[1]
    mm_names = [n for n in read if n.startswith("language_model.")]
    assert mm_names and not [n for n in read if n.startswith(("vision_model.", "multi_modal_projector."))]
