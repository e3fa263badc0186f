"""The malloc thresholds: a freed step-sized buffer is reused, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from moeserve.worker import host_allocator

# A step's worth of buffers (64, 16 and 16 MiB, every page written), freed, ten times over:
# prints whether the thresholds were set and the page faults per step (24,576 pages touched).
_PROBE = """
import resource, torch
from moeserve.worker.host_allocator import tune_host_allocator
applied = tune_host_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a, b = torch.ones(16 << 20), torch.ones(4 << 20)
    c = a[: 4 << 20] + b
    del a, b, c
step()
before = faults()
for _ in range(10):
    step()
print(applied, (faults() - before) // 10)
"""
_PAGES_PER_STEP = (64 + 16 + 16) * 256

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's")


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MOESERVE_NO_MALLOC_TUNING", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_tuned_process_reuses_freed_step_buffers() -> None:
    applied, faults = _probe()
    assert applied
    assert faults < 0.3 * _PAGES_PER_STEP      # seen: 2,867 of 24,576


@glibc_only
def test_opt_out_leaves_glibc_defaults() -> None:
    applied, faults = _probe(MOESERVE_NO_MALLOC_TUNING="1")
    assert not applied
    assert faults > 0.6 * _PAGES_PER_STEP      # seen: 19,661 (unmapped or trimmed on free)


def test_preloaded_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert host_allocator._apply() is False
