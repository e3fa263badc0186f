"""The native CPU kernels (moeserve/kernels) against the PyTorch ops they replace, built for this
CPU (-march=native: the AVX-512 loops where it has them) and for a plain AVX2 CPU (x86-64-v3:
the portable loops), so both code paths are checked on any x86 machine that runs AVX2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels import native, ops
from moeserve.layers.attention import sink_attention
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding
from moeserve.models.config import RopeConfig

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler / not x86-64 Linux")


@pytest.fixture(scope="module", params=["native", "x86-64-v3"])
def kernels(request, tmp_path_factory):
    """ops.* run on the library built for this -march."""
    if request.param == "native":
        lib = native.library()
    else:
        if "avx2" not in native.cpu_flags():
            pytest.skip("this CPU cannot run AVX2 code")
        path = tmp_path_factory.mktemp("kernels") / "avx2.so"
        native.build(native._compiler(), path, march=request.param)
        lib = native.NativeKernels(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "library", lambda: lib)
        yield request.param


def _paged_context(batch: int, max_len: int, slots_total: int, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Lmax] slots laid out in shuffled blocks as the block manager hands them out, and [B] lens."""
    blocks = torch.randperm(slots_total // block)[: batch * -(-max_len // block)].view(batch, -1, 1)
    slots = (blocks * block + torch.arange(block)).view(batch, -1)[:, :max_len].contiguous()
    lens = torch.randint(1, max_len + 1, (batch,))
    lens[0] = max_len
    return slots, lens


def _reference_decode(q, k_flat, v_flat, slots, lens, scale, starts=None, sinks=None):
    """Gather + masked attention, float32: [B, NH, D]."""
    b, lmax = slots.shape
    nkv, d = k_flat.shape[1:]
    nh = q.shape[1]
    keys = k_flat.float()[slots].transpose(1, 2).repeat_interleave(nh // nkv, 1)   # [B, NH, L, D]
    values = v_flat.float()[slots].transpose(1, 2).repeat_interleave(nh // nkv, 1)
    cols = torch.arange(lmax)
    mask = cols[None] < lens[:, None]
    if starts is not None:
        mask &= cols[None] >= starts[:, None]
    mask = mask[:, None, None, :]
    if sinks is not None:
        return sink_attention(q.float()[:, :, None], keys, values, mask, sinks, scale)[:, :, 0]
    return F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=mask, scale=scale)[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,max_len,nh,nkv,d", [(1, 1, 4, 4, 64), (1, 200, 16, 4, 64), (5, 300, 8, 2, 128),
                                                   (3, 37, 6, 2, 24)])
def test_decode_attention_matches_masked_attention(kernels, dtype, batch, max_len, nh, nkv, d):
    torch.manual_seed(0)
    k_flat, v_flat = torch.randn(2, 4096, nkv, d).to(dtype)
    slots, lens = _paged_context(batch, max_len, 4096)
    qkv = torch.randn(batch, nh + 2 * nkv, d).to(dtype)
    q = qkv[:, :nh]                                           # strided rows, as the engine passes them
    out = ops.decode_attention(q, k_flat, v_flat, slots, lens, 0.3)
    ref = _reference_decode(q, k_flat, v_flat, slots, lens, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == (batch, nh, d)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_window_and_sinks(kernels, dtype):
    torch.manual_seed(1)
    k_flat, v_flat = torch.randn(2, 2048, 2, 64).to(dtype)
    slots, lens = _paged_context(4, 150, 2048)
    q = torch.randn(4, 8, 64).to(dtype)
    starts = (lens - 20).clamp(min=0)
    sinks = torch.randn(8) * 3
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for kwargs in ({"starts": starts}, {"sinks": sinks}, {"starts": starts, "sinks": sinks}):
        out = ops.decode_attention(q, k_flat, v_flat, slots, lens, 0.125, **kwargs)
        ref = _reference_decode(q, k_flat, v_flat, slots, lens, 0.125, **kwargs)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 47, 32000])
