"""Benchmark moeserve's MoELayer against transformers' Mixtral block and a dense GShard dispatch.

    python scripts/bench_moe_layer.py [--tokens 1,16,256,4096] [--dtypes float32,bfloat16]
                                      [--max-bf16-tokens 256] [--json OUT]

Legend: T tokens, E experts, K top-k, H hidden, I expert intermediate, C expert capacity.

Three implementations of one layer, all holding the same weights:
  moeserve  moeserve.layers.moe.MoELayer, dropless routing (sort routes by expert, F.grouped_mm).
  HF        transformers' MixtralSparseMoeBlock as a standalone module (config
            `_experts_implementation` "eager": a Python loop over the experts that were hit).
            `HF-gmm` is the same block with "grouped_mm", the implementation that
            `from_pretrained` picks by default in transformers v5.
  dense     GShard / DeepSpeed-MoE one-hot dispatch and combine: [T, E, C] tensors and
            einsums, capacity C = ceil(T * K / E * capacity_factor); routes past an expert's
            capacity are dropped (first choices placed before second choices, as in GShard top-2;
            no min_capacity floor).

Outputs are checked against moeserve's before timing: HF must match on every token; dense must
match exactly with a capacity that drops nothing, and at the timed capacity on every token that
lost no route. Timing: a warmup round, then rounds that call every implementation in turn (so
load from other processes falls on all of them alike) until the per-case budget is spent; the
median is reported, the minimum kept in the JSON. Wall clock by default; on a shared machine
`--threads 1 --clock cpu` (process CPU time) gives numbers that other processes barely move.
Without bf16 instructions (AVX2 only) bf16 GEMMs are emulated and slow: bf16 cases above
--max-bf16-tokens are skipped, and the bf16 F.linear rate is printed at start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.moe import MoELayer, MoEShape
from moeserve.layers.routing import RoutingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# allclose tolerances, relative to the reference output's max |value| for atol.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,16,256,4096", help="comma-separated T values")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--max-bf16-tokens", type=int, default=256,
                   help="skip bfloat16 cases with more tokens (bf16 matmul may be emulated)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="dense baseline capacity factor for timing (GShard/DeepSpeed default 1.0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, robust to other processes on the cores but only "
                        "a latency with --threads 1 (with more threads it sums them)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed repeats per case")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the checking call")
    p.add_argument("--flush-mb", type=int, default=64,
                   help="read this many MB before every timed call so expert weights come from DRAM, "
                        "as in a whole model whose layers do not fit in cache (0: keep caches warm)")
    p.add_argument("--no-hf-grouped", action="store_true", help="skip the HF grouped_mm column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="write results to this file")
    args = p.parse_args(argv)
    tokens = [t for t in args.tokens.split(",") if t]
    if not tokens or not all(t.isdigit() and int(t) > 0 for t in tokens):
        p.error(f"--tokens must be comma-separated positive ints, got {args.tokens!r}")
    args.tokens = [int(t) for t in tokens]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes must be from {sorted(DTYPES)}, got {bad or 'nothing'}")
    return args


# ---------------------------------------------------------------------------------------------
# The three implementations
# ---------------------------------------------------------------------------------------------

def build_moeserve(args: argparse.Namespace, dtype: torch.dtype) -> MoELayer:
    shape = MoEShape(hidden=args.hidden, intermediate=args.intermediate,
                     routing=RoutingConfig(num_experts=args.experts, top_k=args.top_k,
                                           capacity_factor=None))   # dropless, as Mixtral
    layer = MoELayer(shape)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        # Router std 0.02 gives logits of std ~0.6 for unit-variance x: spread, uneven routing.
        layer.router.weight.normal_(0.0, 0.02, generator=g)
        layer.experts.w13.normal_(0.0, args.hidden ** -0.5, generator=g)        # [E, 2I, H]
        layer.experts.w2.normal_(0.0, args.intermediate ** -0.5, generator=g)   # [E, H, I]
    return layer.to(dtype).eval()


def build_hf(layer: MoELayer, args: argparse.Namespace, impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        experts_implementation=impl)
    block = MixtralSparseMoeBlock(cfg).to(layer.router.weight.dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)                  # [E, H]
        block.experts.gate_up_proj.copy_(layer.experts.w13)           # [E, 2I, H] gate rows, up rows
        block.experts.down_proj.copy_(layer.experts.w2)               # [E, H, I]
    return block


class DenseDispatchMoE(nn.Module):
    """GShard one-hot dispatch / combine (Lepikhin et al. 2020, Alg. 1; DeepSpeed-MoE top2gating).

    Routing math (softmax, top-k, renormalise over the top-k) matches Mixtral so the outputs
    compare; GShard's capacity and position rules are kept: each expert takes at most C routes,
    positions counted in token order, all first choices before any second choice.
    """

    def __init__(self, layer: MoELayer, top_k: int, capacity_factor: float | None) -> None:
        super().__init__()
        self.router_w = layer.router.weight       # [E, H]  shared, not copied
        self.w13 = layer.experts.w13              # [E, 2I, H]
        self.w2 = layer.experts.w2                # [E, H, I]
        self.top_k = top_k
        self.capacity_factor = capacity_factor    # None: the smallest capacity that drops nothing
        self.last_kept: torch.Tensor | None = None  # [T] bool: token kept all its routes

    def capacity(self, num_tokens: int, expert_ids: torch.Tensor) -> int:
        num_experts = self.w13.shape[0]
        if self.capacity_factor is None:
            return int(torch.bincount(expert_ids.flatten(), minlength=num_experts).max())
        return math.ceil(num_tokens * self.top_k / num_experts * self.capacity_factor)

    def combine_weights(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, H] -> combine [T, E, C] float32: route weight at (token, expert, slot), else 0
        num_experts = self.w13.shape[0]
        probs = F.linear(x, self.router_w).float().softmax(-1)                   # [T, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)                     # [T, K]
        weights = weights / weights.sum(-1, keepdim=True)
        cap = self.capacity(x.shape[0], expert_ids)
        masks = F.one_hot(expert_ids, num_experts).permute(1, 0, 2)              # [K, T, E]
        # Slot of each route in its expert: running count in token order, choice j after all
        # routes of choices < j (GShard: locations2 += sum(mask1)).
        flat = masks.reshape(-1, num_experts)                                    # [K*T, E]
        slots = (flat.cumsum(0) - 1).reshape(masks.shape)                        # [K, T, E]
        keep = masks.bool() & (slots < cap)                                      # [K, T, E]
        slot_of_route = (slots * keep).sum(-1)                                   # [K, T]
        kept_route = keep.any(-1)                                                # [K, T]
        self.last_kept = kept_route.all(0)
        slot_onehot = F.one_hot(slot_of_route, cap) * kept_route[..., None]      # [K, T, C]
        gated = keep * weights.t()[..., None]                                    # [K, T, E]
        return torch.einsum("kte,ktc->tec", gated, slot_onehot.float())          # [T, E, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, H] -> [T, H]
        combine = self.combine_weights(x).to(x.dtype)                            # [T, E, C]
        dispatch = (combine != 0).to(x.dtype)                                    # [T, E, C]
        expert_in = torch.einsum("tec,th->ech", dispatch, x)                     # [E, C, H]
        gate_up = torch.bmm(expert_in, self.w13.transpose(1, 2))                 # [E, C, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        expert_out = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))       # [E, C, H]
        return torch.einsum("tec,ech->th", combine, expert_out)                  # [T, H]


# ---------------------------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------------------------

def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
          rows: torch.Tensor | None = None) -> tuple[bool, float]:
    out, ref = out.float(), ref.float()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    if ref.numel() == 0:
        return True, 0.0
    tol = TOLERANCE[dtype]
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item() / max(scale, 1e-12)
    return torch.allclose(out, ref, rtol=tol, atol=tol * scale), err


def time_interleaved(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Round-robin over the implementations so machine noise (other processes on these 2 cores)
    hits all of them alike; stop when the budget is spent and every one has min_repeats samples.
    A single call longer than the budget is timed once."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # At T = 1 one call touches 2 experts (25 MB in bf16): without this they would stay in a
    # 32 MB L3 between calls, which no multi-layer model enjoys.
    flush = torch.ones(args.flush_mb * 2 ** 18) if args.flush_mb else None   # float32: 4 B each
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for rnd in range(args.max_repeats):
        for name, fn in fns.items():
            if flush is not None:
                flush.sum()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
        spent = time.perf_counter() - start
        if spent >= args.budget and (rnd + 1 >= args.min_repeats or spent >= args.budget * (rnd + 1)):
            break
    return times


@dataclass
class CaseResult:
    dtype: str
    tokens: int
    skipped: str | None = None
    ms: dict = field(default_factory=dict)        # impl -> median ms
    min_ms: dict = field(default_factory=dict)    # impl -> fastest ms
    repeats: dict = field(default_factory=dict)   # impl -> repeats timed
    max_rel_err: dict = field(default_factory=dict)
    dense_capacity: int = 0
    dense_dropped_tokens: float = 0.0             # tokens that lost a route at the timed capacity


def check_outputs(impls: dict[str, Callable], dense: DenseDispatchMoE, x: torch.Tensor,
                  res: CaseResult, args: argparse.Namespace) -> None:
    """Every implementation against moeserve; exits naming the one that disagrees."""
    dtype = DTYPES[res.dtype]
    ref = impls["moeserve"](x)
    checks = {name: (fn(x), None) for name, fn in impls.items() if name not in ("moeserve", "dense")}
    dense.capacity_factor = None                       # drop nothing: must match on every token
    checks["dense(no-drop)"] = (dense(x), None)
    dense.capacity_factor = args.capacity_factor       # timed capacity: match where nothing dropped
    checks["dense(kept tokens)"] = (dense(x), dense.last_kept)
    res.dense_dropped_tokens = 1.0 - float(dense.last_kept.float().mean())
    res.dense_capacity = math.ceil(x.shape[0] * args.top_k / args.experts * args.capacity_factor)
    for name, (out, rows) in checks.items():
        ok, err = close(out, ref, dtype, rows)
        res.max_rel_err[name] = err
        if not ok:
            raise SystemExit(f"{res.dtype} T={x.shape[0]}: {name} disagrees with moeserve "
                             f"(max |diff| / max |ref| = {err:.3g})")


def run_case(impls: dict[str, Callable], dense: DenseDispatchMoE, x: torch.Tensor,
             dtype_name: str, args: argparse.Namespace) -> CaseResult:
    res = CaseResult(dtype=dtype_name, tokens=x.shape[0])
    check_outputs(impls, dense, x, res, args)
    times = time_interleaved({name: (lambda fn=fn: fn(x)) for name, fn in impls.items()}, args)
    for name, ts in times.items():
        res.ms[name] = statistics.median(ts) * 1e3
        res.min_ms[name] = min(ts) * 1e3
        res.repeats[name] = len(ts)
    return res


def matmul_gflops(dtype: torch.dtype, n: int, linear: bool) -> float:
    """n^3 matmul rate. linear: x @ W.T with W [N, K] row-major (F.linear, the layout MoE layers
    use); else a @ b. On CPUs without bf16 instructions the two differ ~8x for bfloat16."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    fn = (lambda: F.linear(a, b)) if linear else (lambda: a @ b)
    fn()
    t0, reps = time.perf_counter(), 0
    while reps < 2 or time.perf_counter() - t0 < 0.5:
        fn()
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def ratio(res: CaseResult, name: str) -> str:
    if name not in res.ms or "moeserve" not in res.ms:
        return "-"
    return f"{res.ms[name] / res.ms['moeserve']:.2f}x"


