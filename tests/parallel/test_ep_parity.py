"""Expert parallelism changes where experts run, never what the model says.

For each architecture, --ep-size 2 (and 4 for two of them) in both dispatch modes generates the
same tokens as one process: greedy, and seeded random sampling (which alltoall ranks do on their
own). The workload mixes prompt lengths and output lengths so that prefill is chunked (token
budget 32), the small per-rank KV cache forces preemptions, and late steps have fewer sequences
than ranks (alltoall ranks with no tokens still serve the others' routes).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.engine_helpers import kv_bytes_for_blocks, make_llm, random_prompts

from moeserve.request import SamplingParams

PROMPT_LENS = (5, 40, 17, 70, 9, 33, 52, 3)
MAX_TOKENS = (12, 4, 20, 8, 24, 6, 10, 30)
BUDGET = 32
# Per rank: the longest sequence (78 tokens = 5 blocks) fits, all of them never do.
KV_BLOCKS_PER_RANK = {2: 7, 4: 5}

CASES = [(arch, 2, mode) for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                     "glm4_moe", "minimax_m2", "gpt_oss")
         for mode in ("alltoall", "allreduce")]
CASES += [("mixtral", 4, "alltoall"), ("qwen2_moe", 4, "allreduce")]
CASES += [("llama4", 2, "alltoall"), ("llama4", 2, "allreduce")]   # expert input weighted before dispatch


def _params() -> list[SamplingParams]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    params[2] = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=MAX_TOKENS[2], ignore_eos=True)
    return params


def _tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def references(ep_checkpoints):
    """--ep-size 1 over a cache that never runs out."""
    torch.set_num_threads(1)
    prompts = random_prompts(PROMPT_LENS, seed=3)
    refs = {}
    for arch, path in ep_checkpoints.items():
        llm = make_llm(path, max_num_batched_tokens=BUDGET)
        refs[arch] = _tokens(llm.generate(prompts, _params()))
        assert llm.engine.scheduler.num_preemptions == 0
    return prompts, refs


@pytest.mark.parametrize("arch, ep_size, mode", CASES)
def test_same_tokens_as_one_rank(ep_checkpoints, references, arch, ep_size, mode):
    prompts, refs = references
    path = ep_checkpoints[arch]
    with make_llm(path, max_num_batched_tokens=BUDGET, ep_size=ep_size, ep_dispatch=mode,
                  kv_cache_memory=kv_bytes_for_blocks(path, KV_BLOCKS_PER_RANK[ep_size])) as llm:
        engine = llm.engine
        seen = _spy_on_split(engine) if mode == "alltoall" else None
        got = _tokens(llm.generate(prompts, _params()))
        assert got == refs[arch]
        if not (mode == "alltoall" and ep_size == 4):   # 8 sequences over 4 caches: 2 each, no squeeze
            assert engine.scheduler.num_preemptions > 0, "no preemption: the cache is too large for the test"
        blocks = engine.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
        if seen is not None:     # alltoall: the KV cache is split, every rank ran attention
            assert blocks.num_partitions == ep_size
            assert seen["ranks_used"] == set(range(ep_size))
            assert seen["idle_steps"] > 0, "no step left a rank without tokens"


def _spy_on_split(engine) -> dict:
    """Counts alltoall steps that left some rank without sequences, and which ranks got any."""
    seen = {"idle_steps": 0, "ranks_used": set()}
    split = engine.executor._split

    def spying_split(seqs):
        per_rank = split(seqs)
        seen["idle_steps"] += any(not part for part in per_rank)
        seen["ranks_used"] |= {rank for rank, part in enumerate(per_rank) if part}
        return per_rank

    engine.executor._split = spying_split
    return seen


def test_each_rank_loads_shared_weights_and_its_own_experts(ep_checkpoints):
    path = ep_checkpoints["qwen2_moe"]
    whole = make_llm(path).engine.model
    per_expert = sum(layer.moe.experts.w13[0].numel() + layer.moe.experts.w2[0].numel()
                     for layer in whole.layers if layer.moe is not None)
    num_experts = whole.cfg.num_experts
    total = sum(p.numel() for p in whole.parameters())
    shared = total - per_expert * num_experts
    with make_llm(path, ep_size=3, ep_dispatch="allreduce") as llm:
        reports = llm.engine.executor.reports
    assert [r.experts for r in reports] == [range(0, 3), range(3, 6), range(6, 8)]
    for report in reports:
        assert report.params == shared + per_expert * len(report.experts)
        assert report.expert_params == per_expert * len(report.experts)
        assert report.param_bytes == 4 * report.params


def test_bad_ep_size_names_the_flag(ep_checkpoints):
    from moeserve.errors import ConfigError
    with pytest.raises(ConfigError, match="--ep-size 9 is more than the model's 8 experts"):
        make_llm(ep_checkpoints["mixtral"], ep_size=9)
    with pytest.raises(ConfigError, match="--ep-dispatch"):
        make_llm(ep_checkpoints["mixtral"], ep_size=2, ep_dispatch="ring")


def test_capacity_limits_across_ranks(ep_checkpoints):
    """allreduce routes the whole batch on every rank: capacity drops exactly what one rank drops.
    alltoall applies the capacity to each rank's own tokens (as DeepSpeed-MoE does per device), so
    it drops differently but must still drop, count, and finish every request."""
    path = ep_checkpoints["mixtral"]
    prompts = random_prompts(PROMPT_LENS, seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    knobs = dict(max_num_batched_tokens=BUDGET, capacity_factor=1.0, min_capacity=1)
    one = make_llm(path, **knobs)
    expected = _tokens(one.generate(prompts, params))
    expected_totals = one.engine.executor.expert_totals()
    assert sum(map(sum, (layer[1] for layer in expected_totals))) > 0, "nothing dropped: no capacity test"
    with make_llm(path, ep_size=2, ep_dispatch="allreduce", **knobs) as llm:
        assert _tokens(llm.generate(prompts, params)) == expected
        assert llm.engine.executor.expert_totals() == expected_totals
    with make_llm(path, ep_size=2, ep_dispatch="alltoall", **knobs) as llm:
        outs = llm.generate(prompts, params)
        assert [len(t) for t in _tokens(outs)] == list(MAX_TOKENS)
        totals = llm.engine.executor.expert_totals()
        routed = sum(map(sum, (layer[0] for layer in totals)))
        assert routed == sum(map(sum, (layer[0] for layer in expected_totals)))   # same tokens routed
        assert sum(map(sum, (layer[1] for layer in totals))) > 0


def test_alltoall_sends_a_prompt_to_the_rank_caching_its_prefix(ep_checkpoints):
    """With prefix caching, later prompts sharing a system prompt run on the rank whose KV cache
    holds it (rather than the least loaded one) and give the tokens of one uncached rank."""
    path = ep_checkpoints["mixtral"]
    system = random_prompts((48,), seed=8)[0]
    prompts = [system + tail for tail in random_prompts((5, 9, 13, 20), seed=9)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = _tokens(make_llm(path, enable_prefix_caching=False).generate(prompts, params))
    with make_llm(path, ep_size=2, ep_dispatch="alltoall") as llm:
        seen = _spy_on_split(llm.engine)
        first = _tokens(llm.generate(prompts[:1], params))
        (holder,) = seen["ranks_used"]
        seen["ranks_used"].clear()
        rest = _tokens(llm.generate(prompts[1:], params))
        assert first + rest == expected
        assert seen["ranks_used"] == {holder}
        sched = llm.engine.scheduler
        assert sched.prefix_cache_hits == 3 * 48
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
