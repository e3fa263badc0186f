"""route() against DeepSpeed-MoE's own top1gating / top2gating / topkgating (deepspeed 0.19.8).

The reference values come from tests/data/deepspeed_gating.pt, written by
scripts/make_gating_references.py in a separate virtualenv (DeepSpeed is no moeserve dependency).
Every case there is deterministic: use_rts=False, top2_2nd_expert_sampling=False, no noisy gate.

Legend: T tokens, E experts, K top-k, C capacity.

DeepSpeed has no renormalise switch: top1gating keeps the raw probability, top2gating / topkgating
renormalise over the surviving routes. moeserve maps them to renormalize=False / True; each case is
checked in DeepSpeed's own mode exactly, and in the other mode against the same kept routes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeserve.layers.routing import RoutingConfig, route

DATA = Path(__file__).resolve().parents[1] / "data" / "deepspeed_gating.pt"
REFERENCE = torch.load(DATA, weights_only=True)
CASES = REFERENCE["cases"]



def _case_id(c: dict) -> str:
    cf = "dropless" if c["capacity_factor"] is None else f"cf{c['capacity_factor']}-mc{c['min_capacity']}"
    t, e = REFERENCE["logits"][c["logits"]].shape
    return f"{c['fn']}-k{c['k']}-{c['drop_policy']}-{cf}-T{t}E{e}-#{c['logits']}"


def _dense(c: dict, t: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's dispatch mask [T, E] bool and combine weights summed over C [T, E]."""
    routes = c["routes"].long()
    mask = torch.zeros(t * e, dtype=torch.bool).index_fill_(0, routes, True).view(t, e)
    weights = torch.zeros(t * e).index_copy_(0, routes, c["weights"]).view(t, e)
    return mask, weights


def _ours(logits: torch.Tensor, c: dict, renormalize: bool) -> tuple:
    cfg = RoutingConfig(num_experts=logits.shape[1], top_k=c["k"], capacity_factor=c["capacity_factor"],
                        min_capacity=c["min_capacity"], drop_policy=c["drop_policy"], renormalize=renormalize)
    r = route(logits, cfg)
    t, e = logits.shape
    mask = torch.zeros(t, e, dtype=torch.bool).scatter_(1, r.expert_ids, r.kept)            # [T, E]
    weights = torch.zeros(t, e).scatter_add_(1, r.expert_ids, r.weights)                    # [T, E]
    return cfg, r, mask, weights


def test_reference_file_is_complete() -> None:
    assert REFERENCE["meta"]["deepspeed"] == "0.19.8"
    fns = {(c["fn"], c["k"], c["drop_policy"], c["capacity_factor"] is None) for c in CASES}
    assert {("top1gating", 1, "position", False), ("top2gating", 2, "position", False),
            ("topkgating", 1, "probs", False), ("topkgating", 2, "probs", False),
            ("topkgating", 4, "position", False), ("topkgating", 4, "probs", False),
            ("top1gating", 1, "position", True), ("topkgating", 3, "position", True)} <= fns
    assert len(CASES) > 1000
    # the references must exercise dropping, including tokens that lose only some of their routes
    partial = 0
    for c in CASES:
        t, e = REFERENCE["logits"][c["logits"]].shape
        per_token = _dense(c, t, e)[0].sum(1)                                                 # [T]
        partial += bool(((per_token > 0) & (per_token < c["k"])).any())
    assert partial > 300


def _family(c: dict) -> str:
    return f"{c['fn']}-k{c['k']}-{c['drop_policy']}" + ("-dropless" if c["capacity_factor"] is None else "")


FAMILIES = sorted({_family(c) for c in CASES})


@pytest.mark.parametrize("family", FAMILIES)
def test_route_matches_deepspeed(family: str) -> None:
    """One test per gating function / K / policy; it runs every seed, shape and capacity of it
    (~70 cases each; one pytest item per case would cost more than the checks)."""
    cases = [c for c in CASES if _family(c) == family]
    assert cases
    for c in cases:
        try:
            _check_case(c)
        except AssertionError as exc:
            raise AssertionError(f"{_case_id(c)}: {exc}") from exc


