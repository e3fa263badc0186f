"""Writes tests/data/deepspeed_gating.pt: inputs and outputs of DeepSpeed-MoE's own gating functions.

tests/layers/test_routing_deepspeed.py checks moeserve's route() against these values. DeepSpeed is
never a moeserve dependency: run this with a separate virtualenv that has it.

    python3 -m venv /tmp/dsvenv
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install torch==2.13.0 deepspeed==0.19.8
    /tmp/dsvenv/bin/python scripts/make_gating_references.py        # [--out PATH]

Every call is deterministic: use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None.
Legend: T tokens, E experts, C capacity.

File layout (torch.load(..., weights_only=True) reads it):
  meta      versions and the command that wrote it
  logits    list of float32 [T, E] router logits; a case names its entry by index
  cases     list of dicts, one per gating call:
              fn "top1gating" | "top2gating" | "topkgating", k, capacity_factor (None: drop_tokens=False),
              min_capacity, drop_policy ("position" for top1/top2gating, which have no such option),
              logits (index), capacity (C of the returned [T, E, C] tensors), l_aux (float),
              exp_counts list of E ints (routes chosen before dropping),
              routes int16 [N]: flat index t * E + e of every (token, expert) in the dispatch mask, ascending,
              weights float32 [N]: the combine weights at those routes, summed over the C slots
              (combine_weights is nonzero exactly where dispatch_mask is, so routes/weights hold both)
  capacity  DeepSpeed's _capacity() on a grid, as the gating functions call it with capacity_factor * k:
              rows int32 [N, 4] (T, E, k, min_capacity), capacity_factor float64 [N], capacity int32 [N]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

SHAPES = {7: (0, 1, 2, 3), 64: (0,), 300: (0,)}       # T -> seeds (T=300 holds most of the bytes)
EXPERTS = (4, 8, 16)
CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
MIN_CAPACITIES = (1, 4)
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "deepspeed_gating.pt"


def gate(logits: torch.Tensor, fn: str, k: int, cf: float | None, min_capacity: int, policy: str):
    """One DeepSpeed gating call with every random option off -> (l_aux, combine [T, E, C], dispatch, counts)."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating
    x = logits.clone()                  # top2gating adds to its logits in place when sampling is on
    drop = cf is not None
    cf = 1.0 if cf is None else cf      # ignored when drop_tokens=False
    if fn == "top1gating":
        return top1gating(x, cf, min_capacity, noisy_gate_policy=None, drop_tokens=drop, use_rts=False)
    if fn == "top2gating":
        return top2gating(x, cf, min_capacity, drop_tokens=drop, top2_2nd_expert_sampling=False)
    return topkgating(x, k, cf, min_capacity, drop_tokens=drop, drop_policy=policy)


def calls_per_logits():
    """(fn, k, capacity_factor, min_capacity, drop_policy) for every logits tensor."""
    for cf, mc in itertools.product(CAPACITY_FACTORS, MIN_CAPACITIES):
        yield "top1gating", 1, cf, mc, "position"
        yield "topkgating", 1, cf, mc, "probs"
        yield "top2gating", 2, cf, mc, "position"
        yield "topkgating", 2, cf, mc, "probs"
        for k in (3, 4):
            yield "topkgating", k, cf, mc, "position"
            yield "topkgating", k, cf, mc, "probs"
    # drop_tokens=False: DeepSpeed's dropless routing
    yield "top1gating", 1, None, 1, "position"
    yield "top2gating", 2, None, 1, "position"
    yield "topkgating", 3, None, 1, "position"
    yield "topkgating", 4, None, 1, "position"


def case(logits: torch.Tensor, index: int, fn: str, k: int, cf: float | None, mc: int, policy: str) -> dict:
    l_aux, combine, dispatch, counts = gate(logits, fn, k, cf, mc, policy)
    weights = combine.sum(-1)                                  # [T, E] summed over capacity slots
    mask = dispatch.any(-1)                                    # [T, E]
    assert torch.equal(mask, weights != 0), "combine weights must be nonzero exactly where dispatched"
    routes = mask.flatten().nonzero().flatten()                # [N] ascending t * E + e
    return dict(fn=fn, k=k, capacity_factor=cf, min_capacity=mc, drop_policy=policy, logits=index,
                capacity=int(combine.shape[-1]), l_aux=float(l_aux), exp_counts=counts.tolist(),
                routes=routes.to(torch.int16), weights=weights.flatten()[routes].float())


def capacity_grid() -> dict:
    """DeepSpeed's capacity formula (float32 arithmetic) on awkward factors, where float64 would differ."""
    from deepspeed.moe.sharded_moe import _capacity
    rows, factors, caps = [], [], []
    for t, e, cf, k, mc in itertools.product((1, 3, 7, 10, 64, 100, 300, 1000, 4096), (4, 8, 11, 16, 60, 64),
                                             (0.3, 0.5, 1.0, 1.1, 1.25, 1.7, 2.0, 3.3), (1, 2, 3, 4, 6, 8), (0, 4)):
        if k > e:
            continue
        cap = _capacity(torch.empty(t, e), torch.tensor(cf * k), torch.tensor(mc))   # as the gating functions call it
        rows.append((t, e, k, mc))
        factors.append(cf)
        caps.append(int(cap))
    return dict(rows=torch.tensor(rows, dtype=torch.int32), capacity_factor=torch.tensor(factors, dtype=torch.float64),
                capacity=torch.tensor(caps, dtype=torch.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import deepspeed
    all_logits, cases = [], []
    for t, seeds in SHAPES.items():
        for e, seed in itertools.product(EXPERTS, seeds):
            gen = torch.Generator().manual_seed(1000 * seed + 10 * t + e)
            logits = torch.randn(t, e, generator=gen) * 1.5      # [T, E]; 1.5: some confident tokens
            all_logits.append(logits)
            cases += [case(logits, len(all_logits) - 1, *call) for call in calls_per_logits()]
    meta = dict(deepspeed=str(deepspeed.__version__), torch=str(torch.__version__),
                command=" ".join([Path(sys.executable).name, *sys.argv]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(meta=meta, logits=all_logits, cases=cases, capacity=capacity_grid()), args.out)
    print(f"{args.out}: {len(cases)} gating cases over {len(all_logits)} logits, "
          f"{args.out.stat().st_size / 2**20:.2f} MiB (deepspeed {deepspeed.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
