r"""moeserve vs other OpenAI-compatible servers (e.g. llama.cpp's llama-server) on one workload.

    python scripts/bench_vs_peer.py --model /tmp/moeserve-peers/bench-hf \
        --moeserve "default=" --moeserve "int8=--quantization int8" \
        --peer "llama-f16=/tmp/moeserve-peers/llsrv/bin/llama-server -m /tmp/moeserve-peers/gguf/bench-f16.gguf \
                -t 2 -np 16 -c 8192 --host 127.0.0.1 --port {port}" \
        --concurrency 1,4,16 --prompt-len 128 --output-len 64 --baseline llama-f16 [--json out.json]

`--moeserve NAME=EXTRA_ARGS` runs `moeserve serve MODEL --host 127.0.0.1 --port P EXTRA_ARGS`;
`--peer NAME=COMMAND` runs COMMAND (no shell) with {port} replaced by a free port. Servers run one
at a time, in command-line order, each stopped (SIGTERM, SIGKILL after --stop-timeout) before the
next starts, so they never share the cores. Each is loaded by scripts/bench_serving.py's client once
healthy (GET /health is 200): one short warm-up request, then for each concurrency C
--num-prompts requests (default max(8, 4 x C): at least four waves of C), C in flight, streaming
/v1/completions. Every server gets the same prompts: --prompt-len random token ids in [10, --vocab)
drawn with seed (--seed, C), new at each level so no server reuses a prefix cached at the previous one.
Each request asks for exactly --output-len tokens (ignore_eos, and logit_bias -100 on --eos-id for
servers that only know OpenAI's fields); tokens are counted from the streamed usage.
Peak RSS is the largest sum of VmRSS over the server's process tree, sampled every 0.2 s.
Prints one markdown table per concurrency; "vs BASELINE" is tok/s and TTFT p50 over the
--baseline server's (default: the first peer).
`--rounds N` runs every server N times, in command-line order in even rounds and reversed in odd
ones (so a machine whose speed drifts over the run weighs on both sides alike); the table then holds
each metric's median over the rounds, and a line per level gives every round's tok/s ratio against
the baseline of that same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving  # noqa: E402


def parse_spec(kind: str, spec: str) -> dict:
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS, got {spec!r}")
    if kind == "peer" and "{port}" not in rest:
        raise argparse.ArgumentTypeError(f"peer command of {name!r} has no {{port}}")
    return {"kind": kind, "name": name.strip(), "args": rest.strip()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint moeserve serves (default: its built-in model)")
    p.add_argument("--moeserve", dest="servers", action="append", metavar="NAME=EXTRA_ARGS",
                   type=lambda s: parse_spec("moeserve", s))
    p.add_argument("--peer", dest="servers", action="append", metavar="NAME=COMMAND",
                   type=lambda s: parse_spec("peer", s))
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default max(8, 4 x C))")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn from [10, vocab)")
    p.add_argument("--eos-id", type=int, default=2, help="token given logit_bias -100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", default=None, help="server name the ratios are against (default: first peer)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--log-dir", default=None, help="server stdout/stderr go here (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=1, help="times each server is run (see above)")
    p.add_argument("--json", help="write the config and every summary here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.servers:
        p.error("give at least one --moeserve or --peer")
    names = [s["name"] for s in args.servers]
    if len(set(names)) != len(names):
        p.error(f"server names must be unique: {names}")
    peers = [s["name"] for s in args.servers if s["kind"] == "peer"]
    args.baseline = args.baseline or (peers or names)[0]
    if args.baseline not in names:
        p.error(f"--baseline {args.baseline!r} is none of {names}")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(spec: dict, model: str | None, port: int) -> list[str]:
    if spec["kind"] == "peer":
        return shlex.split(spec["args"].replace("{port}", str(port)))
    exe = Path(sys.executable).with_name("moeserve")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "moeserve.cli"]
    return [*launcher, "serve", *([model] if model else []), "--host", "127.0.0.1", "--port", str(port),
            *shlex.split(spec["args"])]


def tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over `root` and all its descendants (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the process tree's RSS every `interval` s; take_peak() returns MiB and resets."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stopping = threading.Event()
        self.level_peak = self.overall_peak = 0

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            kib = tree_rss_kib(self.pid)
            self.level_peak = max(self.level_peak, kib)
            self.overall_peak = max(self.overall_peak, kib)

    def take_peak(self) -> float:
        peak, self.level_peak = max(self.level_peak, tree_rss_kib(self.pid)), 0
        return peak / 1024


class Server:
    """One server subprocess in its own session, on a free 127.0.0.1 port, with its RSS sampler."""

    def __init__(self, spec: dict, args) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.command = server_command(spec, args.model, port)
        self.log = Path(args.log_dir) / f"{spec['name']}{spec.get('log_suffix', '')}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.rss = RssSampler(self.proc.pid)
        self.rss.start()

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"{shlex.join(self.command)} did not become healthy; log {self.log}:\n{tail}")

    def stop(self, timeout: float) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self.rss.stopping.set()
        self.rss.join()


async def one_request(client: httpx.AsyncClient, ns, model: str, prompt, eos_id: int):
    path, body = bench_serving.request_body(ns, model, prompt)
    body["logit_bias"] = {str(eos_id): -100}
    result = await bench_serving._stream(client, path, body, time.perf_counter())
    # llama-server sends one more chunk after the last token (empty text, finish_reason, usage):
    # it is no token, so the interval before it is no inter-token latency
    result.itls = result.itls[:max(result.output_tokens - 1, 0)]
    return result


async def run_level(url: str, args, concurrency: int, num_prompts: int, seed) -> dict:
    ns = argparse.Namespace(**vars(args), endpoint="completions", prompt_mode="ids", no_stream=False,
                            request_rate=None)
    ns.concurrency = concurrency
    rng = random.Random(seed)
    prompts = [bench_serving.make_prompt(rng, ns) for _ in range(num_prompts)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt):
            async with gate:
                return await one_request(client, ns, model, prompt, args.eos_id)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - start
    summary = bench_serving.summarize(results, duration, ns)
    summary["short_requests"] = sum(r.ok and r.output_tokens != args.output_len for r in results)
    return summary


def bench_server(spec: dict, args) -> dict:
    server = Server(spec, args)
    levels = {}
    try:
        server.wait_healthy(args.startup_timeout)
        warm = argparse.Namespace(**{**vars(args), "output_len": 8})
        asyncio.run(run_level(server.url, warm, 1, 1, f"{args.seed}-warmup"))
        for c in args.levels:
            server.rss.take_peak()
            n = args.num_prompts or max(8, 4 * c)
            levels[c] = asyncio.run(run_level(server.url, args, c, n, f"{args.seed}-{c}"))
            levels[c]["peak_rss_mib"] = server.rss.take_peak()
            print(f"{spec['name']} C={c}: {levels[c]['output_token_throughput']:.1f} tok/s", flush=True)
    finally:
        server.stop(args.stop_timeout)
    return {**spec, "command": shlex.join(server.command), "log": str(server.log),
            "peak_rss_mib": server.rss.overall_peak / 1024, "levels": levels}


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def level_table(results: dict, baseline: str, c: int) -> str:
    base = results[baseline]["levels"][c]
    header = ["server", "ok", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "peak RSS MiB",
              f"vs {baseline}"]
    lines = [f"### concurrency {c}", "", f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    for name, r in results.items():
        s = r["levels"][c]
        vs = ("baseline" if name == baseline else
              f"{ratio(s['output_token_throughput'], base['output_token_throughput'])} tok/s, "
              f"{ratio(s['ttft_p50_ms'], base['ttft_p50_ms'])} TTFT")
        ok = f"{s['completed']}/{s['completed'] + s['failed']}"
        ok += f" ({s['short_requests']} short)" if s["short_requests"] else ""
        lines.append(f"| {name} | {ok} | {s['output_token_throughput']:.1f} | {s['ttft_p50_ms']:.0f} ms | "
                     f"{s['ttft_p99_ms']:.0f} ms | {s['itl_p50_ms']:.1f} ms | {s['itl_p99_ms']:.1f} ms | "
                     f"{s['e2e_p50_ms'] / 1e3:.2f} s | {s['peak_rss_mib']:.0f} | {vs} |")
    return "\n".join(lines)


def round_order(servers: list[dict], round_index: int) -> list[dict]:
    """Command-line order in even rounds, reversed in odd ones (A B B A ...)."""
    return servers if round_index % 2 == 0 else servers[::-1]


def merge_rounds(rounds: list[dict], baseline: str) -> dict:
    """Per-round results (server name -> bench_server result) -> one result per server whose level
    summaries hold each numeric metric's median over the rounds (counts summed), plus `tok_s` and
    `ratio` (tok/s over the same round's baseline) listed per round."""
    merged = {}
    for name, first in rounds[0].items():
        levels = {}
        for c in first["levels"]:
            runs = [r[name]["levels"][c] for r in rounds]
            level = {}
            for key, value in runs[0].items():
                values = [run[key] for run in runs]
                if key in ("completed", "failed", "short_requests"):
                    level[key] = sum(values)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    level[key] = statistics.median(values)
                elif key == "errors":
                    level[key] = [e for v in values for e in v][:5]
                else:
                    level[key] = value
            level["tok_s"] = [run["output_token_throughput"] for run in runs]
            bases = [r[baseline]["levels"][c]["output_token_throughput"] for r in rounds]
            level["ratio"] = [run["output_token_throughput"] / base if base else float("nan")
                              for run, base in zip(runs, bases)]
            levels[c] = level
        merged[name] = {**first, "levels": levels, "peak_rss_mib": max(r[name]["peak_rss_mib"] for r in rounds)}
    return merged


def rounds_line(results: dict, baseline: str, c: int) -> str:
    parts = [f"{name} {', '.join(f'{x:.2f}x' for x in r['levels'][c]['ratio'])}"
             for name, r in results.items() if name != baseline]
    return f"tok/s over {baseline} in each round: " + "; ".join(parts)


def run_rounds(args) -> list[dict]:
    rounds = []
    for i in range(args.rounds):
        suffix = f".round{i}" if args.rounds > 1 else ""
        results = {}
        for spec in round_order(args.servers, i):
            results[spec["name"]] = bench_server({**spec, "log_suffix": suffix}, args)
        rounds.append({spec["name"]: results[spec["name"]] for spec in args.servers})
    return rounds


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_vs_peer-")
    os.makedirs(args.log_dir, exist_ok=True)
    rounds = run_rounds(args)
    results = merge_rounds(rounds, args.baseline) if args.rounds > 1 else rounds[0]
    rounds_note = f"medians over {args.rounds} rounds; " if args.rounds > 1 else ""
    print(f"\nprompt {args.prompt_len} tokens, output {args.output_len} tokens, streaming; "
          f"{rounds_note}server logs in {args.log_dir}\n")
    for c in args.levels:
        print(level_table(results, args.baseline, c), end="\n\n")
        if args.rounds > 1:
            print(rounds_line(results, args.baseline, c), end="\n\n")
        for name, r in results.items():
            for error in r["levels"][c]["errors"]:
                print(f"{name} error: {error}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "servers"}
        with open(args.json, "w") as f:
            json.dump({"config": config, "servers": results, "rounds": rounds}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
