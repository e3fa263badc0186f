"""Python faces of the native kernels (native.py): shape and layout checks, output allocation,
then one ctypes call. Callers first ask native.supports(...) and otherwise use PyTorch ops.

Legend: T tokens, B decode sequences, Lmax longest context, NH query heads, NKV key/value heads,
D head dim, S cache slots, H hidden, P positions in the rotary tables.
"""

from __future__ import annotations

import torch

from moeserve.kernels.native import library


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"native kernel: {what}")


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, starts: torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, NH, D]; k_flat, v_flat [S, NKV, D] (contiguous); slots [B, Lmax] int64; lens [B]
    int64; starts [B] int64 first attended position or None; sinks [NH] float32 or None
    -> [B, NH, D] in q's dtype."""
    b, nh, d = q.shape
    nkv = k_flat.shape[1]
    _need(k_flat.is_contiguous() and v_flat.is_contiguous() and k_flat.shape == v_flat.shape, "k/v cache layout")
    _need(k_flat.shape[2] == d and nh % nkv == 0, "head shapes")
    _need(slots.dtype == lens.dtype == torch.int64 and slots.is_contiguous() and slots.shape[0] == b, "slots")
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    starts = None if starts is None else starts.contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    out = torch.empty(b, nh, d, dtype=q.dtype)
    library().fn("decode_attention", q.dtype)(
        q.data_ptr(), q.stride(0), k_flat.data_ptr(), v_flat.data_ptr(), slots.data_ptr(), slots.shape[1],
        lens.contiguous().data_ptr(), _ptr(starts), _ptr(sinks), scale, b, nh, nkv, d, out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (rows may be strided), weight [H] in x's dtype -> weight * rms_normed(x) [T, H]."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h) if x.dim() != 2 else x
    _need(x2.stride(1) == 1 and weight.is_contiguous() and weight.shape == (h,), "rms_norm layout")
    out = torch.empty(x2.shape, dtype=x.dtype)
    library().fn("rms_norm", x.dtype)(x2.data_ptr(), x2.stride(0), weight.data_ptr(), eps, x2.shape[0], h,
                                      out.data_ptr())
    return out.view(x.shape)


def rope_write_cache(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                     k_flat: torch.Tensor, v_flat: torch.Tensor) -> None:
    """Neox rotary on qk [T, NH + NKV, Dh] in place (the first `rot` dims of each head, cos/sin
    [P, rot] float32), then keys and v [T, NKV, Dh] written to rows slot_mapping [T] of
    k_flat / v_flat [S, NKV, Dh]."""
    t, heads, dh = qk.shape
    nkv = heads - num_heads
    rot = cos.shape[1]
    _need(qk.stride(2) == 1 and qk.stride(1) == dh and v.stride(2) == 1 and v.stride(1) == dh, "qk/v layout")
    _need(v.shape == (t, nkv, dh) and k_flat.shape[1:] == (nkv, dh) and k_flat.is_contiguous()
          and v_flat.is_contiguous(), "cache layout")
    _need(cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
          and rot % 2 == 0 and rot <= dh, "rotary tables")
    _need(positions.dtype == slot_mapping.dtype == torch.int64, "index dtypes")
    library().fn("rope_write_cache", qk.dtype)(
        qk.data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(), rot,
        positions.contiguous().data_ptr(), slot_mapping.contiguous().data_ptr(), t, num_heads, nkv, dh,
        k_flat.data_ptr(), v_flat.data_ptr())
