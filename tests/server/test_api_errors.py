"""Every client error, over raw HTTP against a live server: the status and OpenAI's error object
{"error": {"message", "type", "param", "code"}}, with no traceback. Then 401 (--api-key), 413
(body limit) and 429 (--max-queue), and the server still serves normally afterwards."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.api_helpers import API_KEY, CHAT, assert_error, sse_data

COMPLETIONS, CHAT_PATH = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client


def test_bad_json(http):
    for path in (COMPLETIONS, CHAT_PATH):
        r = http.post(path, content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
        assert_error(r, 400, param=None)
        assert_error(http.post(path, content=b"", headers={"content-type": "application/json"}), 400)
        assert_error(http.post(path, json=["not", "an", "object"]), 400)


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "x"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "n": [1]}, "n"),
    (COMPLETIONS, {"prompt": {"text": "hi"}}, "prompt"),
    (COMPLETIONS, {"max_tokens": 3}, "prompt"),
    (CHAT_PATH, {"messages": "hi"}, "messages"),
    (CHAT_PATH, {"messages": [{"content": "no role"}]}, "messages"),
    (CHAT_PATH, {"messages": CHAT, "stream": "maybe"}, "stream"),
])
def test_wrong_types(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param=param)


def test_unknown_model(http):
    for path, body in ((COMPLETIONS, {"prompt": "hi"}), (CHAT_PATH, {"messages": CHAT})):
        error = assert_error(http.post(path, json={**body, "model": "gpt-nope"}), 404, param="model")
        assert "gpt-nope" in error["message"]


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["hi", ""]])
def test_empty_prompt(http, prompt):
    assert_error(http.post(COMPLETIONS, json={"prompt": prompt}), 400, param="prompt")


def test_empty_messages(http):
    assert_error(http.post(CHAT_PATH, json={"messages": []}), 400, param="messages")


@pytest.mark.parametrize("path,body", [(COMPLETIONS, {"prompt": "hi"}), (CHAT_PATH, {"messages": CHAT})])
@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("n", 1000), ("n", 0), ("max_tokens", 0),
    ("max_tokens", -3), ("top_k", -2), ("min_p", 2.0), ("presence_penalty", 5.0), ("seed", 2**70),
    ("stop", [""]),
])
def test_out_of_range_sampling(http, path, body, field, value):
    assert_error(http.post(path, json={**body, field: value}), 400, param=field)


def test_logprobs_over_limit(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", "logprobs": 50}), 400, param="logprobs")
    assert_error(http.post(CHAT_PATH, json={"messages": CHAT, "logprobs": True, "top_logprobs": 50}), 400,
                 param="top_logprobs")
    assert_error(http.post(CHAT_PATH, json={"messages": CHAT, "top_logprobs": 2}), 400, param="top_logprobs")


@pytest.mark.parametrize("prompt", [[1, 2, 10**6], [-1], [[5, 6], [7, 1 << 40]]])
def test_token_ids_outside_vocabulary(http, prompt):
    assert_error(http.post(COMPLETIONS, json={"prompt": prompt}), 400, param="prompt", contains="vocabulary")


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "hello there", "max_tokens": 600}, "max_tokens"),
    (COMPLETIONS, {"prompt": [7] * 600, "max_tokens": 1}, "prompt"),
    (COMPLETIONS, {"prompt": [7] * 512, "max_tokens": 1}, "prompt"),
    (COMPLETIONS, {"prompt": [7] * 500, "max_tokens": 13}, "max_tokens"),
    (COMPLETIONS, {"prompt": [[7] * 5, [7] * 510], "max_tokens": 5}, "max_tokens"),
    (CHAT_PATH, {"messages": CHAT, "max_tokens": 1000}, "max_tokens"),
    (CHAT_PATH, {"messages": CHAT, "max_completion_tokens": 1000}, None),
    (CHAT_PATH, {"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
])
def test_over_context_length(http, path, body, param):
    error = assert_error(http.post(path, json=body), 400, contains="512")
    if param is not None:
        assert error["param"] == param


def test_exactly_at_context_length_is_served(http):
    r = http.post(COMPLETIONS, json={"prompt": [7] * 500, "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200
    usage = r.json()["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]   # [7] * 500 may be cached already
    assert usage == {"prompt_tokens": 500, "completion_tokens": 12, "total_tokens": 512}
    assert 0 <= cached < 500 and cached % 16 == 0


def test_stream_options_without_stream(http):
    opts = {"stream_options": {"include_usage": True}}
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", **opts}), 400, param="stream_options")
    assert_error(http.post(CHAT_PATH, json={"messages": CHAT, "stream": False, **opts}), 400,
                 param="stream_options")


def test_unsupported_echo(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", "echo": True}), 400, param="echo")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get(COMPLETIONS), 405)


def test_streaming_request_errors_before_the_stream(http):
    """A bad streaming request gets a plain JSON error, not an event stream."""
    r = http.post(CHAT_PATH, json={"messages": CHAT, "stream": True, "temperature": -1})
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, 400, param="temperature")


def test_body_over_limit(http):
    big = b'{"prompt": "' + b"a" * (16 << 20) + b'"}'
    assert_error(http.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413)

    def chunked():          # no Content-Length: the limit is enforced on the bytes received
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    assert_error(http.post(COMPLETIONS, content=chunked(), headers={"content-type": "application/json"}), 413)


def test_still_serves_after_errors(http):
    start = time.monotonic()
    r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - start < 5
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------- --api-key

def test_api_key(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=30) as http:
        body = {"prompt": "hi", "max_tokens": 2}
        assert_error(http.post(COMPLETIONS, json=body), 401)
        assert_error(http.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.post(COMPLETIONS, json=body, headers={"Authorization": API_KEY}), 401)
        assert_error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200
        assert http.get("/version").status_code == 200
        r = http.post(COMPLETIONS, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["choices"]
    with openai.OpenAI(base_url=auth_server.url + "/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with openai.OpenAI(base_url=auth_server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        out = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=2)
        assert out.choices[0].message.role == "assistant"


# ---------------------------------------------------------------- --max-queue

def test_queue_full_gives_429(queue_server):
    """--max-num-seqs 1 --max-queue 1: A runs, B waits, so C is refused with 429 until they go."""
    long = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=queue_server.url, timeout=30) as http:
        with http.stream("POST", COMPLETIONS, json=long) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            assert sse_data(next(lines) for _ in range(2))          # A is running: it has produced a token
            with http.stream("POST", COMPLETIONS, json=long) as b:  # B is accepted (headers sent) and waits
                assert b.status_code == 200
                error = assert_error(http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}), 429)
                assert "max-queue" in error["message"]
                assert_error(http.post(CHAT_PATH, json={"messages": CHAT, "stream": True}), 429)
        # A and B disconnected: they are aborted, and the server serves again.
        deadline = time.monotonic() + 5
        while True:
            r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
            if r.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
