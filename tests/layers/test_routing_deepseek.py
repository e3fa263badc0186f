"""route() against transformers' DeepSeek-V2 / V3 routers, and DeepSeek-V2 device-limited routing.

HF's routers pick experts with torch.topk(sorted=False), so expert sets are compared sorted and
weights per (token, expert). Legend: T tokens, H hidden, E experts, K top-k, D devices, M device limit.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moeserve.layers.routing import RoutingConfig, route

H, T = 32, 97


def _dense(expert_ids: torch.Tensor, weights: torch.Tensor, e: int) -> torch.Tensor:
    return torch.zeros(expert_ids.shape[0], e).scatter_add_(1, expert_ids, weights.float())   # [T, E]


def _assert_same_routes(ours, hf_ids: torch.Tensor, hf_weights: torch.Tensor, e: int) -> None:
    assert torch.equal(ours.expert_ids.sort(-1).values, hf_ids.sort(-1).values)
    torch.testing.assert_close(_dense(ours.expert_ids, ours.weights, e), _dense(hf_ids, hf_weights, e),
                               atol=1e-6, rtol=1e-6)


def _randomise_(router: torch.nn.Module, seed: int) -> torch.Tensor:
    """Random router weights (HF initialises them to zeros); returns inputs x [T, H]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(router.weight.shape[0], generator=gen) * 0.3)
    return torch.randn(T, H, generator=gen) * 0.5


V2_CASES = {   # name: DeepseekV2Config overrides
    "greedy": dict(n_routed_experts=16, num_experts_per_tok=4, topk_method="greedy", routed_scaling_factor=1.0),
    "greedy_scaled": dict(n_routed_experts=16, num_experts_per_tok=6, topk_method="greedy", routed_scaling_factor=16.0),
    "group_limited": dict(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, routed_scaling_factor=1.0),
    "group_limited_scaled": dict(n_routed_experts=24, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                 n_group=8, topk_group=2, routed_scaling_factor=16.0),
}


@pytest.mark.parametrize("name", sorted(V2_CASES))
def test_deepseek_v2_router(name: str) -> None:
    over = V2_CASES[name]
    config = hf.DeepseekV2Config(hidden_size=H, **over)
    router = DeepseekV2TopkRouter(config).eval()
    x = _randomise_(router, seed=len(name))
    grouped = over["topk_method"] == "group_limited_greedy"
    cfg = RoutingConfig(num_experts=over["n_routed_experts"], top_k=over["num_experts_per_tok"], scoring="softmax",
                        renormalize=False,   # HF's V2 router never renormalises
                        routed_scaling_factor=over["routed_scaling_factor"],
                        n_group=over["n_group"] if grouped else 1, topk_group=over["topk_group"] if grouped else 1,
                        group_score="max")
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(x)
        ours = route(logits, cfg)
    _assert_same_routes(ours, hf_ids, hf_weights, cfg.num_experts)
    if grouped:   # the group limit must matter for this test to mean anything
        assert not torch.equal(ours.expert_ids.sort(-1).values, logits.softmax(-1).topk(cfg.top_k).indices.sort(-1).values)


V3_CASES = {   # name: DeepseekV3Config overrides
    "grouped_norm": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                         norm_topk_prob=True, routed_scaling_factor=2.5),
    "grouped_raw": dict(n_routed_experts=32, num_experts_per_tok=6, n_group=8, topk_group=3,
                        norm_topk_prob=False, routed_scaling_factor=1.0),
    "one_group": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                      norm_topk_prob=True, routed_scaling_factor=2.5),
    "all_groups": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=4,
                       norm_topk_prob=True, routed_scaling_factor=1.0),
}


def _v3_cfg(over: dict) -> RoutingConfig:
    return RoutingConfig(num_experts=over["n_routed_experts"], top_k=over["num_experts_per_tok"], scoring="sigmoid",
                         renormalize=over["norm_topk_prob"], routed_scaling_factor=over["routed_scaling_factor"],
                         n_group=over["n_group"], topk_group=over["topk_group"], group_score="top2_sum")


@pytest.mark.parametrize("name", sorted(V3_CASES))
def test_deepseek_v3_router(name: str) -> None:
    over = V3_CASES[name]
    router = DeepseekV3TopkRouter(hf.DeepseekV3Config(hidden_size=H, **over)).eval()
    x = _randomise_(router, seed=len(name) + 100)
    cfg = _v3_cfg(over)
    bias = router.e_score_correction_bias
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(x)
        ours = route(logits, cfg, score_bias=bias)
        unbiased = route(logits, cfg)
    _assert_same_routes(ours, hf_ids, hf_weights, cfg.num_experts)
    # The bias steers the choice (some token picks other experts) but never enters the weights.
    assert not torch.equal(ours.expert_ids.sort(-1).values, unbiased.expert_ids.sort(-1).values)
    raw = logits.sigmoid().gather(1, ours.expert_ids)                                        # [T, K]
    if cfg.renormalize:
        raw = raw / raw.sum(-1, keepdim=True)
    torch.testing.assert_close(ours.weights, raw * cfg.routed_scaling_factor, atol=1e-6, rtol=1e-6)


