"""Packed weights on transparent huge pages (kernels/arena.py)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from moeserve.kernels.arena import HugePageArena


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text.split("[", 1)[1].split("]", 1)[0]


def test_tensors_are_distinct_aligned_and_start_on_a_huge_page():
    arena = HugePageArena(chunk_bytes=4 << 20)
    a = arena.empty(100, torch.int8)
    b = arena.empty(3 << 20, torch.float32)                      # 12 MiB: a chunk of its own
    c = arena.empty(10, torch.int32)
    assert a.data_ptr() % (2 << 20) == 0 and b.data_ptr() % (2 << 20) == 0
    assert c.data_ptr() % 64 == 0
    a.fill_(7), b.fill_(1.5), c.fill_(-3)
    assert a.eq(7).all() and b.eq(1.5).all() and c.eq(-3).all()
    ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, b, c))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))   # no overlap


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="transparent huge pages are off on this machine")
def test_memory_is_backed_by_huge_pages():
    arena = HugePageArena(chunk_bytes=8 << 20)
    t = arena.empty(8 << 20, torch.uint8)
    t.fill_(1)                                                    # first touch: huge pages where available
    assert arena.advised
    start, end = t.data_ptr(), t.data_ptr() + t.numel()
    huge_kb = 0
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if "-" in line.split(" ", 1)[0] and not line.startswith(("Anon", "Size")):
            lo, hi = (int(v, 16) for v in line.split(" ", 1)[0].split("-"))
            inside = lo <= start < hi
        elif line.startswith("AnonHugePages:") and inside:
            huge_kb += int(line.split()[1])
    assert huge_kb >= 2048, "no huge page backs the arena (fragmented memory can cause this)"


def test_opt_out(monkeypatch):
    monkeypatch.setenv("MOESERVE_NO_HUGE_PAGES", "1")
    arena = HugePageArena(chunk_bytes=2 << 20)
    arena.empty(10, torch.int8)
    assert not arena.advised
