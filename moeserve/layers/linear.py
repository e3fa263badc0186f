"""Linear layers and the one place a matmul kernel is picked.

A weight is either a plain tensor computed by `linear` (GPU, float32 on CPU), or packed once at
load into the layout of a CPU kernel library (a `PackedWeight`). The kernel is chosen per
machine by `choose_format` from what was measured (scripts/bench_linear_kernels.py):

- float32 with fewer than 512 rows: oneDNN's inner product (torch.ops.mkldnn._linear_pointwise)
  is 1.6-2x faster than MKL's F.linear at 1-64 rows on an AVX2 EPYC; from 512 rows on F.linear.
- bfloat16 on a CPU with bf16 instructions (AVX512-BF16 / AMX): a oneDNN weight reordered once
  (mkldnn._reorder_linear_weight) is 1.4-1.5x faster than F.linear at 1-128 rows (Sapphire Rapids,
  4096x1024: 0.25 ms vs 0.37 ms at 1 row).
- bfloat16 without bf16 instructions: emulated row by row; from 8 rows computing in float32 (the
  weight upcast per call) is 1.4x faster at 8 rows and 4x at 64.
- int8 (--quantization int8): per-output-channel symmetric int8 weights, activations quantized
  per call to u8 with one scale per call (dynamic quantization). fbgemm's kernel
  (quantized::linear_dynamic) on every x86 CPU: 3-10x float32 on AVX2. On CPUs with AMX-INT8,
  oneDNN's AMX kernel (onednn::qlinear_pointwise) is 1.7-3.2x fbgemm's from 32 rows (prefill)
  and slower below (decode): there each weight is packed for both and the row count picks
  (INT8_FBGEMM_AMX), which costs a second int8 copy of each quantized weight. MOESERVE_INT8_KERNEL
  =fbgemm|onednn|fbgemm_amx|native overrides the choice (benchmarks, or fbgemm alone for less memory).
- int8 on a CPU with AVX512-VNNI but no AMX, where moeserve's native kernels build
  (kernels/cpu_kernels.c, INT8_NATIVE): weights packed for vpdpbusd, activations quantized per
  row (symmetric s8, one scale per token, so a token's result does not depend on its batch
  neighbours), bf16 or float32 in and out with no conversion ops. Against fbgemm on a Zen 4
  EPYC, 2 threads, 4096x1024 (scripts/bench_linear_kernels.py): weights streamed from DRAM
  (--cold 24) 1.13x at 1 row, 1.05x at 4, 1.24x at 128; in cache 1.5-1.9x at 1 row. In the
  engine the huge pages add to it (1.2-1.4x per decode step, see kernels/arena.py).
- bfloat16 on a CPU with AVX512-BF16 but no AMX, where the native kernels build (NATIVE_BF16):
  moeserve's vdpbf16ps kernel over weights packed on huge pages. About oneDNN's speed with the
  weights in cache (0.8-1.2x); streamed from DRAM (--cold 24, 4096x1024) 1.48x at 1 row, 1.29x
  at 4, 1.06x at 16, 1.03x at 128.
  With AMX, oneDNN's tile kernels win at prefill and stay. MOESERVE_BF16_KERNEL=onednn|native
  overrides.
"""

from __future__ import annotations

import contextlib
import enum
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.cpu_features import (cpu_flags, cpu_has_amx_bf16, cpu_has_amx_int8, cpu_has_avx512_vnni,
                                   cpu_has_fast_bf16, cpu_has_vnni)
from moeserve.kernels import native, ops


