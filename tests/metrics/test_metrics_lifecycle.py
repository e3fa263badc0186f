"""Request metrics survive client disconnects and aborts: each request is counted exactly once,
the running / waiting gauges and KV usage return to 0 (and never go negative), errors are counted
by status. Also: the --expert-metrics flag.

The app runs in this process. httpx.ASGITransport buffers a whole response before returning it,
so closing a stream early never reaches the app; StreamingASGITransport below streams the body
and turns an early close into the `http.disconnect` a real server sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
import pytest_asyncio

from moeserve.cli import build_parser, main, resolve_options
from moeserve.config import EngineConfig, ServerConfig
from tests.metrics.metrics_helpers import label_values, render, sample_value

PROMPTS = ("Hello there, how are you?", "Once upon a time", "Counting: one two three")


class _BodyStream(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue, task: asyncio.Task, disconnected: asyncio.Event) -> None:
        self._chunks, self._task, self._disconnected = chunks, task, disconnected

    async def __aiter__(self):
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self._disconnected.set()           # the app's next receive() gets http.disconnect
        await asyncio.wait_for(self._task, timeout=10)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Runs the ASGI app in a task; the response returns at `http.response.start` and its body
    streams as the app sends it. Closing the response early disconnects the client."""

    def __init__(self, app) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([part async for part in request.stream])
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "headers": [(k.lower(), v) for k, v in request.headers.raw], "scheme": request.url.scheme,
                 "path": request.url.path, "raw_path": request.url.raw_path.split(b"?")[0],
                 "query_string": request.url.query, "server": (request.url.host, request.url.port),
                 "client": ("127.0.0.1", 123), "root_path": ""}
        chunks: asyncio.Queue = asyncio.Queue()
        started, disconnected = asyncio.Event(), asyncio.Event()
        head: dict = {}
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if disconnected.is_set():
                return                                      # nobody is listening any more
            if message["type"] == "http.response.start":
                head.update(status=message["status"], headers=message.get("headers", []))
                started.set()
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        task = asyncio.create_task(self.app(scope, receive, send))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not started.is_set():
            task.result()                                   # raises the app's exception
            raise RuntimeError("the app returned without starting a response")
        return httpx.Response(head["status"], headers=head["headers"],
                              stream=_BodyStream(chunks, task, disconnected))


@pytest.fixture(scope="module")
def ctx(builtin_model_dir):
    """One running sequence at a time: a second request waits, deterministically."""
    from moeserve.server.launch import build_context
    engine_cfg = EngineConfig(model=str(builtin_model_dir), dtype="float32", kv_cache_memory=16 << 20,
                              max_model_len=512, max_num_seqs=1)
    context = build_context(engine_cfg, ServerConfig())
    context.engine.start()          # ASGI transports do not run the lifespan
    yield context
    context.engine.stop()


@pytest_asyncio.fixture
async def client(ctx):
    from moeserve.server.app import create_app
    app = create_app(ctx, metrics=ctx.engine.metrics)
    async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://moeserve") as c:
        yield c


class GaugeWatch:
    """Samples the queue and KV gauges every few ms while requests run."""

    NAMES = ("moeserve_num_requests_running", "moeserve_num_requests_waiting", "moeserve_kv_cache_usage_ratio")

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.seen: dict[str, list[float]] = {name: [] for name in self.NAMES}
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            samples = render(self.ctx)
            for name in self.NAMES:
                self.seen[name].append(sample_value(samples, name))
            await asyncio.sleep(0.005)

    def __enter__(self) -> "GaugeWatch":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()


async def _first_event(response: httpx.Response) -> str:
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            return line


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _nonzero(samples: dict, name: str, label: str) -> dict[str, float]:
    return {k: v for k, v in label_values(samples, name, label).items() if v}


def _successes(ctx) -> dict[str, float]:
    return _nonzero(render(ctx), "moeserve_request_success_total", "finished_reason")


