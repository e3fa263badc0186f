"""Expert parallelism on this machine: throughput and MoE communication, ep-size 1 vs 2, both modes.

    python scripts/bench_ep.py /path/to/bench-model [--concurrency 1,16] [--ep-sizes 1,2]

Every configuration runs the same greedy workload (prompt --prompt-len, output --output-len;
4 requests at concurrency 1, 2 x C above) through the offline engine, one after the other in one
run. ep-size 1 runs with one thread (and, for reference, with all cores); ep-size N > 1 runs one
thread per rank. Every rank times its MoE collectives and counts the bytes it hands them:
- comm ms/layer: collective time per MoE layer per step, mean over ranks (it includes waiting
  for the slower rank: load imbalance shows up here);
- bytes/token/layer: alltoall: bytes handed to all_to_all_single by all ranks (rows out, results
  back) per token of the batch, against the theoretical 2 x top_k x hidden x dtype; "remote" is the
  part that left its rank. allreduce: each rank's [T, H] partial per token (hidden x dtype; a ring
  all-reduce moves ~2(N-1)/N of that per rank).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_throughput  # noqa: E402

from moeserve import LLM  # noqa: E402
from moeserve.config import parse_bytes  # noqa: E402
from moeserve.engine.parallel_setup import usable_cpus  # noqa: E402
from moeserve.request import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--ep-sizes", default="1,2")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="1GiB")
    return p.parse_args()


def configs(ep_sizes: list[int]) -> list[tuple[str, dict, int]]:
    """(label, engine args, torch threads on rank 0)."""
    cores = usable_cpus()
    out = [("ep1 1 thread", {"ep_size": 1}, 1)]
    if cores > 1:
        out.append((f"ep1 {cores} threads", {"ep_size": 1}, cores))
    for n in ep_sizes:
        if n > 1:
            for mode in ("allreduce", "alltoall"):
                out.append((f"ep{n} {mode}", {"ep_size": n, "ep_dispatch": mode}, 0))
    return out


def run(args, label: str, engine_args: dict, threads: int, concurrency: int) -> dict:
    if threads:
        torch.set_num_threads(threads)   # ep > 1: the engine sets one thread per rank itself
    llm = LLM(args.model, max_num_seqs=concurrency, kv_cache_memory=parse_bytes(args.kv_cache_memory), **engine_args)
    try:
        cfg = llm.engine.model_config
        ns = argparse.Namespace(requests=4 if concurrency == 1 else 2 * concurrency, prompt_len=args.prompt_len,
                                output_len=args.output_len, random_lengths=False)
        work = bench_throughput.make_workload(ns, cfg.vocab_size)
        llm.generate([work[0][0]], SamplingParams(max_tokens=4, temperature=0))   # warm up
        probe = _Probe(llm)
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True)
                                                   for _, o in work])
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return probe.result(label, concurrency, tokens / seconds, cfg, llm.engine.dtype)
    finally:
        llm.close()


class _Probe:
    """Counts steps and tokens, and snapshots every rank's collective time and bytes."""

    def __init__(self, llm: LLM) -> None:
        self.engine = engine = llm.engine
        self.steps = self.tokens = 0
        self.before = self._stats()
        step, execute = engine.step, engine.executor.execute

        def counted_step():
            self.steps += 1
            return step()

        def counted_execute(batch):
            self.tokens += batch.num_tokens
            return execute(batch)

        engine.step, engine.executor.execute = counted_step, counted_execute

    def _stats(self) -> list[tuple] | None:
        executor = self.engine.executor
        if not hasattr(executor, "comm_stats"):
            return None
        return [(s.seconds, s.bytes_sent, s.bytes_remote) for s in executor.comm_stats()]

    def result(self, label: str, concurrency: int, tok_s: float, cfg, dtype: torch.dtype) -> dict:
        row = {"label": label, "c": concurrency, "tok_s": tok_s, "comm_ms": None, "bytes": None, "theory": None}
        after = self._stats()
        if after is None or not self.steps:
            return row
        delta = [[a - b for a, b in zip(x, y)] for x, y in zip(after, self.before)]
        ranks, layers = len(delta), cfg.num_moe_layers
        elem = torch.empty((), dtype=dtype).element_size()
        row["comm_ms"] = sum(d[0] for d in delta) / ranks / self.steps / layers * 1e3   # mean over ranks
        alltoall = "alltoall" in label
        # alltoall: every token's routes cross once out and once back, summed over the ranks;
        # allreduce: each rank contributes its [T, H] partial for every token of the batch.
        per = self.tokens if alltoall else self.tokens * ranks
        row["bytes"] = sum(d[1] for d in delta) / per / layers
        row["remote"] = sum(d[2] for d in delta) / per / layers
        row["theory"] = (2 * cfg.top_k if alltoall else 1) * cfg.hidden_size * elem
        return row


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    ep_sizes = [int(n) for n in args.ep_sizes.split(",")]
    rows = []
    for c in levels:
        for label, engine_args, threads in configs(ep_sizes):
            row = run(args, label, engine_args, threads, c)
            rows.append(row)
            print(f"  {label:<20} c={c:<3} {row['tok_s']:7.1f} tok/s", flush=True)
    print(f"\n{'config':<20}{'conc':>5}{'tok/s':>9}{'vs ep1 1 thr':>14}{'comm ms/layer':>15}"
          f"{'bytes/tok/layer':>17}{'remote':>9}{'theory':>9}")
    for c in levels:
        base = next(r["tok_s"] for r in rows if r["c"] == c and r["label"] == "ep1 1 thread")
        for r in (r for r in rows if r["c"] == c):
            comm = f"{r['comm_ms']:.2f}" if r["comm_ms"] is not None else "-"
            nbytes = f"{r['bytes']:.0f}" if r["bytes"] is not None else "-"
            remote = f"{r['remote']:.0f}" if r["bytes"] is not None else "-"
            theory = f"{r['theory']}" if r["theory"] is not None else "-"
            print(f"{r['label']:<20}{c:>5}{r['tok_s']:>9.1f}{r['tok_s'] / base:>13.2f}x{comm:>15}"
                  f"{nbytes:>17}{remote:>9}{theory:>9}")


if __name__ == "__main__":
    main()