def print_table(results: list[CaseResult]) -> None:
    cols = ["dtype", "T", "moeserve ms", "HF ms", "HF-gmm ms", "dense ms",
            "HF/moe", "HF-gmm/moe", "dense/moe", "dense drop"]
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.dtype, str(r.tokens), r.skipped] + [""] * (len(cols) - 3))
            continue
        ms = [f"{r.ms[n]:.3f}" if n in r.ms else "-" for n in ("moeserve", "HF", "HF-gmm", "dense")]
        rows.append([r.dtype, str(r.tokens), *ms, ratio(r, "HF"), ratio(r, "HF-gmm"),
                     ratio(r, "dense"), f"{r.dense_dropped_tokens:.1%}"])
    widths = [max(len(c), *(len(row[i]) for row in rows if not _is_skip(row))) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        if _is_skip(row):
            print(f"| {row[0].ljust(widths[0])} | {row[1].ljust(widths[1])} | {row[2]} |")
        else:
            print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    print("(dense drop: fraction of tokens that lost at least one route at the timed capacity)")


def _is_skip(row: list[str]) -> bool:
    return row[2].startswith("skipped")


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, {args.clock} clock, load average {os.getloadavg()[0]:.2f}"
          + (" (other processes on these cores inflate wall-clock timings)" if args.clock == "wall" else ""))
    fp32_gflops = matmul_gflops(torch.float32, 1024, linear=True)
    bf16_gflops = matmul_gflops(torch.bfloat16, 256, linear=True)
    bf16_ab_gflops = matmul_gflops(torch.bfloat16, 256, linear=False)
    print(f"matmul GFLOP/s: float32 F.linear 1024^3 {fp32_gflops:.1f}; bfloat16 F.linear 256^3 "
          f"{bf16_gflops:.2f}, a @ b 256^3 {bf16_ab_gflops:.2f} (native bf16 instructions: {native_bf16()})")
    print(f"shape: H={args.hidden} I={args.intermediate} E={args.experts} K={args.top_k}, "
          f"dense capacity factor {args.capacity_factor}")
    results: list[CaseResult] = []
    with torch.inference_mode():
        for dtype_name in args.dtypes:
            results += run_dtype(dtype_name, args, bf16_gflops)
    print()
    print_table(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "load_average": os.getloadavg(),
                       "fp32_gflops": fp32_gflops, "bf16_gflops": bf16_gflops,
                       "bf16_ab_gflops": bf16_ab_gflops, "native_bf16": native_bf16(),
                       "results": [asdict(r) for r in results]}, f, indent=2)
        print(f"wrote {args.json_out}")
    return 0


