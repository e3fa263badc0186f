"""What the HTTP layer costs: moeserve over HTTP vs the same engine offline, in one run.

    python scripts/bench_http.py /path/to/bench-model [--concurrency 1,4,16]

For each concurrency C: a live `moeserve serve` subprocess is loaded by bench_serving.py
(4 x C requests, at least 8; prompt 128, output 128, streaming, C in flight), then stopped; the offline engine
runs the same requests in-process with --max-num-seqs C. Also times transformers `generate` one
request at a time as the baseline. With --expert-metrics-pairs N, instead measures throughput
with --expert-metrics full vs off, N alternating pairs at the highest concurrency, /metrics
scraped every second as Prometheus would.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving  # noqa: E402
import bench_throughput  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: 4 x concurrency, at least 8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--expert-metrics-pairs", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the server (default: all cores). 1 leaves a core to the load "
                        "generator, whose CPU use otherwise stalls the server's OpenMP barriers at random")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, max_num_seqs: int, extra: list[str] = ()) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "moeserve.cli", "serve", args.model, "--port", str(self.port),
               "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(max_num_seqs),
               "--log-level", "warning", *extra]
        env = dict(os.environ)
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def scrape_forever(url: str, stop: threading.Event, interval: float = 1.0) -> None:
    """Prometheus' part: GET /metrics every `interval` seconds while the load runs."""
    while not stop.wait(interval):
        try:
            httpx.get(f"{url}/metrics", timeout=10)
        except httpx.HTTPError:
            return      # the server is stopping


def num_prompts(args, concurrency: int) -> int:
    return args.num_prompts or max(8, 4 * concurrency)


def http_run(args, concurrency: int, extra: list[str] = (), scrape: bool = False) -> dict:
    server = Server(args, concurrency, extra)
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_forever, args=(server.url, stop), daemon=True)
    if scrape:
        scraper.start()
    try:
        common = ["--base-url", server.url, "--prompt-len", str(args.prompt_len), "--output-len",
                  str(args.output_len), "--vocab", "32000"]
        bench_serving.main(common + ["--num-prompts", "4", "--concurrency", str(concurrency)])  # warm up
        return bench_serving.main(common + ["--num-prompts", str(num_prompts(args, concurrency)), "--concurrency", str(concurrency)])
    finally:
        stop.set()
        server.stop()


def offline_run(args, concurrency: int) -> float:
    from moeserve import LLM
    from moeserve.config import parse_bytes
    llm = LLM(args.model, max_num_seqs=concurrency, kv_cache_memory=parse_bytes(args.kv_cache_memory))
    ns = argparse.Namespace(requests=num_prompts(args, concurrency), prompt_len=args.prompt_len, output_len=args.output_len,
                            random_lengths=False)
    work = bench_throughput.make_workload(ns, llm.engine.model_config.vocab_size)
    return bench_throughput.bench_moeserve(llm, work)["tok_per_s"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.expert_metrics_pairs:
        return metrics_overhead(args, max(levels))
    rows = []
    for c in levels:
        http = http_run(args, c)
        offline = offline_run(args, c)
        rows.append((c, http, offline))
    hf = None
    if not args.skip_hf:
        ns = argparse.Namespace(requests=2, prompt_len=args.prompt_len, output_len=args.output_len, random_lengths=False)
        work = bench_throughput.make_workload(ns, 32000)
        hf = bench_throughput.bench_hf(args.model, torch.float32, work, 1, 2)["tok_per_s"]
    print(f"\n{'conc':>5}{'HTTP tok/s':>12}{'offline tok/s':>15}{'HTTP cost':>11}{'TTFT p50':>10}{'ITL p50':>9}"
          f"{'E2E p99':>9}{'vs HF 1-at-a-time':>19}")
    for c, http, offline in rows:
        cost = 1 - http["output_token_throughput"] / offline
        vs_hf = f"{http['output_token_throughput'] / hf:.2f}x" if hf else "-"
        print(f"{c:>5}{http['output_token_throughput']:>12.1f}{offline:>15.1f}{cost:>10.1%}"
              f"{http['ttft_p50_ms']:>8.0f}ms{http['itl_p50_ms']:>7.0f}ms{http['e2e_p99_ms'] / 1e3:>8.1f}s{vs_hf:>19}")
    if hf:
        print(f"transformers generate one at a time: {hf:.1f} tok/s")


def metrics_overhead(args, concurrency: int) -> None:
    # The first server of a run measured ~12% slower than every later one (cold caches), whatever
    # its mode: one throwaway run first.
    http_run(args, concurrency, ["--expert-metrics", "off"], True)
    full, off = [], []
    for pair in range(args.expert_metrics_pairs):
        # alternate which mode goes first: a fresh server after another one was measured slower
        for mode in (("full", "off") if pair % 2 == 0 else ("off", "full")):
            tps = http_run(args, concurrency, ["--expert-metrics", mode], True)["output_token_throughput"]
            (full if mode == "full" else off).append(tps)
    ratios = [f / o for f, o in zip(full, off)]
    print(f"\nexpert metrics full vs off, concurrency {concurrency}, {len(ratios)} pairs")
    for f, o, r in zip(full, off, ratios):
        print(f"  full {f:7.1f} tok/s   off {o:7.1f} tok/s   full/off {r:.3f}")
    mean = sum(ratios) / len(ratios)
    median = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else sum(sorted(ratios)[len(ratios) // 2 - 1:][:2]) / 2
    pooled = sum(full) / sum(off)
    print(f"mean full/off {mean:.3f} (overhead {1 - mean:+.1%}), median {median:.3f}, "
          f"pooled tokens/s {pooled:.3f} (overhead {1 - pooled:+.1%})")


if __name__ == "__main__":
    main()