async def _traffic(ctx, client: httpx.AsyncClient, open_streams: contextlib.AsyncExitStack) -> None:
    """length, stop, abort while waiting, abort mid-stream, 400, 404; checks the gauges on the way."""
    base = {"model": ctx.served.name, "temperature": 0.0, "ignore_eos": True}
    # 1. A normal request -> "length".
    done = await client.post("/v1/completions", json={**base, "prompt": PROMPTS[0], "max_tokens": 5})
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    text = done.json()["choices"][0]["text"]
    assert text

    # 2. The same greedy request, streamed to the end, stops on the last character it wrote -> "stop".
    async with client.stream("POST", "/v1/completions", json={
            **base, "prompt": PROMPTS[0], "max_tokens": 20, "stream": True, "stop": [text[-1]]}) as r:
        assert r.status_code == 200
        events = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"stop"' in events[-2].replace(" ", "")

    # 3. A long stream runs; a second one waits behind it (max_num_seqs=1); the client closes
    #    the waiting one, then the running one mid-stream -> "abort" twice.
    long = {**base, "max_tokens": 400, "stream": True}
    running = await client.send(client.build_request("POST", "/v1/completions",
                                                     json={**long, "prompt": PROMPTS[1]}), stream=True)
    open_streams.push_async_callback(running.aclose)
    assert running.status_code == 200 and (await _first_event(running)) is not None
    waiting = await client.send(client.build_request("POST", "/v1/completions",
                                                     json={**long, "prompt": PROMPTS[2]}), stream=True)
    open_streams.push_async_callback(waiting.aclose)
    assert waiting.status_code == 200
    await _wait_for(lambda: sample_value(render(ctx), "moeserve_num_requests_waiting") == 1)
    assert sample_value(render(ctx), "moeserve_num_requests_running") == 1
    await waiting.aclose()
    await _wait_for(lambda: _successes(ctx).get("abort") == 1)
    # Counted at once on the asyncio side; the engine thread drops the request at its next turn.
    await _wait_for(lambda: sample_value(render(ctx), "moeserve_num_requests_waiting") == 0)
    assert sample_value(render(ctx), "moeserve_kv_cache_usage_ratio") > 0        # the running one
    await running.aclose()
    await _wait_for(lambda: _successes(ctx).get("abort") == 2)

    # 4. Errors: a bad parameter (400) and an unknown model (404) never reach the engine.
    bad = await client.post("/v1/completions", json={**base, "prompt": "hi", "top_p": 5})
    assert bad.status_code == 400
    unknown = await client.post("/v1/completions", json={**base, "model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404

    await _wait_for(lambda: sample_value(render(ctx), "moeserve_kv_cache_usage_ratio") == 0)
    await asyncio.sleep(0.2)      # nothing may be counted late, twice, or go negative meanwhile


@pytest.mark.asyncio
async def test_each_request_counted_once_through_disconnects_and_errors(ctx, client):
    tokenizer = ctx.tokenizer
    prompt_tokens = sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in (PROMPTS[0], *PROMPTS))
    # Before any request, every finish reason and error status is exported at 0 (a series born
    # at 1 would hide its first increment from rate()).
    before = render(ctx)
    assert label_values(before, "moeserve_request_success_total", "finished_reason") == {
        "stop": 0, "length": 0, "abort": 0, "error": 0}
    assert {"400", "404", "429", "500"} <= set(label_values(before, "moeserve_request_errors_total", "status"))
    # On a failure, streams still open are closed while the test's event loop still runs.
    async with contextlib.AsyncExitStack() as open_streams:
        with GaugeWatch(ctx) as watch:
            await _traffic(ctx, client, open_streams)

    samples = render(ctx)
    assert _nonzero(samples, "moeserve_request_success_total", "finished_reason") == {
        "length": 1, "stop": 1, "abort": 2}
    assert _nonzero(samples, "moeserve_request_errors_total", "status") == {"400": 1, "404": 1}
    assert sample_value(samples, "moeserve_prompt_tokens_total") == prompt_tokens
    assert sample_value(samples, "moeserve_generation_tokens_total") >= 5 + 1 + 1
    assert sample_value(samples, "moeserve_time_to_first_token_seconds_count") == 3   # the waiting one had none
    assert sample_value(samples, "moeserve_e2e_request_latency_seconds_count") == 3
    for name in GaugeWatch.NAMES:
        assert min(watch.seen[name]) >= 0, name
        assert sample_value(samples, name) == 0, name
    assert max(watch.seen["moeserve_kv_cache_usage_ratio"]) <= 1
    blocks = ctx.engine.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_expert_metrics_flag_parses():
    for value in ("full", "summary", "off"):
        _, server = resolve_options(build_parser().parse_args(["serve", "--expert-metrics", value]))
        assert server.expert_metrics == value
    _, server = resolve_options(build_parser().parse_args(["serve"]))
    assert server.expert_metrics == "full"


def test_bad_expert_metrics_value_names_the_flag(capsys):
    assert main(["serve", "--expert-metrics", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--expert-metrics" in err and "bogus" in err and "Traceback" not in err
