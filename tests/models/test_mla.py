"""Multi-head latent attention (DeepSeek-V2/V3): the latent cache and both decode forms.

The parity tests (test_parity.py, every architecture) run the absorbed decode against
transformers; here the expanded decode is held to the same reference, the cache is checked to
hold latents (not per-head K/V), and the KV sizing follows the latent width.
"""

from __future__ import annotations

import pytest
import torch

import transformers as hf
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq
from moeserve.layers.mla import MLAttention
from moeserve.models.config import MoEModelConfig
from moeserve.models.loader import load_model
from moeserve.worker.model_runner import ModelRunner, kv_bytes_per_block
from test_parity import Harness, Models

BS = 16


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def checkpoint(request, make_checkpoint):
    return make_checkpoint(request.param, request.param)


def load_reference(directory) -> torch.nn.Module:
    return hf.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_latent_cache_is_one_row_of_rank_plus_rope_per_token(checkpoint) -> None:
    cfg = MoEModelConfig.from_dir(checkpoint)
    mla = cfg.mla
    assert cfg.kv_values_per_token == mla.kv_lora_rank + mla.qk_rope_head_dim == 24 + 8
    expanded = cfg.num_heads * (mla.qk_head_dim + mla.v_head_dim)     # per-head K and V: 4 * (24 + 12)
    assert kv_bytes_per_block(cfg, BS, torch.float32) == cfg.num_layers * BS * 32 * 4 < expanded * cfg.num_layers * BS * 4
    runner = ModelRunner(load_model(checkpoint, torch.float32, progress=False), 8, BS, torch.float32,
                         torch.device("cpu"))
    assert runner.kv_caches.shape == (cfg.num_layers, 8, BS, 32)


@pytest.mark.parametrize("absorb", [True, False])
def test_decode_forms_match_transformers(checkpoint, absorb: bool) -> None:
    ours = load_model(checkpoint, torch.float32, progress=False)
    for module in ours.modules():
        if isinstance(module, MLAttention):
            module.absorb = absorb
    harness = Harness(Models(ours, load_reference(checkpoint)), seed=3)
    seqs = [harness.new_seq(n) for n in (7, 40, 19)]
    harness.step([(s, s.chunk(len(s.tokens) - 6)) for s in seqs])       # prefill all but 6 tokens
    for _ in range(6):                                                   # 6 batched decode steps
        harness.step([(s, s.chunk(1)) for s in seqs])


def test_cache_holds_the_normalised_latent(checkpoint) -> None:
    """The rows written are [kv_a_layernorm(c), rope(k_pe)] of transformers' own module."""
    ours = load_model(checkpoint, torch.float32, progress=False)
    ref = load_reference(checkpoint)
    runner = ModelRunner(ours, 4, BS, torch.float32, torch.device("cpu"))
    tokens = list(range(3, 13))
    runner.forward_logits(ScheduledBatch([ScheduledSeq(1, tokens, 0, [2], True, None, [], [])], len(tokens), BS))
    captured = {}
    attn = ref.model.layers[1].self_attn
    hook = attn.kv_a_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("c", o))
    with torch.no_grad():
        ref(torch.tensor([tokens]))
    hook.remove()
    rank = ours.cfg.mla.kv_lora_rank
    rows = runner.kv_caches[1, 2, : len(tokens)]                         # layer 1, block 2
    torch.testing.assert_close(rows[:, :rank], captured["c"].reshape(len(tokens), rank), atol=1e-5, rtol=1e-5)
    assert runner.kv_caches[1, :2].abs().sum() == 0 and runner.kv_caches[1, 3].abs().sum() == 0


def test_neox_rope_layout_when_not_interleaved(make_checkpoint) -> None:
    """DeepSeek-V3 configs may set rope_interleave false: rotate_half pairs, like the GQA models."""
    directory = make_checkpoint("deepseek_v3_neox_rope", "deepseek_v3", rope_interleave=False)
    ours = load_model(directory, torch.float32, progress=False)
    assert not ours.layers[0].attn.rotary.interleaved
    harness = Harness(Models(ours, load_reference(directory)), seed=5)
    seqs = [harness.new_seq(n) for n in (30, 9)]
    harness.step([(s, s.chunk(len(s.tokens) - 3)) for s in seqs])
    for _ in range(3):
        harness.step([(s, s.chunk(1)) for s in seqs])


def test_startup_logs_kv_bytes_per_token(checkpoint, caplog) -> None:
    from moeserve.llm import LLM
    with caplog.at_level("INFO", logger="moeserve.engine.engine"):
        LLM(str(checkpoint), dtype="float32", kv_cache_memory=1 << 20, seed=0)
    per_token = 3 * (24 + 8) * 4                       # layers x (kv_lora_rank + qk_rope_head_dim) x fp32
    assert f"{per_token} bytes per token of latent (MLA)" in caplog.text
