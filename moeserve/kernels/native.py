"""moeserve's fused CPU kernels (cpu_kernels.c): compiled once per machine at first use, loaded
with ctypes, called with raw pointers after the checks below.

Why not a torch C++ extension: compiling against torch's headers takes a minute; this C file
builds in about a second with the system's gcc, and a ctypes call costs ~1-2 us, less than the
PyTorch ops each kernel replaces. It links the OpenMP runtime torch already loaded
(libgomp.so.1), so both share one thread pool and torch.set_num_threads applies to both.

Where there is no C compiler, a non-x86 / non-Linux machine, or MOESERVE_NATIVE_KERNELS=0, the
library is None and every caller keeps its PyTorch path (the same results, more ops).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from moeserve.cache import default_cache_dir
from moeserve.cpu_features import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -ffp-contract=off: no fused multiply-adds, so the elementwise kernels round as PyTorch does.
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC")
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "decode_attention": (_P, _I, _P, _P, _P, _I, _P, _P, _P, _F, _I, _I, _I, _I, _P),
    "rms_norm": (_P, _I, _P, _F, _I, _I, _P),
    "rope_write_cache": (_P, _I, _P, _I, _P, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P),
    "gather_rows": (_P, _I, _P, _I, _I, _I, ctypes.c_int, _P),
    "swiglu": (_P, _I, _I, _P),
    "moe_combine": (_P, ctypes.c_int, _I, _P, _P, _I, _I, _I, _P),
    "int8_linear": (_P, _I, _I, _I, _P, _P, _P, _P, _I, _P),
    "int8_quantize_pack": (_P, _I, _I, _P, _P, _P),
    "argmax": (_P, _I, _I, _I, _P),
    "moe_int8": (_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P),
}
# Kernels without a dtype suffix.
_PLAIN_SIGNATURES = {
    "moe_sort_routes": (_P, _P, _I, _I, _I, _P, _P),
    "bf16_pack": (_P, _I, _I, _P),
    "bf16_linear": (_P, _I, _I, _I, _P, _P, _I, _P),
    "moe_bf16": (_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P),
}


def enabled() -> bool:
    return os.environ.get("MOESERVE_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _build_key(compiler: str) -> str:
    """Source, flags, compiler and CPU: -march=native code built on one CPU may not run on another."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    parts = [SOURCE.read_text(), " ".join(CFLAGS), version, " ".join(sorted(cpu_flags())), platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(compiler: str, target: Path, march: str = "native") -> None:
    """Compiles SOURCE for `march` (gcc's -march: this CPU, or e.g. x86-64-v3 for AVX2 only)
    into target, atomically (concurrent processes may build at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, f"-march={march}", str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class NativeKernels:
    """The loaded library: fn(name, dtype) is the kernel for that dtype, its argtypes declared."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._fns = {}
        for name, argtypes in _SIGNATURES.items():
            for suffix in DTYPES.values():
                fn = getattr(self._lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self._fns[name, suffix] = fn
        for name, argtypes in _PLAIN_SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, None
            self._fns[name, None] = fn

    def fn(self, name: str, dtype: torch.dtype | None = None):
        return self._fns[name, None if dtype is None else DTYPES[dtype]]


@functools.cache
def library() -> NativeKernels | None:
    """The kernels, built on first call; None (logged once) where they cannot be."""
    if not enabled():
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        log.info("native CPU kernels: not built on %s %s; PyTorch ops instead", platform.system(), platform.machine())
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("native CPU kernels: no C compiler (gcc or $CC) found; PyTorch ops instead (slower decode)")
        return None
    target = cache_dir() / f"moeserve_cpu_{_build_key(compiler)}.so"
    try:
        if not target.exists():
            build(compiler, target)
        return NativeKernels(target)
    except (OSError, RuntimeError, AttributeError) as err:
        log.warning("native CPU kernels unavailable (%s); PyTorch ops instead", err)
        return None


def supports(*tensors: torch.Tensor) -> bool:
    """True when the native kernels can take these tensors: on the CPU, float32 or bfloat16 (all
    the same dtype), and the library built."""
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return library() is not None