def _onednn_linear():
    """The oneDNN op, or None when this torch build lacks it or it fails a smoke test."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w = torch.ones(2, 8), torch.ones(4, 8)
        return op if torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)) else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()
_ONEDNN_MAX_ROWS = 512
_UPCAST_MIN_ROWS = 8


def padded_rows(rows: int) -> int:
    """The row count a oneDNN GEMM runs at. oneDNN builds (JIT-compiles) a primitive per shape:
    5-6 ms for a bf16 4096x1024 weight at 300 rows, against 1.1 ms to run it, and it keeps 1024.
    Experts see every row count from 1 to the step budget, so unpadded each new count paid that
    again and the cache thrashed (a 1,400-token prefill step spent 1.0 s instead of 0.25 s in its
    linears). Rounded up to 8 buckets per power of two (under 1/8 of padding rows), a weight
    shape sees ~70 counts up to 2,048 rows; decode's 1-16 rows stay exact."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def onednn_rows(gemm, x: torch.Tensor) -> torch.Tensor:
    """gemm(x2) for x [..., in] at padded_rows (zero rows appended), its output cut back: [..., out]."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    padded = padded_rows(rows)
    if padded != rows:
        x2 = F.pad(x2, (0, 0, 0, padded - rows))
    y = gemm(x2)
    return (y if padded == rows else y[:rows]).reshape(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear semantics on a plain weight: x [..., in] @ weight[out, in].T + bias -> [..., out]."""
    if x.device.type != "cpu" or not x.numel():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows >= _UPCAST_MIN_ROWS and not cpu_has_fast_bf16():
        b32 = None if bias is None else bias.float()
        return linear(x.float(), weight.float(), b32).to(torch.bfloat16)
    if _ONEDNN_LINEAR is not None and x.dtype == weight.dtype == torch.float32 and rows < _ONEDNN_MAX_ROWS:
        return onednn_rows(lambda x2: _ONEDNN_LINEAR(x2, weight, bias, "none", [], ""), x)
    return F.linear(x, weight, bias)


class WeightFormat(enum.Enum):
    PLAIN = "plain"              # a tensor, computed by `linear`
    ONEDNN_BF16 = "onednn_bf16"  # bf16 reordered for oneDNN (CPUs with bf16 instructions)
    INT8_ONEDNN = "int8_onednn"  # int8, oneDNN's linear_dynamic (MOESERVE_INT8_KERNEL=onednn)
    INT8_FBGEMM = "int8_fbgemm"  # int8, fbgemm kernel (any x86 CPU with AVX2)
    INT8_FBGEMM_AMX = "int8_fbgemm_amx"  # int8, fbgemm below 32 rows, oneDNN's AMX kernel from 32
    INT8_NATIVE = "int8_native"  # int8, moeserve's VNNI kernel, per-row activation scales
    NATIVE_BF16 = "native_bf16"  # bf16, moeserve's AVX512-BF16 kernel, weights on huge pages

    @property
    def is_int8(self) -> bool:
        return self in (WeightFormat.INT8_ONEDNN, WeightFormat.INT8_FBGEMM, WeightFormat.INT8_FBGEMM_AMX,
                        WeightFormat.INT8_NATIVE)

    @property
    def computes_in_float32(self) -> bool:
        """The kernel takes and gives float32 (callers convert around it, or stay in float32)."""
        return self.is_int8 and self is not WeightFormat.INT8_NATIVE


def choose_format(dtype: torch.dtype, device: torch.device, quantize_int8: bool) -> WeightFormat:
    """The fastest format this machine has for weights served in `dtype` (see the module doc)."""
    if device.type != "cpu":
        if quantize_int8:
            raise ValueError("int8 weights run on CPU kernels only (fbgemm / oneDNN); this device has none")
        return WeightFormat.PLAIN
    if quantize_int8:
        engines = torch.backends.quantized.supported_engines
        forced = os.environ.get("MOESERVE_INT8_KERNEL")     # see the module doc
        if forced:
            return _forced_int8_format(forced, engines)
        if "fbgemm" in engines and cpu_has_amx_int8() and _AMX_INT8_LINEAR is not None:
            return WeightFormat.INT8_FBGEMM_AMX
        if cpu_has_avx512_vnni() and native.library() is not None:
            return WeightFormat.INT8_NATIVE
        if "fbgemm" in engines:
            return WeightFormat.INT8_FBGEMM
        raise ValueError(f"this torch build has no x86 int8 kernel (quantized engines: {engines})")
    if dtype == torch.bfloat16 and cpu_has_fast_bf16():
        return _bf16_format()
    return WeightFormat.PLAIN


