"""SamplingParams through the whole engine: seeds, limits, stop tokens, n, logprobs; aborts and
bad requests. Most tests share one engine (conftest.mixtral_llm) and leave it empty."""

from __future__ import annotations

import math

import pytest
import torch

from tests.checkpoints import write_checkpoint
from tests.engine.engine_helpers import TINY_VOCAB, load_hf, make_llm, random_prompts

from moeserve.request import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [c.token_ids for out in outputs for c in out.outputs]


def _assert_idle(llm) -> None:
    blocks = llm.engine.scheduler.blocks
    assert not llm.engine.has_unfinished_requests()
    assert blocks.num_free_blocks == blocks.num_blocks, "KV blocks leaked"
    llm.engine.scheduler.check_invariants()


def _first_new_token(tokens: list[int], at_least: int) -> int:
    """Index of the first token at or after `at_least` that did not occur earlier."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


# ---- seeds ----

def test_seeded_sample_independent_of_batch_composition(mixtral_llm):
    (target,) = random_prompts([20], seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=42, max_tokens=16,
                            ignore_eos=True)
    (alone,) = mixtral_llm.generate([target], params)
    others = random_prompts([5, 120, 33, 1, 64, 9, 47], seed=2)
    other_params = [
        GREEDY,
        SamplingParams(temperature=1.0, max_tokens=12),                       # unseeded
        SamplingParams(temperature=0.7, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.2, top_k=5, max_tokens=8, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, min_p=0.05, seed=43, max_tokens=16, frequency_penalty=0.5),
        SamplingParams(temperature=0.5, n=2, max_tokens=10),
        SamplingParams(temperature=1.0, top_p=0.5, max_tokens=24, presence_penalty=1.0),
    ]
    for position in (0, 3, 7):
        prompts = others[:position] + [target] + others[position:]
        params_list = other_params[:position] + [params] + other_params[position:]
        outputs = mixtral_llm.generate(prompts, params_list)
        got = outputs[position].outputs[0].token_ids
        assert got == alone.outputs[0].token_ids, f"at {position}"
    _assert_idle(mixtral_llm)


def test_same_seed_repeats_and_different_seeds_differ(mixtral_llm):
    (prompt,) = random_prompts([12], seed=3)
    runs = {seed: _tokens(mixtral_llm.generate([prompt], SamplingParams(
        temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)))[0] for seed in (1, 2)}
    again = _tokens(mixtral_llm.generate([prompt], SamplingParams(
        temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)))[0]
    assert again == runs[1]
    assert runs[1] != runs[2]


# ---- limits and stops ----

def test_max_tokens_ends_with_length(mixtral_llm):
    prompts = random_prompts([3, 40], seed=4)
    for max_tokens in (1, 5):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for out in mixtral_llm.generate(prompts, params):
            (choice,) = out.outputs
            assert len(choice.token_ids) == max_tokens
            assert choice.finish_reason is FinishReason.LENGTH
            assert choice.stop_reason is None


def test_stop_token_id_ends_with_stop(mixtral_llm):
    (prompt,) = random_prompts([25], seed=5)
    (free,) = _tokens(mixtral_llm.generate([prompt], GREEDY))
    k = _first_new_token(free, at_least=3)
    stop_token = free[k]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                            stop_token_ids=[stop_token])
    (out,) = mixtral_llm.generate([prompt], params)
    (choice,) = out.outputs
    assert choice.token_ids == free[: k + 1]          # the stop token is the last one returned
    assert choice.finish_reason is FinishReason.STOP
    assert choice.stop_reason == stop_token


def test_min_tokens_holds_back_a_stop_token(mixtral_llm):
    (prompt,) = random_prompts([25], seed=5)
    (free,) = _tokens(mixtral_llm.generate([prompt], GREEDY))
    k = _first_new_token(free, at_least=3)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                            stop_token_ids=[free[k]], min_tokens=k + 1)
    (choice,) = mixtral_llm.generate([prompt], params)[0].outputs
    assert choice.token_ids[:k] == free[:k]
    assert free[k] not in choice.token_ids[: k + 1]
    assert len(choice.token_ids) >= k + 1


def test_eos_stops_unless_ignored(mixtral_llm, tmp_path):
    """A checkpoint identical but for its EOS id, chosen as a token greedy decoding produces."""
    (prompt,) = random_prompts([30], seed=6)
    (free,) = _tokens(mixtral_llm.generate([prompt], GREEDY))
    k = _first_new_token(free, at_least=2)
    eos_dir = write_checkpoint(tmp_path / "eos", "mixtral", eos_token_id=free[k])
    llm = make_llm(eos_dir)
    assert free[k] in llm.engine.eos_token_ids
    (stopped,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0].outputs
    assert stopped.token_ids == free[: k + 1]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.stop_reason is None                 # EOS, not a user stop (as vLLM)
    (ignored,) = llm.generate([prompt], GREEDY)[0].outputs
    assert ignored.token_ids == free
    assert ignored.finish_reason is FinishReason.LENGTH


def test_context_limit_ends_with_length(mixtral_llm):
    max_len = mixtral_llm.engine.max_model_len
    (prompt,) = random_prompts([max_len - 2], seed=7)
    (choice,) = mixtral_llm.generate([prompt], GREEDY)[0].outputs
    assert len(choice.token_ids) == 2
    assert choice.finish_reason is FinishReason.LENGTH
    _assert_idle(mixtral_llm)


# ---- n > 1 ----

def test_n_seeded_choices_differ(mixtral_llm):
    (prompt,) = random_prompts([18], seed=8)
    params = SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True)
    (out,) = mixtral_llm.generate([prompt], params)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for choice in out.outputs:
        assert len(choice.token_ids) == 12 and choice.finish_reason is FinishReason.LENGTH
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    (again,) = mixtral_llm.generate([prompt], params)
    assert _tokens([again]) == _tokens([out])
    _assert_idle(mixtral_llm)


def test_n_greedy_choices_are_identical(mixtral_llm):
    (prompt,) = random_prompts([40], seed=10)      # > one block: children share prompt blocks
    (single,) = _tokens(mixtral_llm.generate([prompt], GREEDY))
    params = SamplingParams(n=3, temperature=0.0, max_tokens=16, ignore_eos=True)
    (out,) = mixtral_llm.generate([prompt], params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [single] * 3
    _assert_idle(mixtral_llm)


# ---- logprobs ----

def test_logprobs_per_token_match_transformers(mixtral_llm, mixtral_dir):
    (prompt,) = random_prompts([15], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    (choice,) = mixtral_llm.generate([prompt], params)[0].outputs
    assert len(choice.logprobs) == len(choice.token_ids) == 6
    ref = load_hf(mixtral_dir)
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + choice.token_ids])).logits[0]        # [L, V]
    expected = logits[len(prompt) - 1: -1].log_softmax(-1)                        # [6, V]
    for i, (token, entry) in enumerate(zip(choice.token_ids, choice.logprobs)):
        assert entry["token_id"] == token
        assert entry["logprob"] == pytest.approx(expected[i, token].item(), abs=1e-4)
        top = entry["top"]
        assert len(top) == 3
        assert top[0][0] == token                      # greedy: the sampled token is the top one
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        for tid, lp in top:
            assert lp == pytest.approx(expected[i, tid].item(), abs=1e-4)


def test_logprobs_zero_and_none(mixtral_llm):
    (prompt,) = random_prompts([10], seed=12)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True, logprobs=0)
    (choice,) = mixtral_llm.generate([prompt], sampled)[0].outputs
    assert len(choice.logprobs) == 5
    for token, entry in zip(choice.token_ids, choice.logprobs):
        assert entry["token_id"] == token and entry["top"] == []
        assert entry["logprob"] <= 0 and math.isfinite(entry["logprob"])
    (plain,) = mixtral_llm.generate([prompt], GREEDY)[0].outputs
    assert plain.logprobs is None


# ---- abort ----

def test_abort_mid_generation_frees_every_block(mixtral_llm):
    engine = mixtral_llm.engine
    total = engine.scheduler.blocks.num_blocks
    long_prompt, short_prompt, forked_prompt, waiting_prompt = random_prompts([600, 30, 50, 20],
                                                                              seed=13)
    engine.add_request("abort-long", long_prompt, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("abort-keep", short_prompt, SamplingParams(temperature=0.0, max_tokens=10,
                                                                   ignore_eos=True))
    engine.add_request("abort-n", forked_prompt,
                       SamplingParams(n=3, temperature=1.0, max_tokens=100, ignore_eos=True))
    engine.step()                                  # the 600-token prompt is part way in
    assert engine.scheduler.blocks.num_free_blocks < total
    engine.abort("abort-long")                     # mid-prefill
    engine.add_request("abort-waiting", waiting_prompt, SamplingParams(max_tokens=5))
    engine.abort("abort-waiting")                  # never scheduled
    seen: dict[str, list] = {}
    for _ in range(4):
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    n_out = seen["abort-n"][-1]
    assert len(n_out.outputs) == 3 and all(c.token_ids for c in n_out.outputs)   # forked, decoding
    engine.abort("abort-n")                        # mid-decode, after the fork
    engine.abort("abort-n")                        # twice: ignored
    engine.abort("no-such-request")
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert set(seen) == {"abort-keep", "abort-n"}
    assert len(seen["abort-n"]) == 4               # nothing after the abort
    keep = seen["abort-keep"][-1]
    assert keep.finished and len(keep.outputs[0].token_ids) == 10
    assert engine.scheduler.blocks.num_free_blocks == total
    engine.scheduler.check_invariants()


# ---- bad requests ----

@pytest.mark.parametrize("bad_token", [TINY_VOCAB, -1, 10**9])
def test_token_outside_vocabulary_is_rejected(mixtral_llm, bad_token):
    good, other = random_prompts([8, 8], seed=14)
    with pytest.raises(ValueError, match="vocabulary"):
        mixtral_llm.generate([good[:3] + [bad_token] + good[3:]], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        mixtral_llm.generate([other, good + [bad_token]], GREEDY)    # the good one must not linger
    _assert_idle(mixtral_llm)
    (out,) = mixtral_llm.generate([good], GREEDY)                    # still serving
    assert len(out.outputs[0].token_ids) == 16


def test_prompt_too_long_is_rejected(mixtral_llm):
    max_len = mixtral_llm.engine.max_model_len
    for length in (max_len, max_len + 50):
        (prompt,) = random_prompts([length], seed=15)
        with pytest.raises(ValueError, match="context"):
            mixtral_llm.generate([prompt], GREEDY)
    with pytest.raises(ValueError):
        mixtral_llm.generate([[]], GREEDY)
    _assert_idle(mixtral_llm)
    (out,) = mixtral_llm.generate(random_prompts([4], seed=16), GREEDY)
    assert out.finished


def test_prompt_longer_than_configured_max_model_len(mixtral_dir):
    llm = make_llm(mixtral_dir, max_model_len=64)
    with pytest.raises(ValueError, match="context"):
        llm.generate(random_prompts([64], seed=17), GREEDY)
    (out,) = llm.generate(random_prompts([60], seed=17), GREEDY)
    (choice,) = out.outputs
    assert len(choice.token_ids) == 4 and choice.finish_reason is FinishReason.LENGTH
