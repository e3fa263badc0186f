"""Capacity factor as a serving knob: speed gained vs quality lost, with a skewed router.

    python scripts/bench_capacity.py /path/to/bench-model [--factors none,2.0,1.25,1.0]

A skewed router (a bias on the router logits of --hot experts in every MoE layer) makes a few
experts hot, as trained routers often are. For each capacity factor the same 64 prompts run at
concurrency 16: output throughput, fraction of routes dropped, and quality against dropless:
greedy token agreement (position by position) and the mean KL(dropless || capped) of the
next-token distributions after each prompt.
"""

from __future__ import annotations

import argparse
import time

import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq
from moeserve.models.config import MoEModelConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--factors", default="none,2.0,1.25,1.0")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--hot", type=int, default=2, help="experts made hot in every layer")
    p.add_argument("--skew", type=float, default=2.0, help="logit bias added to the hot experts")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def skew_router(llm: LLM, hot: int, skew: float) -> None:
    """Adds `skew` to the first `hot` experts' router logits in every MoE layer (benchmark only)."""
    for layer in llm.engine.model.layers:
        if layer.moe is not None:
            bias = torch.zeros(layer.moe.router.out_features)
            bias[:hot] = skew
            layer.moe.router.register_forward_hook(lambda _m, _i, out, b=bias: out + b.to(out.dtype))


def next_token_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """[N, V] log-softmax after each prompt, prompts run together as one prefill batch of 16."""
    runner, bs = llm.engine.runner, llm.engine.config.block_size
    rows = []
    for start in range(0, len(prompts), 16):
        group, seqs, next_block = prompts[start:start + 16], [], 0
        for i, p in enumerate(group):
            n_blocks = -(-len(p) // bs)
            seqs.append(ScheduledSeq(i, p, 0, list(range(next_block, next_block + n_blocks)), True,
                                     SamplingParams(), [], p))
            next_block += n_blocks
        logits = runner.forward_logits(ScheduledBatch(seqs, sum(len(p) for p in group), bs))
        rows.append(logits.log_softmax(-1))
    return torch.cat(rows)


def run_factor(args, factor: float | None, prompts) -> dict:
    llm = LLM(args.model, capacity_factor=factor, min_capacity=args.min_capacity, max_num_seqs=args.concurrency,
              kv_cache_memory=1 << 30)
    skew_router(llm, args.hot, args.skew)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0))
    totals_before = llm.engine.model.expert_totals.clone()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    totals = llm.engine.model.expert_totals - totals_before
    routed, dropped = int(totals[:, 0].sum()), int(totals[:, 1].sum())
    return {"factor": factor, "tok_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
            "dropped": dropped / max(routed, 1), "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": next_token_logprobs(llm, prompts)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    vocab = MoEModelConfig.from_dir(args.model).vocab_size
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    factors = [None if f == "none" else float(f) for f in args.factors.split(",")]
    results = [run_factor(args, f, prompts) for f in factors]
    base = next(r for r in results if r["factor"] is None)
    print(f"\n{args.prompts} prompts x {args.output_len} tokens, concurrency {args.concurrency}, "
          f"{args.hot} hot experts (+{args.skew} logit), min_capacity {args.min_capacity}")
    print(f"{'capacity factor':>16}{'tok/s':>9}{'vs dropless':>13}{'routes dropped':>16}{'greedy agree':>14}{'mean KL':>10}")
    for r in results:
        same = sum(a == b for x, y in zip(base["tokens"], r["tokens"]) for a, b in zip(x, y))
        total = sum(len(x) for x in base["tokens"])
        kl = (base["logprobs"].exp() * (base["logprobs"] - r["logprobs"])).sum(-1).mean().item()
        label = "none (dropless)" if r["factor"] is None else f"{r['factor']:.2f}"
        print(f"{label:>16}{r['tok_per_s']:>9.1f}{r['tok_per_s'] / base['tok_per_s']:>12.2f}x"
              f"{r['dropped']:>15.1%}{same / total:>14.1%}{kl:>10.4f}")


if __name__ == "__main__":
    main()
