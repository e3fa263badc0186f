"""The official `openai` client, sync and async, against a live `moeserve serve`: response shapes,
exact usage, finish reasons, streaming (and raw SSE framing), n > 1, logprobs, prompt lists,
token-id prompts, seeds, and the small GET routes."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import pytest_asyncio

import moeserve
from tests.server.api_helpers import CHAT, sse_chunks, stream_raw

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest_asyncio.fixture
async def aclient(live_server):
    async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(builtin_dir) -> str:
    return builtin_dir.name


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def assert_usage(usage, prompt_tokens: int, completion_tokens: int) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert usage.total_tokens == prompt_tokens + completion_tokens


def assert_header(obj, kind: str, id_prefix: str, model: str) -> None:
    assert obj.object == kind
    assert obj.id.startswith(id_prefix) and len(obj.id) > len(id_prefix) + 8
    assert abs(obj.created - time.time()) < 120
    assert obj.model == model


# ---------------------------------------------------------------- non-streaming

def test_completion_shape_usage_and_length(client, model, builtin_tokenizer):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=7, **GREEDY)
    assert_header(out, "text_completion", "cmpl-", model)
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert_usage(out.usage, len(builtin_tokenizer.encode(PROMPT)), 7)


def test_chat_shape_usage_and_length(client, model, builtin_tokenizer):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, **GREEDY)
    assert_header(out, "chat.completion", "chatcmpl-", model)
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert_usage(out.usage, chat_prompt_len(builtin_tokenizer, CHAT), 6)


def test_max_completion_tokens_counts_exactly(client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_model_may_be_omitted_by_raw_clients(live_server):
    r = httpx.post(live_server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def _stop_string(text: str) -> str:
    """A character of text, past the first one, that can end a completion early."""
    for k, ch in enumerate(text):
        if k >= 1 and ch.isascii() and ch.isalnum():
            return ch
    pytest.skip(f"no ASCII character to stop on in {text!r}")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stop_string_gives_finish_reason_stop(client, model, endpoint):
    def run(**kw):
        if endpoint == "completions":
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, **GREEDY, **kw)
            return out.choices[0].text, out.choices[0], out
        out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, **GREEDY, **kw)
        return out.choices[0].message.content, out.choices[0], out

    full, _, _ = run()
    stop = _stop_string(full)
    text, choice, out = run(stop=[stop])
    assert choice.finish_reason == "stop"
    assert text == full[: full.index(stop)]
    assert choice.model_extra.get("stop_reason") == stop
    assert 1 <= out.usage.completion_tokens < 16


def test_completion_logprobs(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert isinstance(token, str) and logprob <= 0
        assert 1 <= len(top) <= 3                  # top 2 (+ the sampled one), merged if they decode alike
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)    # greedy: the sampled one is the best


def test_chat_logprobs(client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 4
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and entry.bytes is not None
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_chat_without_logprobs_has_none(client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, **GREEDY)
    assert out.choices[0].logprobs is None


def test_prompt_list_and_token_ids_index_by_prompt_then_n(client, model, builtin_tokenizer):
    prompts = ["Once upon a time", "In a galaxy far"]
    singles = [client.completions.create(model=model, prompt=p, max_tokens=4, **GREEDY).choices[0].text
               for p in prompts]
    ids = [builtin_tokenizer.encode(p) for p in prompts]
    for prompt in (prompts, ids):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=4, n=2, **GREEDY)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        for c in out.choices:               # index = prompt_index * n + i; greedy: both choices alike
            assert c.text == singles[c.index // 2] and c.finish_reason == "length"
        assert_usage(out.usage, sum(map(len, ids)), 2 * 2 * 4)


def test_single_token_id_prompt(client, model, builtin_tokenizer):
    ids = builtin_tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, **GREEDY)
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_seed_reproducible(client, model):
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2,
                                        seed=seed, extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_models_version_health(client, model, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].object == "model"
    assert models.data[0].model_extra["max_model_len"] == 512
    assert httpx.get(live_server.url + "/version").json() == {"version": moeserve.__version__}
    assert httpx.get(live_server.url + "/health").status_code == 200


# ---------------------------------------------------------------- streaming

def _finishes(chunks) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return reasons


def test_stream_completion_matches_non_stream(client, model, builtin_tokenizer):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    for chunk in chunks:
        assert_header(chunk, "text_completion", "cmpl-", model)
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert_usage(last.usage, len(builtin_tokenizer.encode(PROMPT)), 8)
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert _finishes(body) == {0: ["length"]}
    assert body[-1].choices[0].finish_reason == "length"


def test_stream_chat_matches_non_stream(client, model, builtin_tokenizer):
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, **GREEDY)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    for chunk in chunks:
        assert_header(chunk, "chat.completion.chunk", "chatcmpl-", model)
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    assert last.choices == [] and last.usage is not None
    assert_usage(last.usage, chat_prompt_len(builtin_tokenizer, CHAT), 8)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert _finishes(body) == {0: ["length"]}


def test_stream_without_usage_option_has_no_usage_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, stream=True, **GREEDY))
    assert all(c.choices and c.usage is None for c in chunks)


def test_stream_stop_string(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, **GREEDY).choices[0].text
    stop = _stop_string(full)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, stop=stop,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert _finishes(chunks) == {0: ["stop"]}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_n_interleaves_by_index(client, model, endpoint):
    n, max_tokens = 3, 6
    kw = dict(model=model, max_tokens=max_tokens, n=n, temperature=0.9, seed=7, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    if endpoint == "completions":
        chunks = list(client.completions.create(prompt=PROMPT, **kw))
    else:
        chunks = list(client.chat.completions.create(messages=CHAT, **kw))
    *body, last = chunks
    assert all(len(c.choices) == 1 for c in body)
    order = [c.choices[0].index for c in body]
    assert set(order) == set(range(n))
    assert order != sorted(order), "the choices' chunks should interleave, not come one choice after another"
    assert _finishes(body) == {i: ["length"] for i in range(n)}
    if endpoint == "chat":       # every choice opens with its own role delta
        assert [c.choices[0].index for c in body[:n] if c.choices[0].delta.role == "assistant"] == list(range(n))
    assert last.usage.completion_tokens == n * max_tokens


def test_stream_logprobs(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                            **GREEDY))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    expected = whole.choices[0].logprobs
    assert [t for p in parts for t in p.tokens] == expected.tokens
    assert [o for p in parts for o in p.text_offset] == expected.text_offset    # offsets run on across chunks
    assert [lp for p in parts for lp in p.token_logprobs] == pytest.approx(expected.token_logprobs, abs=1e-4)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, logprobs=True,
                                                 top_logprobs=2, stream=True, **GREEDY))
    content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": CHAT}),
])
def test_raw_sse_framing(live_server, path, body):
    """Raw httpx: every event is `data: <json>`, one finish, the usage chunk, then `data: [DONE]` last."""
    request = {**body, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=30) as http:
        events = stream_raw(http, live_server.url + path, request)
    chunks = sse_chunks(events)
    *body_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    finishes = [c["choices"][0]["finish_reason"] for c in body_chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c or c["usage"] is None for c in body_chunks)


# ---------------------------------------------------------------- async client

@pytest.mark.asyncio
async def test_async_completion_and_chat(aclient, model, builtin_tokenizer):
    out = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=5, **GREEDY)
    assert_header(out, "text_completion", "cmpl-", model)
    assert_usage(out.usage, len(builtin_tokenizer.encode(PROMPT)), 5)
    chat = await aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=5, **GREEDY)
    assert_header(chat, "chat.completion", "chatcmpl-", model)
    assert_usage(chat.usage, chat_prompt_len(builtin_tokenizer, CHAT), 5)


@pytest.mark.asyncio
async def test_async_streams_match_non_stream(aclient, model):
    whole = await aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=6, **GREEDY)
    stream = await aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert _finishes(chunks) == {0: ["length"]}

    whole = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=6, **GREEDY)
    stream = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=6, stream=True, **GREEDY)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert _finishes(chunks) == {0: ["length"]}


def test_resent_conversation_reports_cached_prompt_tokens(client, model):
    """A chat's second turn resends the first: usage.prompt_tokens_details.cached_tokens says how
    much of it the prefix cache answered, and streaming usage says the same."""
    history = [{"role": "system", "content": "You are terse. " * 40},
               {"role": "user", "content": "Name three rivers."}]
    first = client.chat.completions.create(model=model, messages=history, max_tokens=4, **GREEDY)
    assert first.usage.prompt_tokens > 100
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And three lakes."}]
    second = client.chat.completions.create(model=model, messages=history, max_tokens=4, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first prompt is a prefix of the second: all its full 16-token blocks are reused
    assert first.usage.prompt_tokens // 16 * 16 <= cached < second.usage.prompt_tokens
    assert cached % 16 == 0
    stream = client.chat.completions.create(model=model, messages=history, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens >= cached