def _bf16_format() -> WeightFormat:
    forced = os.environ.get("MOESERVE_BF16_KERNEL")     # see the module doc
    native_ok = native.library() is not None
    if forced not in (None, "", "onednn", "native") or (forced == "native" and not native_ok) \
            or (forced == "onednn" and _ONEDNN_LINEAR is None):
        raise ValueError(f"MOESERVE_BF16_KERNEL={forced}: expected onednn or native, one this machine has "
                         f"(native kernels built: {native_ok}, oneDNN: {_ONEDNN_LINEAR is not None})")
    if forced == "native" or (not forced and native_ok and "avx512_bf16" in cpu_flags() and not cpu_has_amx_bf16()):
        return WeightFormat.NATIVE_BF16
    return WeightFormat.ONEDNN_BF16 if _ONEDNN_LINEAR is not None else WeightFormat.PLAIN


def _forced_int8_format(name: str, engines: list[str]) -> WeightFormat:
    formats = {"fbgemm": WeightFormat.INT8_FBGEMM, "onednn": WeightFormat.INT8_ONEDNN,
               "fbgemm_amx": WeightFormat.INT8_FBGEMM_AMX, "native": WeightFormat.INT8_NATIVE}
    needs = {"fbgemm": "fbgemm" in engines, "onednn": "onednn" in engines,
             "fbgemm_amx": "fbgemm" in engines and _AMX_INT8_LINEAR is not None,
             "native": native.library() is not None}
    if name not in formats or not needs[name]:
        raise ValueError(f"MOESERVE_INT8_KERNEL={name}: expected one of {sorted(formats)} that this "
                         f"torch and CPU have (quantized engines {engines}, AMX-INT8 {cpu_has_amx_int8()})")
    return formats[name]


def _amx_int8_linear():
    """oneDNN's int8 GEMM with u8 activations (the x86 ops torch.compile's int8 path uses), or None."""
    try:
        return torch.ops.onednn.qlinear_pointwise.default, torch.ops.onednn.qlinear_prepack.default
    except (AttributeError, RuntimeError):
        return None


_AMX_INT8_LINEAR = _amx_int8_linear()
# The overload itself: calling the op packet resolves it again on every call (~4 us here).
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default
_AMX_INT8_MIN_ROWS = 32    # fbgemm is faster below (decode), oneDNN's AMX kernel from here (prefill)


class PackedWeight:
    """A weight [out, in] in a kernel library's own layout; calling it is F.linear without bias."""

    out_features: int
    nbytes: int
    writes_into = False    # __call__(x, out=...) writes into a caller's [rows, out] tensor of x's dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OneDNNBF16Weight(PackedWeight):
    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.to(torch.bfloat16).contiguous()
        self.out_features, self.nbytes = w.shape[0], w.numel() * 2
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # [..., in] bf16 -> [..., out] bf16
        return onednn_rows(lambda x2: _ONEDNN_LINEAR(x2, self.weight, None, "none", [], ""), x)


@contextlib.contextmanager
def _quantized_engine(name: str):
    """Prepacking reads torch's global engine; set it for the call and put it back."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight [out, in] -> (int8 [out, in], scale [out] float32)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)   # [out]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Weight(PackedWeight):
    """int8 weights, per-output-channel scales; activations quantized per call (asymmetric u8)."""

    def __init__(self, weight: torch.Tensor, fmt: WeightFormat) -> None:
        q, scale = quantize_per_channel(weight)
        out_features = q.shape[0]
        self.out_features, self.nbytes = out_features, q.numel() + 4 * out_features
        engine = "onednn" if fmt is WeightFormat.INT8_ONEDNN else "fbgemm"
        # Without VNNI, fbgemm's u8 x s8 pairs can saturate int16: it asks for 7-bit activations.
        self.reduce_range = engine == "fbgemm" and not cpu_has_vnni()
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with _quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # quantized tensor creation is deprecated, the ops are not
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.amx = None
        if fmt is WeightFormat.INT8_FBGEMM_AMX:
            _, prepack = _AMX_INT8_LINEAR
            self.amx = prepack(q, None)                    # the same int8 values, oneDNN's layout
            self.scale, self.zero_points = scale, zero_points
            self.nbytes += q.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # [..., in] -> [..., out], x's dtype
        if self.amx is not None and x.numel() >= _AMX_INT8_MIN_ROWS * x.shape[-1]:
            return onednn_rows(self._amx, x)
        y = _LINEAR_DYNAMIC(x.float(), self.packed, self.reduce_range)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _amx(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] quantized to u8 with one scale and zero point (its range, widened to hold
        0), then oneDNN's int8 GEMM with the output in x's dtype: [n, out]. The scale and zero
        point are host numbers (x is on the CPU): tensor arithmetic on them was ~6 small ops a call."""
        op, _ = _AMX_INT8_LINEAR
        x2 = x.float()                                                    # [n, in]
        low, high = (v.item() for v in torch.aminmax(x2))
        low, high = min(low, 0.0), max(high, 0.0)
        x_scale = max((high - low) / 255.0, _FLOAT32_TINY)
        x_zero = round(-low / x_scale)
        with warnings.catch_warnings():
            # quantized tensors are deprecated, but this fused kernel is 4x the decomposed ops
            warnings.simplefilter("ignore")
            qx = _uint8_view(torch.quantize_per_tensor(x2, x_scale, x_zero, torch.quint8))   # [n, in] u8
        return op(qx, x_scale, x_zero, self.amx, self.scale, self.zero_points, None, 1.0, 0, x.dtype,
                  "none", [], "")                                         # [n, out]