def run_dtype(dtype_name: str, args: argparse.Namespace, bf16_gflops: float) -> list[CaseResult]:
    dtype = DTYPES[dtype_name]
    layer = build_moeserve(args, dtype)
    dense = DenseDispatchMoE(layer, args.top_k, args.capacity_factor)
    impls: dict[str, Callable] = {
        "moeserve": lambda x: layer(x)[0],
        "HF": _hf_call(build_hf(layer, args, "eager")),
    }
    if not args.no_hf_grouped:
        impls["HF-gmm"] = _hf_call(build_hf(layer, args, "grouped_mm"))
    impls["dense"] = dense
    out = []
    for t in args.tokens:
        if dtype == torch.bfloat16 and t > args.max_bf16_tokens:
            why = (f"bf16 emulated on this CPU: {bf16_gflops:.2f} GFLOP/s" if not native_bf16()
                   else f"--max-bf16-tokens {args.max_bf16_tokens}")
            out.append(CaseResult(dtype_name, t, skipped=f"skipped ({why})"))
            continue
        x = torch.randn(t, args.hidden, generator=torch.Generator().manual_seed(args.seed + t)).to(dtype)
        t0 = time.perf_counter()
        res = run_case(impls, dense, x, dtype_name, args)
        print(f"{dtype_name} T={t}: " + ", ".join(
            f"{k} {v:.3f} ms (min {res.min_ms[k]:.3f}, n={res.repeats[k]})" for k, v in res.ms.items())
              + f"  (max rel err {max(res.max_rel_err.values()):.2g}, {time.perf_counter() - t0:.0f} s)",
              flush=True)
        out.append(res)
    return out


def _hf_call(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: block(x[None])[0]


if __name__ == "__main__":
    sys.exit(main())
