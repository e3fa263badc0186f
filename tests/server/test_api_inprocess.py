"""The app in this process, where the engine can be inspected: no KV block stays allocated after
client errors or client disconnects, and an engine failure becomes 500s, an error event in open
streams, and /health 503 -- never a traceback or a hang."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from moeserve.request import SamplingParams
from moeserve.server.app import create_app
from tests.server.api_helpers import (
    CHAT, all_blocks_free, assert_error, blocks_of, build_inproc_context, sse_chunks, sse_data,
    start_inproc_server, wait_blocks_free)

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


# ---------------------------------------------------------------- errors, over ASGITransport

BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": '),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "x"}),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "hi", "n": 1000}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}),
    ("/v1/completions", {"prompt": ["ok", [1, 2, 10**6]]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hi", "stream": True, "top_p": 0}),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000}),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2, "stream": True, "temperature": -1}),
]


@pytest.fixture(scope="module")
def inproc(builtin_dir):
    """The app under uvicorn in a thread: real sockets, so a client can really disconnect."""
    server = start_inproc_server(build_inproc_context(builtin_dir))
    yield server
    server.stop()


@pytest.mark.asyncio
async def test_errors_leave_no_kv_blocks(inproc):
    ctx = inproc.ctx                      # engine already started by the uvicorn app's lifespan
    app = create_app(ctx, max_body_bytes=4096)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test", timeout=30) as http:
        for path, body in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await http.post(path, json=body)
            assert 400 <= r.status_code < 500, (body, r.text)
            assert_error(r, r.status_code)
        big = json.dumps({"prompt": "a" * 5000}).encode()
        assert_error(await http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

        async def chunked():
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        assert_error(await http.post("/v1/completions", content=chunked(),
                                     headers={"content-type": "application/json"}), 413)
        assert all_blocks_free(ctx)
        # Good requests, streamed and not, n > 1 and prompt lists, all run to the end.
        good = [("/v1/completions", {"prompt": ["a b", "c d"], "n": 2, "max_tokens": 3}),
                ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True}),
                ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "n": 2, "stream": True})]
        for path, body in good:
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
    wait_blocks_free(ctx)
    blocks_of(ctx).check_invariants([])


# ---------------------------------------------------------------- client disconnects

def _stream_then_disconnect(url: str, path: str, body: dict, chunks: int = 3) -> None:
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + path, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            got = 0
            for line in response.iter_lines():
                got += line.startswith("data:")
                if got == chunks:
                    break
            assert got == chunks


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Once upon a time", **LONG}),
    ("/v1/chat/completions", {"messages": CHAT, **LONG}),
    ("/v1/completions", {"prompt": ["first", "second"], "n": 3, **LONG, "temperature": 1.0}),
])
def test_disconnect_mid_stream_frees_kv_blocks(inproc, path, body):
    _stream_then_disconnect(inproc.url, path, body)
    waited = wait_blocks_free(inproc.ctx, timeout=1.0)
    assert waited < 1.0
    _next_request_is_prompt(inproc)


def test_openai_client_closing_a_stream_frees_kv_blocks(inproc):
    with openai.OpenAI(base_url=inproc.url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(messages=CHAT, model=inproc.ctx.served.name, stream=True,
                                                max_tokens=400, extra_body={"ignore_eos": True})
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        assert not all_blocks_free(inproc.ctx)
        stream.close()
    wait_blocks_free(inproc.ctx, timeout=1.0)
    _next_request_is_prompt(inproc)


def test_disconnect_while_waiting_for_a_whole_response_frees_kv_blocks(inproc):
    """A non-streaming request whose client gives up is aborted too, not run to max_tokens."""
    with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(inproc.url + "/v1/completions", json={"prompt": "Once upon a time", **LONG})
    wait_blocks_free(inproc.ctx, timeout=1.5)
    _next_request_is_prompt(inproc)


@pytest.mark.asyncio
async def test_request_cancelled_while_being_added_is_aborted(inproc):
    """Cancelled after the add was sent but before the engine answered: the engine must not keep it."""
    bridge = inproc.ctx.engine
    sampling = SamplingParams(max_tokens=400, ignore_eos=True)
    task = asyncio.create_task(bridge.add_request("cancelled-add", [5, 6, 7], sampling))
    await asyncio.sleep(0)            # the add is on its way to the engine thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Commands reach the engine in order: once this one is served, the add and its abort were seen.
    async for _ in await bridge.add_request("after-cancel", [5, 6, 7], SamplingParams(max_tokens=2)):
        pass
    deadline = time.monotonic() + 1.0
    while bridge.engine.has_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not bridge.engine.has_unfinished_requests()
    wait_blocks_free(inproc.ctx)


def _next_request_is_prompt(inproc) -> None:
    start = time.monotonic()
    r = httpx.post(inproc.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - start < 2.0
    wait_blocks_free(inproc.ctx)


# ---------------------------------------------------------------- engine failure

class _FailOnDemand:
    """Wraps runner.execute: raises once `armed` is set (the engine loop then stops for good)."""

    def __init__(self, execute) -> None:
        self.execute, self.armed, self.calls_after = execute, threading.Event(), 0

    def __call__(self, batch):
        if self.armed.is_set():
            self.calls_after += 1
            raise RuntimeError("injected failure in execute")
        return self.execute(batch)


def test_engine_failure(builtin_dir, monkeypatch):
    server = start_inproc_server(build_inproc_context(builtin_dir))
    try:
        runner = server.ctx.engine.engine.runner
        failing = _FailOnDemand(runner.execute)
        monkeypatch.setattr(runner, "execute", failing)
        whole: dict = {}

        def non_streaming():      # in flight when the engine fails
            whole["r"] = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", **LONG}, timeout=30)

        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/chat/completions",
                             json={"messages": CHAT, "stream": True, **LONG}) as response:
                lines = response.iter_lines()
                first = [next(lines) for _ in range(6)]           # 3 events: the stream is under way
                background = threading.Thread(target=non_streaming)
                background.start()
                time.sleep(0.2)
                failing.armed.set()
                events = sse_data(first + list(lines))
            background.join(30)
            assert failing.calls_after == 1

            # The open stream: some chunks, then one error event, then [DONE]; no finish_reason.
            chunks = sse_chunks(events)
            *deltas, error_event = chunks
            assert deltas and all("choices" in c for c in deltas)
            assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
            assert set(error_event) == {"error"} and error_event["error"]["code"] == 500
            assert set(error_event["error"]) == {"message", "type", "param", "code"}
            assert "Traceback" not in "".join(events)

            # The request that was waiting for a whole response: 500 with an error object.
            assert_error(whole["r"], 500)
            # New requests: 500 at once (not a hang), streamed or not; /health is 503.
            start = time.monotonic()
            assert_error(http.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 500)
            assert_error(http.post(server.url + "/v1/chat/completions",
                                   json={"messages": CHAT, "max_tokens": 2, "stream": True}), 500)
            assert time.monotonic() - start < 2.0
            assert_error(http.get(server.url + "/health"), 503)
            assert http.get(server.url + "/version").status_code == 200
    finally:
        server.stop()
