"""Linear layers routed to the fastest kernel the device has.

Measured on this project's 2-core AVX2 machine (scripts/bench_moe_layer.py and by hand), for a
[4096, 1024] weight:
- float32 with fewer than 512 rows (decode steps, expert groups): oneDNN's inner product
  (torch.ops.mkldnn._linear_pointwise, the op torch.compile's inductor emits) is 1.6x faster than
  MKL's F.linear at 1 row, ~2x at 2-16 rows, 1.7x at 64, 1.1x at 256; from 512 rows on F.linear
  is as fast or faster.
- bfloat16 on a CPU without bf16 instructions: F.linear is emulated row by row; from 8 rows on,
  computing in float32 (weight upcast per call) is 1.4x faster at 8 rows and 4x at 64.
Elsewhere (CUDA, builds without oneDNN) plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.worker.device import cpu_has_fast_bf16


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
    """F.linear semantics: x [..., in] @ weight[out, in].T + bias -> [..., out]."""
    if x.device.type != "cpu" or not x.numel():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows >= _UPCAST_MIN_ROWS and not cpu_has_fast_bf16():
        b32 = None if bias is None else bias.float()
        return linear(x.float(), weight.float(), b32).to(torch.bfloat16)
    if _ONEDNN_LINEAR is not None and x.dtype == weight.dtype == torch.float32 and rows < _ONEDNN_MAX_ROWS:
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) computed with `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
