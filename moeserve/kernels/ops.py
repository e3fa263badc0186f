"""Python faces of the native kernels (native.py): shape and layout checks, output allocation,
then one ctypes call. Callers first ask native.supports(...) and otherwise use PyTorch ops.

Legend: T tokens, B decode sequences, Lmax longest context, NH query heads, NKV key/value heads,
D head dim, S cache slots, H hidden, P positions in the rotary tables.
"""

from __future__ import annotations

import torch

from moeserve.kernels.arena import huge_page_empty
from moeserve.kernels.native import library


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address, None for no tensor. Only valid while the tensor lives: take it of a
    name that holds the tensor across the call, never of a temporary (x.contiguous().data_ptr()
    may point at freed memory)."""
    return None if t is None else t.data_ptr()


def _output(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh [m, n] output, or the caller's after checking it fits the kernel's writes."""
    if out is None:
        return torch.empty(m, n, dtype=dtype)
    _need(out.shape == (m, n) and out.dtype == dtype and out.is_contiguous(), "output tensor")
    return out


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
    lens = lens.contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    out = torch.empty(b, nh, d, dtype=q.dtype)
    library().fn("decode_attention", q.dtype)(
        q.data_ptr(), q.stride(0), k_flat.data_ptr(), v_flat.data_ptr(), slots.data_ptr(), slots.shape[1],
        lens.data_ptr(), _ptr(starts), _ptr(sinks), scale, b, nh, nkv, d, out.data_ptr())
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] (float32 / bf16, rows may be strided) -> [B] int64, as x.argmax(-1): the first
    largest value's index, or the first NaN's."""
    _need(x.dim() == 2 and x.stride(1) == 1 and 0 < x.shape[1] < 2**31, "argmax layout")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().fn("argmax", x.dtype)(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
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
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    library().fn("rope_write_cache", qk.dtype)(
        qk.data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(), rot,
        positions.data_ptr(), slot_mapping.data_ptr(), t, num_heads, nkv, dh,
        k_flat.data_ptr(), v_flat.data_ptr())


def sort_routes(expert_ids: torch.Tensor, kept: torch.Tensor | None, first: int,
                num_local: int) -> tuple[torch.Tensor, list[int]]:
    """expert_ids [T, K] int64 (kept [T, K] bool or None) -> (order [R] int64: routes grouped
    by local expert, stable, other ranks' and dropped routes last; sizes: num_local + 1 host ints)."""
    ids = expert_ids.contiguous()
    _need(ids.dtype == torch.int64, "expert ids dtype")
    order = torch.empty(ids.numel(), dtype=torch.int64)
    sizes = torch.empty(num_local + 1, dtype=torch.int64)
    kept = None if kept is None else kept.contiguous()
    library().fn("moe_sort_routes")(ids.data_ptr(), _ptr(kept), ids.numel(), first, num_local, order.data_ptr(),
                                    sizes.data_ptr())
    return order, sizes.tolist()


def gather_rows(x: torch.Tensor, order: torch.Tensor, k: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """x [T, H] -> [rows, H] in `dtype` (x's dtype or float32): row i is x[order[i] // k]."""
    _need(x.stride(1) == 1 and dtype in (x.dtype, torch.float32), "gather_rows layout")
    out = torch.empty(rows, x.shape[1], dtype=dtype)
    library().fn("gather_rows", x.dtype)(x.data_ptr(), x.stride(0), order.data_ptr(), rows, k, x.shape[1],
                                         int(dtype == torch.float32), out.data_ptr())
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2I] gate columns then up columns -> silu(gate) * up [n, I]."""
    _need(gate_up.is_contiguous(), "swiglu layout")
    n, two_i = gate_up.shape
    out = torch.empty(n, two_i // 2, dtype=gate_up.dtype)
    library().fn("swiglu", gate_up.dtype)(gate_up.data_ptr(), n, two_i // 2, out.data_ptr())
    return out


def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, tokens: int, k: int,
                dtype: torch.dtype) -> torch.Tensor:
    """y [routed, H] (float32 or bf16) outputs of the first `routed` sorted routes; order [T*K];
    weights [T, K] float32 or None -> [T, H] in `dtype`: each token's weighted sum of its routes."""
    _need(y.is_contiguous() and y.dtype in (torch.float32, torch.bfloat16), "combine input")
    w = None if weights is None else weights.contiguous()
    _need(w is None or w.dtype == torch.float32, "combine weights")
    out = torch.empty(tokens, y.shape[1], dtype=dtype)
    library().fn("moe_combine", dtype)(y.data_ptr(), int(y.dtype == torch.bfloat16), y.shape[0], order.data_ptr(),
                                       _ptr(w), tokens, k, y.shape[1], out.data_ptr())
    return out


def moe_int8(x: torch.Tensor, expert_ids: torch.Tensor, kept: torch.Tensor | None, weights: torch.Tensor,
             first: int, num_local: int, intermediate: int, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One MoE layer's routed experts (SwiGLU, int8 weights) in one call: x [T, H]; expert_ids
    [T, K] int64 global ids (kept [T, K] bool or None); weights [T, K] float32; experts
    first..first+num_local are held here, w13 / w2 [3, num_local] int64 addresses of each
    expert's int8_quantize_pack (packed, wsum, scale) -> [T, H] in x's dtype, bit for bit what
    sort_routes, gather_rows, int8_linear, swiglu, int8_linear and moe_combine give."""
    _need(w13.shape == w2.shape == (3, num_local), "moe_int8 tables")
    return _moe_layer(library().fn("moe_int8", x.dtype), x, expert_ids, kept, weights, first, num_local,
                      intermediate, w13, w2)


def moe_bf16(x: torch.Tensor, expert_ids: torch.Tensor, kept: torch.Tensor | None, weights: torch.Tensor,
             first: int, num_local: int, intermediate: int, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """moe_int8 for bf16_pack's weights: x bf16 [T, H], H and the intermediate size even; w13 / w2
    [num_local] int64 addresses of each expert's packed weight."""
    _need(x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0 and intermediate % 2 == 0, "moe_bf16 shapes")
    _need(w13.shape == w2.shape == (num_local,), "moe_bf16 tables")
    return _moe_layer(library().fn("moe_bf16"), x, expert_ids, kept, weights, first, num_local, intermediate,
                      w13, w2)


def _moe_layer(kernel, x: torch.Tensor, expert_ids: torch.Tensor, kept: torch.Tensor | None,
               weights: torch.Tensor, first: int, num_local: int, intermediate: int, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    t, k = expert_ids.shape
    _need(x.stride(1) == 1 and expert_ids.dtype == torch.int64 and weights.dtype == torch.float32
          and (kept is None or kept.dtype == torch.bool), "MoE layer inputs")
    _need(w13.dtype == w2.dtype == torch.int64 and w13.is_contiguous() and w2.is_contiguous(), "MoE layer tables")
    ids, w = expert_ids.contiguous(), weights.contiguous()
    kept = None if kept is None else kept.contiguous()
    out = torch.empty(t, x.shape[1], dtype=x.dtype)
    kernel(x.data_ptr(), x.stride(0), t, k, ids.data_ptr(), _ptr(kept), w.data_ptr(), first, num_local, x.shape[1],
           intermediate, w13.data_ptr(), w2.data_ptr(), out.data_ptr())
    return out


def int8_quantize_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed [ceil(N/16) * 16 * ceil(K/4) * 4] int8: quantize_per_channel(w)'s
    values in int8_linear's [N/16][K/4][16][4] layout, on huge pages (kernels/arena.py); wsum
    [ceil(N/16) * 16] int32 per-channel sums; scale [N] float32), row by row in C with no float
    temporaries."""
    if w.dtype not in (torch.float32, torch.bfloat16):
        w = w.float()
    w = w.contiguous()
    n, k = w.shape
    n16, k4 = -(-n // 16) * 16, -(-k // 4) * 4
    packed = huge_page_empty(n16 * k4, torch.int8)
    wsum = torch.empty(n16, dtype=torch.int32)
    scale = torch.empty(n, dtype=torch.float32)
    library().fn("int8_quantize_pack", w.dtype)(w.data_ptr(), n, k, packed.data_ptr(), wsum.data_ptr(),
                                                scale.data_ptr())
    return packed, wsum, scale


def int8_linear(x: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float32 / bf16, last dim contiguous) -> [..., N] in x's dtype, through
    int8_quantize_pack's weight with per-channel scales wscale [N] float32 (bias [N] float32 or None);
    activations quantized per row. `out`: a contiguous [M, N] tensor of x's dtype to write into."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = _output(out, m, n, x.dtype)
    library().fn("int8_linear", x.dtype)(x2.data_ptr(), x2.stride(0), m, k, packed.data_ptr(), wsum.data_ptr(),
                                         wscale.data_ptr(), _ptr(bias), n, out.data_ptr())
    return out.view(*x.shape[:-1], n)


def bf16_pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> bf16 [ceil(N/16) * 16 * (K + K % 2)] in bf16_linear's layout, on huge pages."""
    w = w.to(torch.bfloat16).contiguous()
    n, k = w.shape
    packed = huge_page_empty(-(-n // 16) * 16 * (k + k % 2), torch.bfloat16)
    library().fn("bf16_pack")(w.data_ptr(), n, k, packed.data_ptr())
    return packed


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 -> [..., N] bf16 through bf16_pack's weight (bias [N] float32 or None).
    `out`: a contiguous [M, N] bf16 tensor to write into."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1 or k % 2:
        x2 = x2.contiguous() if k % 2 == 0 else torch.nn.functional.pad(x2, (0, 1))
    m = x2.shape[0]
    out = _output(out, m, n, torch.bfloat16)
    library().fn("bf16_linear")(x2.data_ptr(), x2.stride(0), m, k, packed.data_ptr(), _ptr(bias), n, out.data_ptr())
    return out.view(*x.shape[:-1], n)
