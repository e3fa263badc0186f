"""What this CPU computes fast, read once from /proc/cpuinfo. The lowest floor: layers and the
worker both ask here, so the kernel choice depends on the machine, not on who asks."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX). Without them PyTorch
    emulates bf16 matmul: measured 0.28 GFLOP/s vs 64 for fp32 on an AVX2-only EPYC."""
    flags = cpu_flags()
    if not flags:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx_int8() -> bool:
    """AMX tiles with int8 (Sapphire Rapids and later): oneDNN's int8 GEMM uses them."""
    return "amx_int8" in cpu_flags()


def cpu_has_vnni() -> bool:
    """An int8 dot-product instruction (AVX512-VNNI or AVX-VNNI): u8 x s8 sums without the
    16-bit saturation of AVX2's vpmaddubsw, so int8 activations may use the full 8 bits."""
    flags = cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_has_avx512_vnni() -> bool:
    """512-bit VNNI (vpdpbusd on zmm): what moeserve's native int8 kernel is written for."""
    return "avx512_vnni" in cpu_flags()


def cpu_has_amx_bf16() -> bool:
    """AMX tiles with bf16: oneDNN's bf16 GEMM uses them (far faster than AVX-512 at prefill)."""
    return "amx_bf16" in cpu_flags()