def test_deepseek_v3_group_score_is_sum_of_top2() -> None:
    """Group 0 has the single best expert; group 1 the best pair: top2-sum keeps group 1 only."""
    logits = torch.logit(torch.tensor([[0.95, 0.05, 0.10, 0.02, 0.60, 0.58, 0.01, 0.03]]))  # 4 groups of 2
    cfg = RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=1, group_score="top2_sum")
    assert sorted(route(logits, cfg).expert_ids[0].tolist()) == [4, 5]
    cfg_max = RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=1, group_score="max")
    assert sorted(route(logits, cfg_max).expert_ids[0].tolist()) == [0, 1]


# --- Device-limited routing (DeepSeek-V2, section 2.2.2) ------------------------------------------

def _device_limited_reference(scores: torch.Tensor, k: int, devices: int, limit: int) -> torch.Tensor:
    """Per token: the `limit` devices holding the best single expert scores, then top-k among their
    experts. A plain loop over tokens. [T, E] -> [T, K] sorted ids."""
    t, e = scores.shape
    per = e // devices
    out = []
    for row in scores:
        best_devices = row.view(devices, per).max(-1).values.topk(limit).indices.tolist()
        allowed = [d * per + i for d in best_devices for i in range(per)]
        chosen = torch.tensor(allowed)[row[allowed].topk(k).indices]
        out.append(chosen.sort().values)
    return torch.stack(out)


@pytest.mark.parametrize("devices,limit,k", [(4, 1, 2), (4, 2, 4), (8, 3, 6), (8, 8, 6), (4, 4, 3)])
def test_device_limited_routing(devices: int, limit: int, k: int) -> None:
    e = 32
    logits = torch.randn(T, e, generator=torch.Generator().manual_seed(devices * 10 + limit))
    cfg = RoutingConfig(num_experts=e, top_k=k, renormalize=True, device_limit=limit, num_devices=devices)
    ours = route(logits, cfg)
    device_of = ours.expert_ids // (e // devices)                                             # [T, K]
    spans = torch.tensor([len(set(row)) for row in device_of.tolist()])
    assert int(spans.max()) <= limit
    assert torch.equal(ours.expert_ids.sort(-1).values, _device_limited_reference(logits.softmax(-1), k, devices, limit))
    torch.testing.assert_close(ours.weights.sum(-1), torch.ones(T))
    plain = route(logits, RoutingConfig(num_experts=e, top_k=k, renormalize=True))
    if limit == devices:
        assert torch.equal(ours.expert_ids, plain.expert_ids)
        assert torch.equal(ours.weights, plain.weights)
    elif k > limit:   # a limit below the spread of top-k must change some token's experts
        assert not torch.equal(ours.expert_ids.sort(-1).values, plain.expert_ids.sort(-1).values)


def test_device_limit_with_groups_and_bias() -> None:
    """Group limit and device limit together (V3-style sigmoid + bias): both constraints hold."""
    e, devices, limit = 32, 8, 2
    gen = torch.Generator().manual_seed(5)
    logits, bias = torch.randn(T, e, generator=gen), torch.randn(e, generator=gen) * 0.1
    cfg = RoutingConfig(num_experts=e, top_k=4, scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                        device_limit=limit, num_devices=devices)
    ids = route(logits, cfg, score_bias=bias).expert_ids                                      # [T, K]
    assert max(len(set(r)) for r in (ids // (e // devices)).tolist()) <= limit
    assert max(len(set(r)) for r in (ids // (e // 4)).tolist()) <= 2


@pytest.mark.parametrize("kwargs", [
    dict(num_experts=16, top_k=5, n_group=4, topk_group=1),           # 5 routes, 4 experts allowed
    dict(num_experts=16, top_k=5, device_limit=1, num_devices=4),
    dict(num_experts=16, top_k=2, device_limit=5, num_devices=4),
])
def test_impossible_limits_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RoutingConfig(**kwargs)


# --- routing_from_hf: the HF config.json -> RoutingConfig mapping gives the same routes ------------

_HF_ROUTERS = {"v2": (hf.DeepseekV2Config, DeepseekV2TopkRouter, V2_CASES, 7),
               "v3": (hf.DeepseekV3Config, DeepseekV3TopkRouter, V3_CASES, 11)}


@pytest.mark.parametrize("version, name", [(v, n) for v, (_, _, cases, _) in _HF_ROUTERS.items() for n in sorted(cases)])
def test_routing_from_hf_deepseek(version: str, name: str) -> None:
    from moeserve.models.config import routing_from_hf
    config_cls, router_cls, cases, seed = _HF_ROUTERS[version]
    config = config_cls(hidden_size=H, **cases[name])
    router = router_cls(config).eval()
    x = _randomise_(router, seed=seed)
    bias = getattr(router, "e_score_correction_bias", None)     # V3 only: steers the choice
    with torch.no_grad():
        _, hf_weights, hf_ids = router(x)
        ours = route(router_logits(router, x), routing_from_hf(config.to_dict()), score_bias=bias)
    _assert_same_routes(ours, hf_ids, hf_weights, cases[name]["n_routed_experts"])


def router_logits(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), router.weight.float())
