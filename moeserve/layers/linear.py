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
  per call (torch.ops.quantized.linear_dynamic), fbgemm's kernel on every x86 CPU (3-10x float32
  on AVX2). On AMX-INT8 CPUs oneDNN's kernel is 1.3-4x faster from 32 rows (prefill) but slower
  at the 1-16 rows of decode, and its packed weight keeps a second int8 copy: served end to end
  on the bench model, fbgemm gave 61 tok/s at 1 stream and 234 at 16 with 1.36 GiB RSS, oneDNN
  48 and 227 with 2.45 GiB. MOESERVE_INT8_KERNEL=onednn picks oneDNN anyway (for benchmarks).
"""

from __future__ import annotations

import contextlib
import enum
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.cpu_features import cpu_has_fast_bf16, cpu_has_vnni


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear semantics on a plain weight: x [..., in] @ weight[out, in].T + bias -> [..., out]."""
    if x.device.type != "cpu" or not x.numel():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows >= _UPCAST_MIN_ROWS and not cpu_has_fast_bf16():
        b32 = None if bias is None else bias.float()
        return linear(x.float(), weight.float(), b32).to(torch.bfloat16)
    if _ONEDNN_LINEAR is not None and x.dtype == weight.dtype == torch.float32 and rows < _ONEDNN_MAX_ROWS:
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class WeightFormat(enum.Enum):
    PLAIN = "plain"              # a tensor, computed by `linear`
    ONEDNN_BF16 = "onednn_bf16"  # bf16 reordered for oneDNN (CPUs with bf16 instructions)
    INT8_ONEDNN = "int8_onednn"  # int8, oneDNN kernel (MOESERVE_INT8_KERNEL=onednn)
    INT8_FBGEMM = "int8_fbgemm"  # int8, fbgemm kernel (any x86 CPU with AVX2)

    @property
    def is_int8(self) -> bool:
        return self in (WeightFormat.INT8_ONEDNN, WeightFormat.INT8_FBGEMM)


def choose_format(dtype: torch.dtype, device: torch.device, quantize_int8: bool) -> WeightFormat:
    """The fastest format this machine has for weights served in `dtype` (see the module doc)."""
    if device.type != "cpu":
        if quantize_int8:
            raise ValueError("int8 weights run on CPU kernels only (fbgemm / oneDNN); this device has none")
        return WeightFormat.PLAIN
    if quantize_int8:
        engines = torch.backends.quantized.supported_engines
        forced = os.environ.get("MOESERVE_INT8_KERNEL")     # fbgemm | onednn: for benchmarks
        if forced:
            if forced not in engines or forced not in ("fbgemm", "onednn"):
                raise ValueError(f"MOESERVE_INT8_KERNEL={forced}: this torch has {engines}")
            return WeightFormat.INT8_ONEDNN if forced == "onednn" else WeightFormat.INT8_FBGEMM
        if "fbgemm" in engines:
            return WeightFormat.INT8_FBGEMM
        raise ValueError(f"this torch build has no x86 int8 kernel (quantized engines: {engines})")
    if dtype == torch.bfloat16 and cpu_has_fast_bf16() and _ONEDNN_LINEAR is not None:
        return WeightFormat.ONEDNN_BF16
    return WeightFormat.PLAIN


class PackedWeight:
    """A weight [out, in] in a kernel library's own layout; calling it is F.linear without bias."""

    out_features: int
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OneDNNBF16Weight(PackedWeight):
    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.to(torch.bfloat16).contiguous()
        self.out_features, self.nbytes = w.shape[0], w.numel() * 2
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # [..., in] bf16 -> [..., out] bf16
        return _ONEDNN_LINEAR(x, self.weight, None, "none", [], "")


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
        with _quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # quantized tensor creation is deprecated, the ops are not
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # [..., in] -> [..., out], x's dtype
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def pack_weight(weight: torch.Tensor, fmt: WeightFormat) -> PackedWeight:
    """weight [out, in] (any float dtype) -> the packed form of `fmt` (not PLAIN)."""
    if fmt is WeightFormat.ONEDNN_BF16:
        return OneDNNBF16Weight(weight)
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
