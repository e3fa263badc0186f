"""The capacity serving knobs end to end (--capacity-factor, --min-capacity, --drop-policy).

A tight capacity drops routes, generation still works and stays finite, and the model's dropped
totals are exactly the routes route() dropped. A capacity too large to drop anything changes
nothing, also for routers that do not renormalise (Qwen2-MoE, OLMoE: norm_topk_prob=False).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.engine_helpers import make_llm, random_prompts

from moeserve.request import SamplingParams

PROMPT_LENS = (3, 40, 120)
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)


def _watch_moe_layers(llm) -> dict:
    """Forward hooks summing every MoE layer's routing.counts / routing.dropped, and checking its output."""
    seen = {"counts": 0, "dropped": 0, "finite": True}

    def hook(_module, _inputs, output):
        out, routing = output
        seen["counts"] = seen["counts"] + routing.counts.sum()
        seen["dropped"] = seen["dropped"] + routing.dropped.sum()
        seen["finite"] &= bool(torch.isfinite(out).all())

    for layer in llm.engine.model.layers:
        if layer.moe is not None:
            layer.moe.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_tight_capacity_drops_routes_and_generates(mixtral_dir, policy):
    llm = make_llm(mixtral_dir, capacity_factor=1.0, min_capacity=1, drop_policy=policy)
    model = llm.engine.model
    dropped_before, tokens_before = model.expert_dropped.sum(), model.expert_tokens.sum()
    seen = _watch_moe_layers(llm)
    outs = llm.generate(random_prompts(PROMPT_LENS, seed=3), PARAMS)
    dropped = model.expert_dropped.sum() - dropped_before
    assert dropped > 0
    assert dropped == seen["dropped"]                                 # the totals are route()'s own
    assert model.expert_tokens.sum() - tokens_before == seen["counts"]
    assert dropped < seen["counts"]                                   # most routes still run
    assert seen["finite"]
    for out in outs:
        assert len(out.outputs[0].token_ids) == PARAMS.max_tokens
        assert all(math.isfinite(entry["logprob"]) for entry in out.outputs[0].logprobs)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
def test_huge_capacity_equals_dropless(arch, tiny_checkpoints):
    prompts = random_prompts(PROMPT_LENS, seed=4)
    dropless = make_llm(tiny_checkpoints[arch]).generate(prompts, PARAMS)
    capped_llm = make_llm(tiny_checkpoints[arch], capacity_factor=100.0, min_capacity=1)
    capped = capped_llm.generate(prompts, PARAMS)
    assert int(capped_llm.engine.model.expert_dropped.sum()) == 0
    for a, b in zip(dropless, capped):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [e["logprob"] for e in a.outputs[0].logprobs] == [e["logprob"] for e in b.outputs[0].logprobs]
