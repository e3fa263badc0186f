"""Offline throughput: moeserve's engine vs transformers `generate`, in one process and run.

    python scripts/bench_throughput.py /path/to/bench-model [--requests 64] [--random-lengths]

Baselines: transformers generate one request at a time, and static batches of 16 with left
padding. Both baselines run on a subset of the requests (their rate in tokens/s is what is
compared; running all 64 one at a time would take most of an hour on 2 cores). Also prints the
decode step time at batch 1 next to the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moeserve import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (scripts/make_bench_model.py writes the bench model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-lengths", action="store_true", help="prompt and output lengths uniform in [len/4, 2*len]")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default="4GiB")
    p.add_argument("--single-requests", type=int, default=3, help="requests timed for the one-at-a-time baseline")
    p.add_argument("--static-batches", type=int, default=1, help="batches of 16 timed for the static baseline")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def make_workload(args, vocab: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(0)

    def length(mean: int) -> int:
        return int(torch.randint(max(1, mean // 4), 2 * mean + 1, (1,), generator=g)) if args.random_lengths else mean

    work = []
    for _ in range(args.requests):
        p_len, o_len = length(args.prompt_len), length(args.output_len)
        work.append((torch.randint(10, vocab, (p_len,), generator=g).tolist(), o_len))
    return work


def bench_moeserve(llm: LLM, work) -> dict:
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in work]
    llm.generate([work[0][0]], SamplingParams(max_tokens=4, temperature=0))   # warm up
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def decode_step_ms(llm: LLM, prompt: list[int], steps: int = 24) -> float:
    engine = llm.engine
    engine.add_request("decode-probe", prompt, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
    engine.step()                                     # the prefill
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def active_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode token reads: everything except the experts it is not routed to."""
    cfg = model.cfg
    total = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if ".experts." in name:
            size = size * cfg.top_k // cfg.num_experts
        if name == "embed.weight":
            size = param.shape[1] * param.element_size()   # one row is gathered
        total += size
    return total


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), the machine's memory speed as torch sees it."""
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / min(times)


def bench_hf(model_dir: str, dtype: torch.dtype, work, batch: int, count: int) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tokens, seconds = 0, 0.0
    for b in range(count):
        group = work[b * batch:(b + 1) * batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])           # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        new = max(o for _, o in group)
        with torch.inference_mode():
            if b == 0:
                model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            seconds += time.perf_counter() - t
        # a static batch runs until its longest member is done; count only tokens a user asked for
        tokens += sum(min(o, out.shape[1] - width) for _, o in group)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds, "requests": batch * count}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=_bytes(args.kv_cache_memory))
    dtype = llm.engine.dtype
    work = make_workload(args, llm.engine.model_config.vocab_size)
    results = {"dtype": str(dtype), "threads": args.threads, "requests": args.requests,
               "random_lengths": args.random_lengths}
    results["moeserve"] = bench_moeserve(llm, work)
    step_ms = decode_step_ms(llm, work[0][0])
    floor_ms = active_weight_bytes(llm.engine.model) / copy_bandwidth() * 1e3
    results["decode_batch1"] = {"step_ms": step_ms, "floor_ms": floor_ms}
    del llm
    if not args.skip_baselines:
        results["hf_single"] = bench_hf(args.model, dtype, work, 1, args.single_requests)
        results["hf_static16"] = bench_hf(args.model, dtype, work, 16, args.static_batches)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict) -> None:
    ours = r["moeserve"]["tok_per_s"]
    print(f"\n{r['requests']} requests, dtype {r['dtype']}, {r['threads']} threads, "
          f"{'random' if r['random_lengths'] else 'fixed'} lengths")
    print(f"{'system':<34}{'output tok/s':>14}{'moeserve x':>12}")
    print(f"{'moeserve (in-flight batching)':<34}{ours:>14.1f}{1.0:>12.2f}")
    for key, label in (("hf_single", "transformers generate, 1 at a time"),
                       ("hf_static16", "transformers generate, static 16")):
        if key in r:
            print(f"{label:<34}{r[key]['tok_per_s']:>14.1f}{ours / r[key]['tok_per_s']:>12.2f}")
    d = r["decode_batch1"]
    print(f"decode step at batch 1: {d['step_ms']:.1f} ms; memory-bandwidth floor {d['floor_ms']:.1f} ms "
          f"({d['floor_ms'] / d['step_ms']:.0%} of the limit)")


def _bytes(text: str) -> int:
    from moeserve.config import parse_bytes
    return parse_bytes(text)


if __name__ == "__main__":
    main()
