"""moeserve_expert_tokens_total for Llama 4 equals transformers' recount (test_expert_counts.py's
method: top-k of its router logits per token and MoE layer). Llama 4's MoE layers are the odd ones
in the tiny checkpoint (interleave_moe_layer_step=2), so the `layer` labels are 1 and 3."""

from __future__ import annotations

import torch

import tests.metrics.test_expert_counts as counts_test
from tests.checkpoints import write_checkpoint
from tests.metrics.metrics_helpers import render


def _llama4_moe_layers(model) -> list[int]:
    return list(model.config.moe_layers)    # Llama4TextMoe is not named like the other sparse blocks


def test_llama4_expert_counts_match_transformers_router(tmp_path, monkeypatch) -> None:
    import transformers as hf
    model_dir = write_checkpoint(tmp_path / "llama4", "llama4")
    ctx, fed = counts_test._serve(model_dir)
    got = {(labels["layer"], labels["expert"]): value
           for labels, value in render(ctx)["moeserve_expert_tokens_total"]}
    assert {layer for layer, _ in got} == {"1", "3"}
    model = hf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    monkeypatch.setattr(counts_test, "_moe_layer_ids", _llama4_moe_layers)
    want, near_ties = counts_test._hf_recount(model, fed)
    for layer in ("1", "3"):   # top-1: one route per token run
        assert sum(v for (l, _), v in got.items() if l == layer) == sum(map(len, fed))
    counts_test._assert_counts_match(got, want, near_ties)
    assert near_ties <= 2, f"{near_ties} near-tie routing decisions: the comparison is too loose"
