r"""Prefix caching on vs off, served over HTTP: multi-turn chat, a shared-system-prompt agent, and
a workload with no shared prefixes (the cost of caching when it cannot help).

    python scripts/bench_prefix_cache.py --model /tmp/bench/model [--json out.json]

For each setting (--enable-prefix-caching, then --no-enable-prefix-caching) a fresh
`moeserve serve` runs the three workloads one after the other (unshared first) (scripts/bench_vs_peer.py's Server:
free port, stopped afterwards), streaming /v1/completions with token-id prompts, greedy:

- chat: --conversations conversations of --turns turns, --concurrency conversations at a time.
  Every conversation starts with the same --system-len token system prompt; each turn appends a
  --user-len token user message, and the next turn resends the history plus a --reply-len token
  stand-in for the assistant's reply (random ids: as with chat templates that re-tokenize,
  the reply itself is not reused, the history before it is).
- agent: --agent-requests requests = the system prompt + a --user-len x 2 token task each.
- unshared: --agent-requests requests of --unshared-len random tokens (nothing to reuse).

Prints TTFT p50/p99 (chat: first turns and later turns apart), output tok/s, the server's
prefix-cache hit rate (from /metrics) and the on/off ratios.

--ab-rounds N (N > 0) measures only what caching costs where it cannot help, with less noise: two
offline engines in this process (on and off) take turns on fresh batches of --agent-requests
unshared prompts, after one warm-up batch each, and the median of the N on/off ratios is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from bench_vs_peer import Server  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--extra", default="", help="more `moeserve serve` flags for both settings")
    p.add_argument("--system-len", type=int, default=1000)
    p.add_argument("--user-len", type=int, default=50)
    p.add_argument("--reply-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--agent-requests", type=int, default=32)
    p.add_argument("--unshared-len", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--think-time", type=float, default=0.0,
                   help="chat: mean seconds a user pauses before each turn (exponential, seeded); "
                        "0 = none, so conversations started together send their turns in lockstep")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--stop-timeout", type=float, default=30)
    p.add_argument("--order", default="on,off", help="which server runs first (on,off or off,on)")
    p.add_argument("--workloads", default="unshared,chat,agent", help="which workloads, in this order")
    p.add_argument("--rounds", type=int, default=1,
                   help="server pairs, alternating which runs first; the table shows the medians")
    p.add_argument("--ab-rounds", type=int, default=0, help="only the in-process unshared on/off A/B, N rounds")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


class Client:
    def __init__(self, http: httpx.AsyncClient, model: str, output_len: int) -> None:
        self.http, self.model, self.output_len = http, model, output_len

    async def complete(self, prompt: list[int]) -> bench_serving.RequestResult:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.output_len, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        return await bench_serving._stream(self.http, "/v1/completions", body, time.perf_counter())


async def chat(client: Client, args, system: list[int]) -> dict:
    rng = random.Random(f"{args.seed}-chat")
    convs = [[ids(rng, args.user_len, args.vocab) for _ in range(args.turns)] for _ in range(args.conversations)]
    replies = [[ids(rng, args.reply_len, args.vocab) for _ in range(args.turns)] for _ in range(args.conversations)]
    pauses = [[rng.expovariate(1.0 / args.think_time) if args.think_time > 0 else 0.0 for _ in range(args.turns)]
              for _ in range(args.conversations)]
    gate = asyncio.Semaphore(args.concurrency)
    first, second, later, results = [], [], [], []

    async def conversation(c: int) -> None:
        async with gate:
            history = list(system)
            for turn in range(args.turns):
                await asyncio.sleep(pauses[c][turn])   # the user reads the reply and types
                history += convs[c][turn]
                result = await client.complete(history)
                results.append(result)
                (first if turn == 0 else later).append(result.ttft)
                if turn == 1:
                    second.append(result.ttft)
                history += replies[c][turn]

    start = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    return summarize(results, time.perf_counter() - start, first_turn=first, second_turn=second, later_turns=later)


async def batch(client: Client, args, prompts: list[list[int]]) -> dict:
    gate = asyncio.Semaphore(args.concurrency)

    async def one(prompt):
        async with gate:
            return await client.complete(prompt)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return summarize(results, time.perf_counter() - start)


def summarize(results, duration: float, **ttft_groups) -> dict:
    ok = [r for r in results if r.ok]
    out = {"ok": len(ok), "n": len(results), "tok_s": sum(r.output_tokens for r in ok) / duration,
           "ttft_p50": bench_serving.pct([r.ttft for r in ok], 50), "ttft_p99": bench_serving.pct([r.ttft for r in ok], 99)}
    for name, values in ttft_groups.items():
        out[f"{name}_p50"], out[f"{name}_p99"] = bench_serving.pct(values, 50), bench_serving.pct(values, 99)
    return out


def prefix_counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("moeserve_prefix_cache_queries_total", "moeserve_prefix_cache_hits_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("moeserve_prefix_cache_queries_total", 0.0), values.get("moeserve_prefix_cache_hits_total", 0.0)


async def workloads(url: str, args) -> dict:
    rng = random.Random(f"{args.seed}-prompts")
    system = ids(rng, args.system_len, args.vocab)
    agent = [system + ids(rng, 2 * args.user_len, args.vocab) for _ in range(args.agent_requests)]
    unshared = [ids(rng, args.unshared_len, args.vocab) for _ in range(args.agent_requests)]
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        client = Client(http, model, args.output_len)
        await client.complete(ids(rng, 16, args.vocab))                  # warm-up
        # unshared first: on a fresh server, so that caching on and off start from the same state
        runs = {"unshared": lambda: batch(client, args, unshared), "chat": lambda: chat(client, args, system),
                "agent": lambda: batch(client, args, agent)}
        for name in args.workloads.split(","):
            run = runs[name]
            queries, hits = prefix_counters(url)
            results[name] = await run()
            queries2, hits2 = prefix_counters(url)
            results[name]["hit_rate"] = (hits2 - hits) / (queries2 - queries) if queries2 > queries else 0.0
            print(f"  {name}: {results[name]['tok_s']:.1f} tok/s, TTFT p50 {results[name]['ttft_p50'] * 1e3:.0f} ms, "
                  f"hit rate {results[name]['hit_rate']:.1%}", flush=True)
    return results


def table(on: dict, off: dict) -> str:
    rows = ["| workload | caching | tok/s | TTFT p50 | TTFT p99 | second-turn TTFT p50 | later-turn TTFT p50 | "
            "later-turn TTFT p99 | hit rate |",
            "|---|---|---|---|---|---|---|---|---|"]
    names = [n for n in ("chat", "agent", "unshared") if n in on]
    for name in names:
        for label, r in (("on", on[name]), ("off", off[name])):
            later = (f"{r['second_turn_p50'] * 1e3:.0f} ms | {r['later_turns_p50'] * 1e3:.0f} ms | "
                     f"{r['later_turns_p99'] * 1e3:.0f} ms" if "later_turns_p50" in r else "- | - | -")
            rows.append(f"| {name} | {label} | {r['tok_s']:.1f} | {r['ttft_p50'] * 1e3:.0f} ms | "
                        f"{r['ttft_p99'] * 1e3:.0f} ms | {later} | {r['hit_rate']:.1%} |")
    rows.append("")
    for name in names:
        a, b = on[name], off[name]
        line = f"{name}: throughput on/off {a['tok_s'] / b['tok_s']:.3f}x, TTFT p50 off/on {b['ttft_p50'] / a['ttft_p50']:.2f}x"
        if "later_turns_p50" in a:
            line += (f", second-turn TTFT p50 off/on {b['second_turn_p50'] / a['second_turn_p50']:.2f}x"
                     f", later-turn TTFT p50 off/on {b['later_turns_p50'] / a['later_turns_p50']:.2f}x")
        rows.append(line)
    return "\n".join(rows)


def median_results(per_round: list[dict]) -> dict:
    """Per workload and figure, the median over the rounds."""
    import statistics
    return {w: {k: statistics.median(r[w][k] for r in per_round) for k in per_round[0][w]}
            for w in per_round[0]}


def unshared_ab(args) -> dict:
    import statistics

    from moeserve import LLM, SamplingParams
    engines = {name: LLM(args.model, enable_prefix_caching=name == "on", kv_cache_memory=512 << 20)
               for name in ("on", "off")}
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def tok_s(name: str, seed: str) -> float:
        rng = random.Random(seed)
        prompts = [ids(rng, args.unshared_len, args.vocab) for _ in range(args.agent_requests)]
        start = time.perf_counter()
        engines[name].generate(prompts, params)
        return len(prompts) * args.output_len / (time.perf_counter() - start)

    for name in engines:
        tok_s(name, "warm-up")
    ratios = []
    for i in range(args.ab_rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        got = {name: tok_s(name, f"{args.seed}-{i}") for name in order}
        ratios.append(got["on"] / got["off"])
        print(f"round {i}: on {got['on']:.1f} tok/s, off {got['off']:.1f} tok/s, on/off {ratios[-1]:.3f}", flush=True)
    median = statistics.median(ratios)
    print(f"unshared prompts of {args.unshared_len} tokens, {args.agent_requests} per batch: "
          f"median on/off throughput {median:.3f} over {len(ratios)} rounds")
    return {"ratios": ratios, "median": median}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.ab_rounds:
        return unshared_ab(args)
    log_dir = tempfile.mkdtemp(prefix="bench_prefix_cache-")
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    flags = {"on": "--enable-prefix-caching", "off": "--no-enable-prefix-caching"}
    order = args.order.split(",")
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            spec = {"name": f"moeserve-{name}", "kind": "moeserve", "args": f"{flags[name]} {args.extra}".strip()}
            server = Server(spec, argparse.Namespace(model=args.model, log_dir=log_dir))
            print(f"prefix caching {name}: {' '.join(server.command)}", flush=True)
            try:
                server.wait_healthy(args.startup_timeout)
                runs[name].append(asyncio.run(workloads(server.url, args)))
            finally:
                server.stop(args.stop_timeout)
    results = {name: median_results(per_round) for name, per_round in runs.items()}
    print(f"\nsystem prompt {args.system_len} tokens, {args.turns} turns x {args.conversations} conversations, "
          f"concurrency {args.concurrency}, think time {args.think_time} s, output {args.output_len} tokens; "
          f"logs in {log_dir}\n")
    print(table(results["on"], results["off"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