def _check_case(c: dict) -> None:
    logits = REFERENCE["logits"][c["logits"]]                   # [T, E]
    t, e = logits.shape
    ds_mask, ds_weights = _dense(c, t, e)
    native = c["fn"] != "top1gating"                            # DeepSpeed's own renormalise mode
    cfg, r, mask, weights = _ours(logits, c, renormalize=native)

    assert r.counts.tolist() == c["exp_counts"]                 # before dropping
    if c["capacity_factor"] is not None:
        assert cfg.capacity(t) == c["capacity"]
    assert torch.equal(mask, ds_mask), f"kept routes differ at tokens {(mask != ds_mask).any(1).nonzero().flatten().tolist()}"
    torch.testing.assert_close(weights, ds_weights, atol=1e-6, rtol=0)
    assert r.dropped.tolist() == (r.counts - ds_mask.sum(0)).tolist()
    if not (c["fn"] == "topkgating" and c["k"] == 2):           # moeserve's K=2 loss is top2gating's
        torch.testing.assert_close(r.aux_loss, torch.tensor(c["l_aux"]), rtol=1e-5, atol=0)

    # The other renormalise mode keeps the same routes; only their weights change.
    _, other, other_mask, other_weights = _ours(logits, c, renormalize=not native)
    raw = logits.softmax(-1) * ds_mask                                                      # [T, E]
    expected = raw if native else raw / raw.sum(-1, keepdim=True).clamp(min=torch.finfo(raw.dtype).eps)
    assert torch.equal(other_mask, ds_mask)
    torch.testing.assert_close(other_weights, expected, atol=1e-6, rtol=0)


def test_capacity_formula_matches_deepspeed() -> None:
    """DeepSpeed computes C in float32; float64 lands on the next integer for factors like 1.1."""
    grid = REFERENCE["capacity"]
    mismatches = []
    for (t, e, k, mc), cf, want in zip(grid["rows"].tolist(), grid["capacity_factor"].tolist(), grid["capacity"].tolist()):
        got = RoutingConfig(num_experts=e, top_k=k, capacity_factor=cf, min_capacity=mc).capacity(t)
        if got != want:
            mismatches.append((t, e, k, mc, cf, got, want))
    assert not mismatches, mismatches[:10]
    assert RoutingConfig(num_experts=11, top_k=1, capacity_factor=1.1, min_capacity=0).capacity(100) == 10


def test_top1_position_is_not_token_order() -> None:
    """DeepSpeed's top1gating keeps whichever tokens torch.topk picks among equal 0/1 mask values,
    and moeserve reproduces that: the survivors are not simply each expert's earliest tokens."""
    not_earliest = 0
    for c in CASES:
        if c["fn"] != "top1gating" or c["capacity_factor"] is None:
            continue
        logits = REFERENCE["logits"][c["logits"]]
        ds_mask, _ = _dense(c, *logits.shape)
        ids = logits.argmax(-1)
        for expert in range(logits.shape[1]):
            tokens = (ids == expert).nonzero().flatten()
            kept = tokens[ds_mask[tokens, expert]]
            not_earliest += not torch.equal(kept, tokens[: len(kept)])
    assert not_earliest > 0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_huge_capacity_equals_dropless(k: int, policy: str) -> None:
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(k))
    for renormalize in (True, False):
        dropless = route(logits, RoutingConfig(8, k, renormalize=renormalize))
        capped = route(logits, RoutingConfig(8, k, renormalize=renormalize, capacity_factor=100.0, drop_policy=policy))
        assert capped.kept.all() and capped.dropped.sum() == 0
        assert torch.equal(capped.expert_ids, dropless.expert_ids)
        torch.testing.assert_close(capped.weights, dropless.weights, atol=0, rtol=0)
        torch.testing.assert_close(capped.aux_loss, dropless.aux_loss)
