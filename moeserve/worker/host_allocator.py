"""Keeps glibc's malloc from handing a serving step's large buffers back to the kernel.

PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold (128 KiB,
raised on the fly up to 32 MiB) with a fresh mmap and unmaps it on free, and trims the heap top
past 128 KiB: a step's activations (a prefill's [4096, 4096] expert rows, a decode batch's
gathered KV) then page-fault in again at every step. In the VMs measured here a fault costs ~1 us
per 4 KiB page: gathering 16 contexts of 200 tokens (3.3 MB) took 2.4 ms faulting, 0.11 ms reused.
The thresholds below keep up to `_TRIM` of freed memory in the process for reuse, as vLLM's and
Intel's CPU guides get by preloading tcmalloc or jemalloc; RSS stays at its high-water mark.
scripts/bench_malloc.py (A/B in one process, 2-core EPYC, bench model), glibc defaults / tuned:
bf16 decode at batch 16 1.28-1.33x, a 16 x 128 prefill 1.09-1.13x, batch 1 0.95-1.01x (noise);
int8 decode at batch 1 1.10-1.11x, batch 16 1.11-1.14x, prefill 1.08-1.38x.
The weights are loaded before the thresholds change: they keep their own mappings. Loading
leaves the quantization and packing temporaries free inside the heap (the packed weights
themselves live in kernels/arena.py's mappings), so malloc_trim hands those pages back first:
an int8 bench-model process held 1.6 GiB of heap after loading without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3     # <malloc.h>
_MMAP = 256 << 20     # requests above this still get their own mapping (the KV cache, embeddings)
_TRIM = 1 << 30       # free memory kept at the heap top before it is returned
_TOP_PAD = 64 << 20   # extra bytes taken per heap growth: fewer brk calls
_DISABLE_ENV = "MOESERVE_NO_MALLOC_TUNING"
TUNED = (_MMAP, _TRIM, _TOP_PAD)
GLIBC_DEFAULTS = (128 << 10, 128 << 10, 0)   # glibc's documented defaults (scripts/bench_malloc.py)

_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Sets the thresholds once per process (glibc only); False where it does nothing: another
    libc, a preloaded allocator (LD_PRELOAD names one), or MOESERVE_NO_MALLOC_TUNING=1."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):       # tcmalloc / jemalloc: theirs to tune
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        _libc().malloc_trim(0)       # the load's freed temporaries, before the heap is kept
        ok = set_thresholds(TUNED)
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("glibc refused the malloc thresholds; large step buffers will page-fault each step")
    return ok


def set_thresholds(values: tuple[int, int, int]) -> bool:
    """glibc's (mmap threshold, trim threshold, top pad) set to `values`; True if all were taken."""
    libc = _libc()
    params = (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD)
    return all(libc.mallopt(param, value) == 1 for param, value in zip(params, values))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