_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _uint8_view(q: torch.Tensor) -> torch.Tensor:
    """A quint8 tensor's values as a plain uint8 tensor on the same storage. int_repr() copies
    them, and slowly: 160 us of a 310 us quantization at 512 x 1024 (more than the GEMM at
    some sizes)."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """y, or y copied into the caller's `out` (a kernel path that could not write there itself)."""
    return y if out is None else out.copy_(y)


class NativeBF16Weight(PackedWeight):
    """bf16 weights in moeserve's vdpbf16ps layout on huge pages (kernels/ops.bf16_pack)."""

    writes_into = True

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.packed = ops.bf16_pack(weight)
        self.nbytes = self.packed.numel() * 2

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:   # [..., in] -> [..., out]
        if x.dtype == torch.bfloat16:
            return ops.bf16_linear(x, self.packed, None, self.out_features, out)
        return _into(ops.bf16_linear(x.to(torch.bfloat16), self.packed, None, self.out_features).to(x.dtype), out)


class NativeInt8Weight(PackedWeight):
    """int8 weights, per-output-channel scales, in moeserve's VNNI layout (kernels/ops.int8_quantize_pack);
    activations quantized per row inside the kernel. Any float dtype in, the same dtype out."""

    writes_into = True

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.packed, self.wsum, self.scale = ops.int8_quantize_pack(weight)   # quantize_per_channel's values
        self.nbytes = self.packed.numel() + 4 * (self.wsum.numel() + self.out_features)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:   # [..., in] -> [..., out]
        if x.dtype in native.DTYPES:
            return ops.int8_linear(x, self.packed, self.wsum, self.scale, None, self.out_features, out)
        return _into(ops.int8_linear(x.float(), self.packed, self.wsum, self.scale, None, self.out_features).to(x.dtype),
                     out)


def pack_weight(weight: torch.Tensor, fmt: WeightFormat) -> PackedWeight:
    """weight [out, in] (any float dtype) -> the packed form of `fmt` (not PLAIN)."""
    if fmt is WeightFormat.ONEDNN_BF16:
        return OneDNNBF16Weight(weight)
    if fmt is WeightFormat.INT8_NATIVE:
        return NativeInt8Weight(weight)
    if fmt is WeightFormat.NATIVE_BF16:
        return NativeBF16Weight(weight)
    if fmt.is_int8:
        return Int8Weight(weight, fmt)
    raise ValueError(f"{fmt} is not a packed format")


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) computed with `linear`, or by a packed
    weight after `pack` (then `weight` is None: the float copy is never kept)."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return linear(x, self.weight, self.bias)
        y = self.packed(x)
        return y if self.bias is None else y.add_(self.bias)

    def pack(self, weight: torch.Tensor, fmt: WeightFormat) -> None:
        """Keeps weight [out, in] only in `fmt`'s layout."""
        self.packed = pack_weight(weight, fmt)
        self.weight = None
