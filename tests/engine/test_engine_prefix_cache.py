"""Prefix caching end to end: outputs identical with caching on, off, and in transformers.

Prompts share a "system prompt" of 70 tokens (4 full blocks and 6 tokens) or nothing; some are
identical, one is the system prompt cut at a block boundary. They run under a 64-token step
budget, so cached prefixes meet chunked prefill and mixed steps; a small KV cache adds preemption
and eviction; a multi-turn conversation resends its history.
"""

from __future__ import annotations

import pytest

from tests.checkpoints import ARCHITECTURES
from tests.engine.engine_helpers import hf_greedy, kv_bytes_for_blocks, load_hf, make_llm, random_prompts

from moeserve.request import SamplingParams

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    system, *tails = random_prompts((70, 5, 30, 1, 17, 40), seed=seed)
    unrelated = random_prompts((50, 90), seed=seed + 1)
    return ([system + tail for tail in tails]            # share 4 blocks, then differ
            + [system + tails[0]]                        # identical to the first: shares all it can
            + [system[:64]]                              # the prefix cut at a block boundary
            + unrelated)                                 # share nothing


def _tokens(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in outputs]


def _assert_no_leak(llm) -> None:
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    llm.engine.scheduler.check_invariants()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_prefixes_give_the_same_tokens_as_recomputing_and_transformers(arch, tiny_checkpoints):
    model_dir = tiny_checkpoints[arch]
    prompts = shared_prefix_prompts(seed=len(arch))
    cached = make_llm(model_dir, max_num_batched_tokens=64)
    plain = make_llm(model_dir, max_num_batched_tokens=64, enable_prefix_caching=False)

    warm = cached.generate(prompts[:1], GREEDY)          # fills the cache with the system prompt
    assert warm[0].num_cached_tokens == 0
    got = cached.generate(prompts, GREEDY)
    expected = plain.generate(prompts, GREEDY)
    assert _tokens(got) == _tokens(expected)

    sched = cached.engine.scheduler
    assert sched.prefix_cache_hits == 64 * 6 + 48     # 6 prompts reuse 4 blocks, the cut one 3
    assert got[0].num_cached_tokens == 64                # 70 + 5 tokens: 4 full blocks reused
    assert got[-1].num_cached_tokens == 0                # unrelated prompt
    assert got[6].num_cached_tokens == 48                # 64 tokens: the last block is recomputed
    assert plain.engine.scheduler.prefix_cache_queries == 0

    ref = load_hf(model_dir)
    for prompt, out in zip(prompts, got):
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, MAX_TOKENS), f"{arch}, {len(prompt)} tokens"
    for llm in (cached, plain):
        _assert_no_leak(llm)


def test_second_turn_of_a_conversation_reuses_the_first(mixtral_dir):
    cached = make_llm(mixtral_dir, max_num_batched_tokens=64)
    plain = make_llm(mixtral_dir, max_num_batched_tokens=64, enable_prefix_caching=False)
    history = random_prompts((90,), seed=5)[0]
    computed_before = 0      # tokens the previous turn left in the KV cache
    for turn in range(3):
        (got,) = cached.generate([history], GREEDY)
        (expected,) = plain.generate([history], GREEDY)
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        # the previous turn's full blocks (its prompt and all answer tokens but the last, which
        # was never fed back), at most up to the block before this prompt's last token
        assert got.num_cached_tokens == min(computed_before // 16, (len(history) - 1) // 16) * 16
        computed_before = len(history) + MAX_TOKENS - 1
        history = history + got.outputs[0].token_ids + random_prompts((7,), seed=turn)[0]
    _assert_no_leak(cached)


def test_kv_pressure_evicts_and_changes_no_output(mixtral_dir):
    """A cache of 20 blocks serves 8 requests sharing a 70-token prefix, 40 tokens each: it must
    preempt and evict cached blocks, and no block may be handed out while in use."""
    prompts = shared_prefix_prompts(seed=3)[:8]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    small = make_llm(mixtral_dir, kv_cache_memory=kv_bytes_for_blocks(mixtral_dir, 20),
                     max_num_batched_tokens=64)
    plain = make_llm(mixtral_dir, max_num_batched_tokens=64, enable_prefix_caching=False)
    got = small.generate(prompts, params)
    assert _tokens(got) == _tokens(plain.generate(prompts, params))
    sched = small.engine.scheduler
    assert sched.num_preemptions > 0 and sched.prefix_cache_hits > 0
    _assert_no_leak(small)
    # every block has been handed out again since: the cache still answers correctly afterwards
    again = small.generate(prompts[:3], params)
    assert _tokens(again) == _tokens(got[:3])
    _assert_no_leak(small)


def test_n_choices_and_seeded_sampling_do_not_change(mixtral_dir):
    prompts = shared_prefix_prompts(seed=9)[:4]
    params = SamplingParams(n=3, temperature=0.9, top_p=0.9, seed=123, max_tokens=MAX_TOKENS, ignore_eos=True)
    cached = make_llm(mixtral_dir, max_num_batched_tokens=64)
    plain = make_llm(mixtral_dir, max_num_batched_tokens=64, enable_prefix_caching=False)
    cached.generate(prompts[:1], GREEDY)
    assert _tokens(cached.generate(prompts, params)) == _tokens(plain.generate(prompts, params))
    _assert_no_leak(cached)


def test_aborted_request_leaves_usable_cached_blocks(mixtral_dir):
    llm = make_llm(mixtral_dir, max_num_batched_tokens=64)
    prompts = shared_prefix_prompts(seed=4)
    engine = llm.engine
    engine.add_request("gone", prompts[0], GREEDY)
    for _ in range(3):                                    # prefill (two chunks) and a decode
        engine.step()
    engine.abort("gone")
    _assert_no_leak(llm)
    (out,) = llm.generate([prompts[1]], GREEDY)
    assert out.num_cached_tokens == 64
    plain = make_llm(mixtral_dir, enable_prefix_caching=False)
    assert _tokens([out]) == _tokens(plain.generate([prompts[1]], GREEDY))
