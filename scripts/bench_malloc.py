"""The malloc thresholds of moeserve/worker/host_allocator.py against glibc's defaults, A/B in one
process: blocks of engine steps alternate between the two settings, so a noisy machine weighs on
both alike.

    python scripts/bench_malloc.py /path/to/bench-model [--quantization int8]

Prints, for a decode step at batch 1 and 16 and a fresh 16 x 128-token prefill, the median step
time under each setting and default/tuned (above 1: the tuning is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ["MOESERVE_NO_MALLOC_TUNING"] = "1"     # this script sets the thresholds itself

from moeserve import LLM  # noqa: E402
from moeserve.worker.host_allocator import GLIBC_DEFAULTS, TUNED, set_thresholds  # noqa: E402
from profile_step import drain, fill  # noqa: E402


def use(tuned: bool) -> None:
    if not set_thresholds(TUNED if tuned else GLIBC_DEFAULTS):
        raise SystemExit("mallopt refused: not glibc?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--quantization", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=8, help="alternating blocks per scenario")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    extra = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, kv_cache_memory=1 << 30, max_num_seqs=64, **extra)
    times: dict[tuple[str, bool], list[float]] = {}
    for batch in (1, 16):
        fill(llm, batch, 128, 14 * args.blocks + 8, f"decode{batch}")
        for _ in range(5):
            llm.engine.step()
        for block in range(args.blocks):          # context lengths grow alike under both settings
            tuned = block % 2 == 0
            use(tuned)
            llm.engine.step()
            for _ in range(12):
                start = time.perf_counter()
                llm.engine.step()
                times.setdefault((f"decode batch {batch}", tuned), []).append(time.perf_counter() - start)
        drain(llm)
    for block in range(args.blocks):
        tuned = block % 2 == 0
        use(tuned)
        fill(llm, 16, 128, 1, f"prefill{block}", seed=100 + block)
        start = time.perf_counter()
        drain(llm)
        times.setdefault(("prefill 16 x 128", tuned), []).append(time.perf_counter() - start)
    print(f"quantization {args.quantization}, dtype {llm.engine.dtype}, {args.threads} threads")
    print("| scenario | tuned ms | glibc defaults ms | default/tuned |\n|---|---|---|---|")
    for name in ("decode batch 1", "decode batch 16", "prefill 16 x 128"):
        tuned, default = (statistics.median(times[(name, t)]) * 1e3 for t in (True, False))
        print(f"| {name} | {tuned:.2f} | {default:.2f} | {default / tuned:.3f} |")
    llm.close()


if __name__ == "__main__":
    main()
