"""Text through the whole engine, on the built-in model (the tiny checkpoints have no tokenizer):
the detokenized text equals tokenizer.decode of the token ids, streamed deltas add up to it, and
a stop string ends the sequence with finish_reason STOP and is trimmed from the text."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.engine.engine_helpers import make_llm

from moeserve.request import FinishReason, SamplingParams

PROMPTS = ["Hello there, how are you?", "The quick brown fox", "def fibonacci(n):",
           "Once upon a time"]
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def llm(builtin_dir):
    return make_llm(builtin_dir, kv_cache_memory=32 * 2**20)


@pytest.fixture(scope="module")
def greedy_runs(llm):
    """Each prompt's greedy output with no stop strings: what the stop tests cut short."""
    return llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))


def _stream(llm, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Runs requests together through Engine.step. Returns, per request id, its final output and
    per choice the concatenation of the streamed text deltas."""
    engine = llm.engine
    deltas = {rid: [""] * params.n for rid, (_, params) in requests.items()}
    final = {}
    for rid, (prompt_ids, params) in requests.items():
        engine.add_request(rid, prompt_ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            for choice in out.outputs:
                deltas[out.request_id][choice.index] += choice.delta_text
            if out.finished:
                final[out.request_id] = out
    assert final.keys() == requests.keys()
    return {rid: (final[rid], deltas[rid]) for rid in requests}


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_equals_decode_of_token_ids(llm, skip_special_tokens):
    tok = llm.tokenizer
    # Hot, seeded sampling over 16 choices: deterministic, and wide enough to draw special tokens
    # (and ids past the tokenizer's vocabulary, which the model's padded vocab allows).
    params = SamplingParams(n=16, temperature=5.0, seed=1, max_tokens=32, ignore_eos=True,
                            skip_special_tokens=skip_special_tokens)
    prompt_ids = tok.encode("Hello", add_special_tokens=True)
    out, deltas = _stream(llm, {"text": (prompt_ids, params)})["text"]
    for choice in out.outputs:
        assert choice.finish_reason is FinishReason.LENGTH
        expected = tok.decode(choice.token_ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)
        assert choice.text == expected, f"choice {choice.index}"
        assert deltas[choice.index] == choice.text, f"choice {choice.index}: deltas"
    special = set(tok.all_special_ids)
    with_special = [c for c in out.outputs if special & set(c.token_ids)]
    assert with_special, "no choice sampled a special token: pick another seed"
    names = set(tok.all_special_tokens)
    shown = any(name in c.text for c in with_special for name in names)
    assert shown is not skip_special_tokens


def test_greedy_text_of_string_prompts(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    tok = llm.tokenizer
    for prompt, out in zip(PROMPTS, outputs):
        assert out.prompt_token_ids == tok.encode(prompt, add_special_tokens=True)
        (choice,) = out.outputs
        assert choice.text == tok.decode(choice.token_ids, skip_special_tokens=True)


def _pick_stop(tok, ids: list[int]) -> str | None:
    """A 4-character stop string that spans the boundary between two tokens (the harder case for
    an incremental matcher) and first occurs as late in the text as possible."""
    text = tok.decode(ids, skip_special_tokens=True)
    for j in range(len(ids) - 1, 1, -1):
        head = tok.decode(ids[:j], skip_special_tokens=True)
        if not text.startswith(head) or head.endswith(REPLACEMENT) or len(head) < 4:
            continue
        stop = text[len(head) - 2 : len(head) + 2]
        if len(stop) == 4 and REPLACEMENT not in stop and text.find(stop) == len(head) - 2:
            return stop
    return None


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_is_trimmed_and_reported(llm, greedy_runs, include_stop):
    tok = llm.tokenizer
    cases, requests = {}, {}
    for i, free in enumerate(greedy_runs):
        ids = free.outputs[0].token_ids
        stop = _pick_stop(tok, ids)
        if stop is None:
            continue
        # The sequence ends on the first token whose text completes the stop string.
        m = next(m for m in range(1, len(ids) + 1)
                 if stop in tok.decode(ids[:m], skip_special_tokens=True))
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                stop=[stop, "never-seen"], include_stop_str_in_output=include_stop)
        cases[i] = (ids, stop, m)
        requests[f"stop-{i}"] = (free.prompt_token_ids, params)
        # Here the token completing the stop string is also the last one max_tokens allows: still
        # a stop (as vLLM), since the text was cut there.
        requests[f"cut-{i}"] = (free.prompt_token_ids, replace(params, max_tokens=m))
    assert len(cases) >= 3, "too few greedy outputs had a usable stop string"
    results = _stream(llm, requests)
    for i, (ids, stop, m) in cases.items():
        text = tok.decode(ids, skip_special_tokens=True)
        at = text.find(stop)
        for rid in (f"stop-{i}", f"cut-{i}"):
            out, deltas = results[rid]
            (choice,) = out.outputs
            assert choice.finish_reason is FinishReason.STOP, rid
            assert choice.stop_reason == stop, rid
            assert choice.token_ids == ids[:m], rid
            assert choice.text == text[: at + len(stop) if include_stop else at], rid
            assert deltas[0] == choice.text, rid     # nothing streamed that the stop took back
    assert not llm.engine.has_unfinished_requests()
