"""Preemption by recompute is invisible in the output.

A KV cache with room for about two sequences of the longest length serves eight requests: the
scheduler must preempt (free a sequence's blocks, recompute prompt + generated tokens later), and
every request must still produce exactly the tokens it produces with a cache that never runs out,
both greedy and with seeded random sampling (whose generator depends only on the seed, the choice
index and the output position, not on the batch or on having been preempted).
"""

from __future__ import annotations

import pytest

from tests.engine.engine_helpers import kv_bytes_for_blocks, make_llm, random_prompts

from moeserve.request import FinishReason, SamplingParams

PROMPT_LENS = (40, 60, 80, 100, 90, 70, 30, 110)
MAX_TOKENS = 40
BLOCK_SIZE = 16
# The longest sequence is 110 + 40 = 150 tokens = 10 blocks: 20 blocks hold about two of them.
SMALL_CACHE_BLOCKS = 20


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])   # paged K/V, paged latents (MLA)
def engines(request, tiny_checkpoints):
    model_dir = tiny_checkpoints[request.param]
    small_kv = kv_bytes_for_blocks(model_dir, SMALL_CACHE_BLOCKS)
    small = make_llm(model_dir, kv_cache_memory=small_kv, max_num_batched_tokens=128)
    large = make_llm(model_dir, max_num_batched_tokens=128)
    assert small.engine.num_kv_blocks == SMALL_CACHE_BLOCKS
    return small, large


def _run_both(engines, prompts, params):
    small, large = engines
    before = small.engine.scheduler.num_preemptions
    got = small.generate(prompts, params)
    expected = large.generate(prompts, params)
    preempted = small.engine.scheduler.num_preemptions - before
    assert large.engine.scheduler.num_preemptions == 0
    for llm in engines:
        blocks = llm.engine.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks, "blocks leaked"
        assert not llm.engine.has_unfinished_requests()
    return got, expected, preempted


def _choices(outputs):
    return [[(c.index, c.token_ids, c.finish_reason) for c in out.outputs] for out in outputs]


def test_greedy_output_survives_preemption(engines):
    prompts = random_prompts(PROMPT_LENS, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got, expected, preempted = _run_both(engines, prompts, params)
    assert preempted > 0, "the small cache never forced a preemption: the test lost its point"
    for out in got:
        assert out.finished
        assert len(out.outputs[0].token_ids) == MAX_TOKENS
        assert out.outputs[0].finish_reason is FinishReason.LENGTH
    assert _choices(got) == _choices(expected)


def test_seeded_sampling_survives_preemption(engines):
    prompts = random_prompts(PROMPT_LENS, seed=12)
    params = [SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=MAX_TOKENS,
                             n=2 if i == 3 else 1)            # one request forks two choices
              for i in range(len(prompts))]
    got, expected, preempted = _run_both(engines, prompts, params)
    assert preempted > 0, "the small cache never forced a preemption: the test lost its point"
    assert [len(out.outputs) for out in got] == [p.n for p in params]
    assert _choices(got) == _choices(expected)
    # Sampling really was random: the two choices of the n=2 request went different ways.
    assert got[3].outputs[0].token_ids != got[3].outputs[1].token_ids
