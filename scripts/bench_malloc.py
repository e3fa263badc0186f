"""The malloc thresholds of moeserve/worker/host_allocator.py against glibc's defaults, A/B in one
process: blocks of engine steps alternate between the two settings, so a noisy machine weighs on
both alike.

    python scripts/bench_malloc.py /path/to/bench-model [--quantization int8]

Prints, for a decode step at batch 1 and 16 and a fresh 16 x 128-token prefill, the median step
time under each setting and default/tuned (above 1: the tuning is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import torch

os.environ["MOESERVE_NO_MALLOC_TUNING"] = "1"     # this script sets the thresholds itself

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.worker import host_allocator  # noqa: E402

_PARAMS = (host_allocator._M_MMAP_THRESHOLD, host_allocator._M_TRIM_THRESHOLD, host_allocator._M_TOP_PAD)
_TUNED = (host_allocator._MMAP, host_allocator._TRIM, host_allocator._TOP_PAD)
_GLIBC_DEFAULTS = (128 << 10, 128 << 10, 0)


def set_thresholds(libc, tuned: bool) -> None:
    for param, value in zip(_PARAMS, _TUNED if tuned else _GLIBC_DEFAULTS):
        if libc.mallopt(param, value) != 1:
            raise SystemExit("mallopt refused: not glibc?")


def add(llm: LLM, tag: str, n: int, max_tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        llm.engine.add_request(f"{tag}-{i}", torch.randint(10, 2000, (128,), generator=g).tolist(),
                               SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--quantization", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=8, help="alternating blocks per scenario")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6")
    extra = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, kv_cache_memory=1 << 30, max_num_seqs=64, **extra)
    times: dict[tuple[str, bool], list[float]] = {}
    for batch in (1, 16):
        add(llm, f"decode{batch}", batch, 14 * args.blocks + 8, seed=batch)
        for _ in range(5):
            llm.engine.step()
        for block in range(args.blocks):          # context lengths grow alike under both settings
            tuned = block % 2 == 0
            set_thresholds(libc, tuned)
            llm.engine.step()
            for _ in range(12):
                start = time.perf_counter()
                llm.engine.step()
                times.setdefault((f"decode batch {batch}", tuned), []).append(time.perf_counter() - start)
        drain(llm)
    for block in range(args.blocks):
        tuned = block % 2 == 0
        set_thresholds(libc, tuned)
        add(llm, f"prefill{block}", 16, 1, seed=100 + block)
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
