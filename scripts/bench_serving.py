"""Load generator for any OpenAI-compatible server (like vLLM's benchmark_serving).

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --concurrency 16 \
        --num-prompts 64 --prompt-len 128 --output-len 128 [--request-rate 4] [--json out.json]

Streams /v1/completions (or /v1/chat/completions with --endpoint chat) and prints time to first
token, inter-token latency and end-to-end latency (p50 / p90 / p99), request and token throughput.
Prompts are random token ids by default (`--prompt-mode text` sends random words instead, for
servers that do not accept token-id prompts); `ignore_eos` asks the server for exactly
--output-len tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-mode", choices=("ids", "text"), default="ids")
    p.add_argument("--vocab", type=int, default=2000, help="token ids are drawn from [10, vocab)")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", help="write the summary and per-request results here")
    return p.parse_args(argv)


def make_prompt(rng: random.Random, args) -> object:
    if args.prompt_mode == "ids" and args.endpoint == "completions":
        return [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)]
    words = ["moe", "expert", "token", "router", "batch", "cache", "stream", "layer", "the", "of", "and"]
    return " ".join(rng.choice(words) for _ in range(args.prompt_len))


def request_body(args, model: str, prompt) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": not args.no_stream}
    if not args.no_stream:
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def one_request(client: httpx.AsyncClient, args, model: str, prompt) -> RequestResult:
    path, body = request_body(args, model, prompt)
    start = time.perf_counter()
    if args.no_stream:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            return RequestResult(False, error=f"{response.status_code} {response.text[:200]}")
        e2e = time.perf_counter() - start
        tokens = response.json().get("usage", {}).get("completion_tokens", 0)
        return RequestResult(True, ttft=e2e, e2e=e2e, output_tokens=tokens)
    return await _stream(client, path, body, start)


async def _stream(client: httpx.AsyncClient, path: str, body: dict, start: float) -> RequestResult:
    result = RequestResult(True)
    last = None
    chunks_with_text = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return RequestResult(False, error=f"{response.status_code} {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return RequestResult(False, error=str(chunk["error"])[:200])
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.itls.append(now - last)
            last = now
            chunks_with_text += 1
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks_with_text
    return result


async def run(args) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = [make_prompt(rng, args) for _ in range(args.num_prompts)]
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(prompt, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(client, args, model, prompt)

        delays, t = [], 0.0
        for _ in prompts:
            delays.append(t)
            if args.request_rate:
                t += rng.expovariate(args.request_rate)
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, d) for p, d in zip(prompts, delays)))
        duration = time.perf_counter() - start
    return summarize(results, duration, args)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(results: list[RequestResult], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + len(ok) * args.prompt_len) / duration,
        "concurrency": args.concurrency, "request_rate": args.request_rate,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("itl", itls), ("e2e", [r.e2e for r in ok])):
        summary[f"{name}_mean_ms"] = statistics.fmean(values) * 1e3 if values else float("nan")
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_ms"] = pct(values, q) * 1e3
    summary["errors"] = [r.error for r in results if not r.ok][:5]
    return summary


def print_summary(s: dict) -> None:
    print(f"requests: {s['completed']} ok, {s['failed']} failed in {s['duration_s']:.1f} s "
          f"(concurrency {s['concurrency']}, rate {s['request_rate'] or 'inf'})")
    print(f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
          f"{s['total_token_throughput']:.1f} total tok/s")
    for name in ("ttft", "itl", "e2e"):
        print(f"{name:>5} ms: mean {s[f'{name}_mean_ms']:8.1f}  p50 {s[f'{name}_p50_ms']:8.1f}  "
              f"p90 {s[f'{name}_p90_ms']:8.1f}  p99 {s[f'{name}_p99_ms']:8.1f}")
    for error in s["errors"]:
        print("error:", error)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