def test_argmax_matches_torch(kernels, dtype, n):
    """First index of the largest value; ties, a NaN anywhere (torch counts it largest), rows of
    -inf, +inf, strided rows."""
    torch.manual_seed(n)
    x = torch.randn(9, n + 3).to(dtype)[:, 3:]                   # rows n + 3 apart
    x[1] = x[1].mul(2).round().clamp(max=1)                     # many ties at the maximum
    x[2] = float("-inf")
    x[3, n // 2] = float("nan")
    x[4, -1] = float("nan")
    x[4, 0] = float("inf")
    x[5, n // 3] = float("inf")
    x[6] = 0.0
    x[7, 0] = float("nan")
    assert torch.equal(ops.argmax(x), x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_module(kernels, dtype):
    torch.manual_seed(2)
    norm = RMSNorm(1000, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(1000))
    x = torch.randn(7, 1200).to(dtype)[:, 100:1100] * 5      # strided rows
    out = ops.rms_norm(x, norm.weight, 1e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "supports", lambda *t: False)
        ref = norm(x)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:   # the sum of squares may differ in its last float32 bit: at most a rare 1-ulp flip
        assert (out != ref).float().mean() < 0.01
        torch.testing.assert_close(out.float(), ref.float(), atol=0.0, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [64, 32])     # 32: partial rotary (GLM-4.5, MiniMax-M2)
def test_rope_write_cache_matches_rotary_and_index_copy(kernels, dtype, rot_dim):
    torch.manual_seed(3)
    nh, nkv, dh, t = 8, 2, 64, 5
    rotary = RotaryEmbedding(RopeConfig(type="yarn", theta=1e4, factor=4.0, original_max_position=64),
                             rot_dim, 512)
    qkv = torch.randn(t, (nh + 2 * nkv) * dh).to(dtype) * 3
    qk = qkv[:, : (nh + nkv) * dh].view(t, nh + nkv, dh)
    v = qkv[:, (nh + nkv) * dh:].view(t, nkv, dh)
    positions = torch.tensor([0, 5, 77, 300, 511])
    slot_mapping = torch.tensor([3, 17, 40, 2, 63])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "supports", lambda *x: False)
        ref_qk = rotary(positions, qk.clone())
    ref_k, ref_v = torch.zeros(2, 64, nkv, dh, dtype=dtype)
    ref_k.index_copy_(0, slot_mapping, ref_qk[:, nh:])
    ref_v.index_copy_(0, slot_mapping, v)
    k_flat, v_flat = torch.zeros(2, 64, nkv, dh, dtype=dtype)
    ops.rope_write_cache(qk, v, rotary.cos, rotary.sin, positions, slot_mapping, nh, k_flat, v_flat)
    assert torch.equal(qk, ref_qk)          # elementwise, rounded as PyTorch rounds: bit for bit
    assert torch.equal(k_flat, ref_k) and torch.equal(v_flat, ref_v)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MOESERVE_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.supports(torch.ones(2))
    finally:
        monkeypatch.delenv("MOESERVE_NATIVE_KERNELS")
        native.library.cache_clear()
    assert native.library() is not None


def test_build_failure_is_reported(tmp_path):
    bad = tmp_path / "x.so"
    with pytest.raises(RuntimeError, match="failed"):
        native.build(native._compiler(), bad, march="no-such-cpu")
    assert not bad.exists() and not list(tmp_path.iterdir())    # no half-written library left


# --- routed experts ---------------------------------------------------------------------------

def test_sort_routes_matches_stable_argsort(kernels):
    torch.manual_seed(4)
    ids = torch.randint(0, 16, (37, 3))
    kept = torch.rand(37, 3) > 0.2
    first, num_local = 4, 8                                      # this rank holds experts 4..11
    order, sizes = ops.sort_routes(ids, kept, first, num_local)
    local = ids.flatten() - first
    is_local = (local >= 0) & (local < num_local) & kept.flatten()
    local = torch.where(is_local, local, num_local)
    assert torch.equal(order, local.argsort(stable=True))
    assert sizes == torch.bincount(local, minlength=num_local + 1).tolist()
    order, sizes = ops.sort_routes(ids, None, 0, 16)             # every expert here, nothing dropped
    assert torch.equal(order, ids.flatten().argsort(stable=True)) and sizes[-1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_swiglu_combine_match_torch(kernels, dtype):
    torch.manual_seed(5)
    t, k, h, inter = 9, 2, 48, 40
    x = torch.randn(t, h + 8).to(dtype)[:, :h]                   # strided rows
    order = torch.randperm(t * k)
    routed = t * k - 3                                           # the last 3 sorted routes computed elsewhere
    for out_dtype in {dtype, torch.float32}:
        rows = ops.gather_rows(x, order, k, routed, out_dtype)
        assert torch.equal(rows, x[order[:routed] // k].to(out_dtype))
    gate_up = (torch.randn(routed, 2 * inter) * 3).to(dtype)
    ref = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
    got = ops.swiglu(gate_up)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    else:   # silu rounded to bf16 first: at most a rare last-bit difference
        assert (got != ref).float().mean() < 0.01
        torch.testing.assert_close(got.float(), ref.float(), atol=0.0, rtol=2 ** -7)
    y = torch.randn(routed, h).to(dtype)
    weights = torch.rand(t, k)
    padded = torch.cat((y.float(), torch.zeros(3, h)))            # routes not computed here count as zero
    expected = torch.empty_like(padded).index_copy_(0, order, padded * weights.flatten()[order, None])
    expected = expected.view(t, k, h).sum(1).to(dtype)
    assert torch.equal(ops.moe_combine(y, order, weights, t, k, dtype), expected)
    unweighted = torch.empty_like(padded).index_copy_(0, order, padded).view(t, k, h).sum(1).to(dtype)
    assert torch.equal(ops.moe_combine(y, order, None, t, k, dtype), unweighted)


# --- int8 linear ------------------------------------------------------------------------------

def _packed_reference(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] int8 -> the [N/16][K/4][16][4] layout (zero padded) and per-channel sums, in torch."""
    n, k = q.shape
    n16, k4 = -(-n // 16) * 16, -(-k // 4) * 4
    padded = F.pad(q, (0, k4 - k, 0, n16 - n))                               # [N16, K4]
    packed = padded.view(n16 // 16, 16, k4 // 4, 4).permute(0, 2, 1, 3).flatten()
    return packed, padded.sum(1, dtype=torch.int32)


def _int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """The kernel's arithmetic in float64: per-row symmetric s8 activations (float32 scale and
    rounding, as the kernel), exact integer sums, both scales, bias."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True) / 127
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    xq = torch.round(xf * (1 / x_scale)).clamp(-127, 127)
    y = (xq.double() @ q.double().t()) * (x_scale * scale).double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16, 17, 70])   # one pass up to 16 rows, then passes of 8
@pytest.mark.parametrize("n,k", [(64, 256), (50, 37)])          # 50 x 37: both padded (N to 16, K to 4)
def test_int8_linear_matches_integer_reference(kernels, dtype, rows, n, k):
    from moeserve.layers.linear import quantize_per_channel
    torch.manual_seed(rows + n)
    w = torch.randn(n, k)
    q, scale = quantize_per_channel(w)
    packed, wsum, _ = ops.int8_quantize_pack(w)
    x = (torch.randn(rows, k) * 2 + 0.5).to(dtype)
    x[0] = 0.0                                                    # an all-zero row
    bias = torch.randn(n)
    y = ops.int8_linear(x, packed, wsum, scale, bias, n)
    assert y.dtype == dtype and y.shape == (rows, n)
    ref = _int8_reference(x, q, scale, bias)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    # A row's result does not depend on the rows beside it.
    torch.testing.assert_close(ops.int8_linear(x[-1:], packed, wsum, scale, bias, n), y[-1:], atol=0, rtol=0)


def test_packed_layout():
    q = torch.arange(-60, 60, dtype=torch.int8).view(20, 6)       # N = 20 -> 32, K = 6 -> 8
    packed, wsum = _packed_reference(q)
    assert packed.numel() == 32 * 8 and wsum.tolist()[:20] == q.sum(1).tolist() and wsum[20:].eq(0).all()
    blocks = packed.view(2, 2, 16, 4)                             # [N/16][K/4][16][4]
    assert blocks[1, 0, 3].tolist() == q[19, 0:4].tolist()
    assert blocks[0, 1, 2].tolist() == q[2, 4:6].tolist() + [0, 0]
    assert blocks[1, 1, 5].eq(0).all()                            # past N: zero weights


# --- bf16 linear ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 5, 8, 70])
@pytest.mark.parametrize("n,k", [(64, 256), (50, 37)])          # 50 x 37: N padded to 16, K to 2
def test_bf16_linear_matches_float64(kernels, rows, n, k):
    torch.manual_seed(rows + k)
    w = (torch.randn(n, k) * 0.1).bfloat16()
    x = torch.randn(rows, k + 3).bfloat16()[:, :k]                # strided rows
    bias = torch.randn(n)
    y = ops.bf16_linear(x, ops.bf16_pack(w), bias, n)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    ref = x.double() @ w.double().t() + bias.double()
    # float32 sums of exact bf16 products, one bf16 rounding of the output
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * k, rtol=2 ** -8)


# --- which kernel the loader picks ------------------------------------------------------------

def test_kernel_choice_follows_the_cpu(monkeypatch):
    from moeserve.layers import linear
    cpu = torch.device("cpu")
    monkeypatch.setattr(linear, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(linear, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    monkeypatch.setattr(linear, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(linear, "cpu_has_amx_int8", lambda: False)
    monkeypatch.setattr(linear, "cpu_has_avx512_vnni", lambda: True)
    assert linear.choose_format(torch.bfloat16, cpu, False) is linear.WeightFormat.NATIVE_BF16
    assert linear.choose_format(torch.bfloat16, cpu, True) is linear.WeightFormat.INT8_NATIVE
    monkeypatch.setattr(linear, "cpu_has_amx_bf16", lambda: True)      # AMX: oneDNN's tiles win prefill
    assert linear.choose_format(torch.bfloat16, cpu, False) is linear.WeightFormat.ONEDNN_BF16
    monkeypatch.setattr(linear, "cpu_has_avx512_vnni", lambda: False)  # AVX2 only: fbgemm
    assert linear.choose_format(torch.bfloat16, cpu, True) is linear.WeightFormat.INT8_FBGEMM
    monkeypatch.setenv("MOESERVE_BF16_KERNEL", "native")
    assert linear.choose_format(torch.bfloat16, cpu, False) is linear.WeightFormat.NATIVE_BF16
    monkeypatch.setenv("MOESERVE_BF16_KERNEL", "mkl")
    with pytest.raises(ValueError, match="MOESERVE_BF16_KERNEL=mkl"):
        linear.choose_format(torch.bfloat16, cpu, False)
    monkeypatch.delenv("MOESERVE_BF16_KERNEL")
    monkeypatch.setattr(native, "library", lambda: None)              # no compiler: the library kernels
    monkeypatch.setattr(linear, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(linear, "cpu_has_avx512_vnni", lambda: True)
    assert linear.choose_format(torch.bfloat16, cpu, False) is linear.WeightFormat.ONEDNN_BF16
    assert linear.choose_format(torch.bfloat16, cpu, True) is linear.WeightFormat.INT8_FBGEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantize_pack_equals_quantize_per_channel_in_the_packed_layout(kernels, dtype):
    from moeserve.layers.linear import quantize_per_channel
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(40, 70, generator=gen) * torch.logspace(-3, 1, 40)[:, None]).to(dtype)
    w[9] = 0.0                                                    # an all-zero row
    packed, wsum, scale = ops.int8_quantize_pack(w)
    q, ref_scale = quantize_per_channel(w)
    ref_packed, ref_wsum = _packed_reference(q)
    assert torch.equal(scale, ref_scale) and torch.equal(packed, ref_packed) and torch.equal(wsum, ref_wsum)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])     # float16: the converting path
def test_native_weights_write_into_a_given_output(dtype):
    from moeserve.layers.linear import NativeBF16Weight, NativeInt8Weight
    torch.manual_seed(7)
    x = torch.randn(5, 40).to(dtype)
    for weight in (NativeInt8Weight(torch.randn(24, 40)), NativeBF16Weight(torch.randn(24, 40))):
        buf = torch.full((9, 24), float("nan"), dtype=dtype)
        got = weight(x, out=buf[2:7])
        assert got.data_ptr() == buf[2:7].data_ptr() and torch.equal(buf[2:7], weight(x))
        assert buf[:2].isnan().all() and buf[7:].isnan().all()         # nothing written outside the rows
        if dtype == torch.bfloat16:                                       # the kernel's own check
            with pytest.raises(ValueError, match="output tensor"):
                weight(x, out=buf[2:6])


# --- one MoE layer through int8 weights ----------------------------------------------------------

def _unfused_moe_int8(x, ids, kept, weights, first, num_local, inter, experts):
    """Experts._forward_native's chain of kernels, one call per step and expert."""
    t, k = ids.shape
    order, sizes = ops.sort_routes(ids, kept, first, num_local)
    routed = t * k - sizes[-1]
    rows = ops.gather_rows(x, order, k, routed, x.dtype)
    gate_up, out, start = [], [], 0
    for e, n in enumerate(sizes[:-1]):
        if n:
            gate_up.append(ops.int8_linear(rows[start:start + n], *experts[e][0], None, 2 * inter))
        start += n
    gate_up = torch.cat(gate_up) if gate_up else rows.new_zeros(0, 1)
    hidden = ops.swiglu(gate_up) if routed else gate_up
    start = 0
    for e, n in enumerate(sizes[:-1]):
        if n:
            out.append(ops.int8_linear(hidden[start:start + n], *experts[e][1], None, x.shape[1]))
        start += n
    y = torch.cat(out) if out else x.new_zeros(0, x.shape[1])
    return ops.moe_combine(y, order, weights, t, k, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,first,num_local,drop", [(1, 2, 0, 6, False), (3, 1, 0, 6, False), (16, 2, 0, 6, False),
                                                           (40, 4, 0, 6, True), (9, 2, 2, 3, False), (24, 2, 1, 4, True)])
def test_moe_int8_is_the_unfused_chain_bit_for_bit(kernels, dtype, tokens, k, first, num_local, drop):
    torch.manual_seed(tokens * 10 + k)
    h, inter, num_experts = 50, 40, 6                              # H and 2I not multiples of 16, K padded to 4
    experts = [(ops.int8_quantize_pack(torch.randn(2 * inter, h) * 0.2),
                ops.int8_quantize_pack(torch.randn(h, inter) * 0.2)) for _ in range(num_local)]
    x = torch.randn(tokens, h + 6).to(dtype)[:, 3:3 + h]            # strided rows
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)])
    if tokens >= 16:
        ids[: tokens // 2] = ids[0]                                # one expert gets > 16 rows
    weights = torch.rand(tokens, k)
    kept = torch.rand(tokens, k) > 0.3 if drop else None
    tables = [torch.tensor([[w[i][j].data_ptr() for w in experts] for j in range(3)]) for i in range(2)]
    got = ops.moe_int8(x, ids, kept, weights, first, num_local, inter, *tables)
    assert torch.equal(got, _unfused_moe_int8(x, ids, kept, weights, first, num_local, inter, experts))


def _unfused_moe_bf16(x, ids, kept, weights, first, num_local, inter, experts):
    t, k = ids.shape
    order, sizes = ops.sort_routes(ids, kept, first, num_local)
    routed = t * k - sizes[-1]
    rows = ops.gather_rows(x, order, k, routed, x.dtype)
    starts = [sum(sizes[:e]) for e in range(num_local)]
    chunks = [(e, starts[e], starts[e] + n) for e, n in enumerate(sizes[:-1]) if n]
    gate_up = torch.cat([ops.bf16_linear(rows[a:b], experts[e][0], None, 2 * inter) for e, a, b in chunks] or [rows[:0, :1]])
    hidden = ops.swiglu(gate_up) if routed else gate_up
    y = torch.cat([ops.bf16_linear(hidden[a:b], experts[e][1], None, x.shape[1]) for e, a, b in chunks]
                  or [x.new_zeros(0, x.shape[1])])
    return ops.moe_combine(y, order, weights, t, k, x.dtype)


@pytest.mark.parametrize("tokens,k,first,num_local,drop", [(1, 2, 0, 6, False), (16, 2, 0, 6, False),
                                                           (40, 4, 0, 6, True), (24, 2, 1, 4, True)])
def test_moe_bf16_is_the_unfused_chain_bit_for_bit(kernels, tokens, k, first, num_local, drop):
    torch.manual_seed(tokens * 10 + k)
    h, inter, num_experts = 50, 40, 6
    experts = [(ops.bf16_pack(torch.randn(2 * inter, h) * 0.2), ops.bf16_pack(torch.randn(h, inter) * 0.2))
               for _ in range(num_local)]
    x = torch.randn(tokens, h + 6).bfloat16()[:, 3:3 + h]
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)])
    if tokens >= 16:
        ids[: tokens // 2] = ids[0]                                # one expert gets > 8 rows
    weights = torch.rand(tokens, k)
    kept = torch.rand(tokens, k) > 0.3 if drop else None
    tables = [torch.tensor([w[i].data_ptr() for w in experts]) for i in range(2)]
    got = ops.moe_bf16(x, ids, kept, weights, first, num_local, inter, *tables)
    assert torch.equal(got, _unfused_moe_bf16(x, ids, kept, weights, first, num_local, inter, experts))
