"""Where a step's time goes: torch.profiler over decode steps at batch 1 and 16 and a mixed step.

    python scripts/profile_step.py /path/to/bench-model [--dtype auto] [--quantization int8]

For each scenario the engine is warmed up, then N steps run under torch.profiler; the table lists
the ops by self CPU time, and the last line compares the step's wall time with the sum of the
operator time (the rest is Python between the ops). moeserve's native kernels are ctypes calls,
invisible to the profiler on their own: each is labelled "native::<kernel>" here.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeserve import LLM, SamplingParams
from moeserve.kernels import ops as native_ops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--quantize-lm-head", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=18, help="ops listed per scenario")
    p.add_argument("--scenarios", default="decode1,decode16,mixed")
    return p.parse_args()


def fill(llm: LLM, n: int, prompt_len: int, max_tokens: int, tag: str, seed: int | None = None) -> None:
    """n requests of random prompts, seeded by n unless `seed` is given (another seed: prompts no
    earlier fill cached)."""
    g = torch.Generator().manual_seed(n if seed is None else seed)
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
    elif name.startswith("cached"):  # N chat turns arriving together: a cached 1,130-token history + 92 new tokens each
        prof, wall = cached_turns(llm, int(name[len("cached"):]), steps)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    drain(llm)
    return prof, wall


def cached_turns(llm: LLM, n: int, steps: int, seed: int = 0) -> tuple[object, float]:
    """Each profiled step prefills n later chat turns at once: every prompt is a shared 1,000-token
    system prompt + a 130-token history of its own (both in the prefix cache) + 92 new tokens."""
    g = torch.Generator().manual_seed(1000 * seed + n)
    tokens = lambda k: torch.randint(10, 2000, (k,), generator=g).tolist()   # noqa: E731
    system = tokens(1000)
    histories = [system + tokens(130) for _ in range(n)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def turn(tag: str, extra: int) -> None:
        for i, history in enumerate(histories):
            llm.engine.add_request(f"{tag}-{i}", history + tokens(extra), params)
    turn("history", 0)
    drain(llm)
    for r in range(2):                # warm-up: the step's shapes
        turn(f"warm-{r}", 92)
        drain(llm)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        total = 0.0
        for r in range(steps):
            turn(f"turn-{r}", 92)
            start = time.perf_counter()
            drain(llm)
            total += time.perf_counter() - start
    return prof, total / steps


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


def label_native_kernels() -> None:
    """Wraps every kernel in moeserve.kernels.ops in a profiler range named after it (callers
    look the functions up on the module at call time, so they get the wrapped ones)."""
    def labelled(name, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"native::{name}"):
                return fn(*args, **kwargs)
        return call
    for name in ("decode_attention", "rms_norm", "rope_write_cache", "sort_routes", "gather_rows", "swiglu",
                 "moe_combine", "int8_linear", "bf16_linear"):
        setattr(native_ops, name, labelled(name, getattr(native_ops, name)))


def main() -> None:
    args = parse_args()
    label_native_kernels()
    torch.set_num_threads(args.threads)
    extra = {"quantization": args.quantization, "quantize_lm_head": args.quantize_lm_head} if args.quantization else {}
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=2 << 30, max_num_seqs=64, **extra)
    print(f"dtype {llm.engine.dtype}, {args.threads} threads, quantization {args.quantization}")
    for name in args.scenarios.split(","):
        prof, wall = scenario(llm, name, args.steps)
        report(name, prof, wall, args.steps, args.rows)


if __name__ == "__main__":
    main()
