"""Other int8 schemes simulated in float, as yardsticks for --quantization int8's numerics
(scripts/quant_quality.py --schemes ...). They answer "is our error the scheme's or the kernel's?"
and "what would another scheme buy?", without their kernels:

- weight-only: the same per-output-channel symmetric int8 weights, activations left in full
  precision (what a weight-only int8 kernel computes).
- q8_0: llama.cpp's Q8_0: weights in blocks of 32 along the input with one fp16 scale each, and
  activations quantized the same way per row before the dot products (its vec_dot_type).

A simulated weight keeps the dequantized float weight; the same weights as --quantization int8 are
replaced (experts, shared experts, attention projections; routers, norms, embeddings stay as they
are), by loading with int8 and patching the packing function the loader calls.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import moeserve.layers.experts as experts_mod
import moeserve.layers.linear as linear_mod
from moeserve.layers.linear import PackedWeight, quantize_per_channel
from moeserve.models.loader import load_model

SCHEMES = ("weight-only", "q8_0")
Q8_0_BLOCK = 32


def q8_0_fake_quant(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] float -> the values Q8_0 stores, dequantized: symmetric int8 per block of 32
    along the last dim, scale = block absmax / 127 rounded to fp16 (a ragged last block is padded
    with zeros, which leave its scale alone). Same shape and dtype float32."""
    n = t.shape[-1]
    pad = -n % Q8_0_BLOCK
    x = F.pad(t.float(), (0, pad)).reshape(*t.shape[:-1], (n + pad) // Q8_0_BLOCK, Q8_0_BLOCK)
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).half().float()               # [..., blocks, 1]
    q = torch.where(scale > 0, torch.round(x / scale.clamp_min(1e-30)).clamp(-127, 127), 0.0)
    return (q * scale).reshape(*t.shape[:-1], n + pad)[..., :n]


def per_channel_fake_quant(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> what --quantization int8 stores (per-output-channel int8), dequantized, float32."""
    q, scale = quantize_per_channel(weight)
    return q.float() * scale[:, None]


class SimulatedInt8Weight(PackedWeight):
    """A weight [out, in] held dequantized in float32; calling it is F.linear in float32 on the
    (optionally fake-quantized) input, returned in the input's dtype."""

    def __init__(self, weight: torch.Tensor, scheme: str) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown int8 scheme {scheme!r}; expected one of {SCHEMES}")
        self.scheme = scheme
        self.weight = per_channel_fake_quant(weight) if scheme == "weight-only" else q8_0_fake_quant(weight)
        self.out_features, self.nbytes = self.weight.shape[0], self.weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # [..., in] -> [..., out]
        x32 = q8_0_fake_quant(x) if self.scheme == "q8_0" else x.float()
        return F.linear(x32, self.weight).to(x.dtype)


def load_simulated(model_dir: Path, dtype: torch.dtype, scheme: str, **kwargs) -> torch.nn.Module:
    """The model as --quantization int8 would load it, each int8 weight replaced by the scheme's
    simulation."""
    def pack(weight: torch.Tensor, fmt) -> PackedWeight:
        if not fmt.is_int8:
            return real_pack(weight, fmt)
        return SimulatedInt8Weight(weight, scheme)

    real_pack = linear_mod.pack_weight
    with ExitStack() as stack:
        for module in (linear_mod, experts_mod):
            stack.enter_context(mock.patch.object(module, "pack_weight", pack))
        return load_model(model_dir, dtype, device="cpu", progress=False, quantization="int8", **kwargs)
