"""32 concurrent greedy streams through the async openai client: all complete, and each equals the
same request served alone (batching must not change a greedy output)."""

from __future__ import annotations

import asyncio

import openai
import pytest

NUM_REQUESTS, MAX_TOKENS = 32, 8
WORDS = ["apple", "river", "mountain", "seven", "blue", "quantum", "violin", "desert"]


def prompt(i: int) -> str:
    return f"{WORDS[i % 8]} {WORDS[(i // 8) % 8]} number {i}:"


@pytest.mark.asyncio
async def test_32_concurrent_streams_match_single_requests(live_server, builtin_dir):
    model = builtin_dir.name
    kw = dict(model=model, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0,
                                  timeout=120) as client:
        singles = []
        for i in range(NUM_REQUESTS):           # one at a time: the reference outputs
            out = await client.completions.create(prompt=prompt(i), **kw)
            singles.append(out.choices[0].text)

        async def streamed(i: int) -> tuple[str, list[str]]:
            stream = await client.completions.create(prompt=prompt(i), stream=True, **kw)
            text, reasons = [], []
            async for chunk in stream:
                for c in chunk.choices:
                    text.append(c.text)
                    if c.finish_reason is not None:
                        reasons.append(c.finish_reason)
            return "".join(text), reasons

        results = await asyncio.wait_for(asyncio.gather(*(streamed(i) for i in range(NUM_REQUESTS))), 90)
    for i, (text, reasons) in enumerate(results):
        assert reasons == ["length"], i
        assert text == singles[i], f"request {i}: concurrent {text!r} != alone {singles[i]!r}"
