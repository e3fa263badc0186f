"""Device and dtype resolution, and the memory figures the KV cache is sized from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from moeserve.cpu_features import cpu_has_fast_bf16

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from moeserve.errors import ConfigError
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(requested)


def resolve_dtype(requested: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype, adjusted to what the device computes fast."""
    if requested != "auto":
        return _DTYPES[requested]
    dtype = _DTYPES.get(checkpoint_dtype.replace("torch.", ""), torch.float32)
    if device.type == "cpu" and dtype == torch.float32 and cpu_has_fast_bf16():
        # As vLLM's CPU backend: half the bytes per weight, and this CPU computes bf16 natively.
        log.info("dtype auto: float32 checkpoint served in bfloat16 (--dtype float32 keeps float32)")
        return torch.bfloat16
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16   # fp16 matmul on CPU is ~400x slower than bf16
        log.info("dtype auto: float16 checkpoint computed in bfloat16 on CPU")
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        log.warning("dtype auto: this CPU has no bf16 instructions (bf16 matmul is emulated, ~200x "
                    "slower than fp32); computing in float32. Pass --dtype bfloat16 to force it.")
        dtype = torch.float32
    return dtype


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
