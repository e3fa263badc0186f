"""Where a step's time goes: torch.profiler over decode steps at batch 1 and 16 and a mixed step.

    python scripts/profile_step.py /path/to/bench-model [--dtype auto] [--quantization int8]

For each scenario the engine is warmed up, then N steps run under torch.profiler; the table lists
the ops by self CPU time, and the last line compares the step's wall time with the sum of the
operator time (the rest is Python between the ops).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeserve import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=18, help="ops listed per scenario")
    p.add_argument("--scenarios", default="decode1,decode16,mixed")
    return p.parse_args()


def fill(llm: LLM, n: int, prompt_len: int, max_tokens: int, tag: str) -> None:
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        prompt = torch.randint(10, 2000, (prompt_len,), generator=g).tolist()
        llm.engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def profile_steps(llm: LLM, steps: int) -> tuple[object, float]:
    engine = llm.engine
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    return prof, wall


def scenario(llm: LLM, name: str, steps: int) -> tuple[object, float]:
    if name.startswith("decode"):
        n = int(name[len("decode"):])
        fill(llm, n, 128, steps + 8, name)
        for _ in range(3):            # prefill, then warm decode steps
            llm.engine.step()
        prof, wall = profile_steps(llm, steps)
    elif name == "mixed":             # 15 decoding sequences + one 128-token prompt per step
        fill(llm, 15, 128, 10 * steps, "mixed-decode")
        for _ in range(3):
            llm.engine.step()
        prof_wall = []
        for i in range(steps):
            fill(llm, 1, 128, 1, f"mixed-prefill-{i}")
        prof, wall = profile_steps(llm, steps)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    drain(llm)
    return prof, wall


def report(name: str, prof, wall: float, steps: int, rows: int) -> None:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")]
    total_self = sum(e.self_cpu_time_total for e in events) / 1e3 / steps   # ms per step
    print(f"\n## {name}: {wall * 1e3:.2f} ms per step; operators {total_self:.2f} ms "
          f"({100 * total_self / (wall * 1e3):.0f}%), the rest Python and bookkeeping")
    print("| op | ms/step | % of step | calls/step |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        ms = e.self_cpu_time_total / 1e3 / steps
        print(f"| {e.key} | {ms:.3f} | {100 * ms / (wall * 1e3):.1f} | {e.count / steps:.0f} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    extra = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=2 << 30, max_num_seqs=64, **extra)
    print(f"dtype {llm.engine.dtype}, {args.threads} threads, quantization {args.quantization}")
    for name in args.scenarios.split(","):
        prof, wall = scenario(llm, name, args.steps)
        report(name, prof, wall, args.steps, args.rows)


if __name__ == "__main__":
    main()
