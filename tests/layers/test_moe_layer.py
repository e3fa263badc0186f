"""MoELayer against transformers' own sparse MoE blocks, and expert-subset (expert-parallel) sums.

HF v5 keeps the experts fused in memory: experts.gate_up_proj [E, 2I, H], experts.down_proj
[E, H, I], router gate.weight [E, H]: the same layout as moeserve's Experts, so weights copy 1:1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from moeserve.layers.moe import Experts, MoELayer, MoEShape, Routing, RoutingConfig, route

H, E = 64, 8
TOKEN_COUNTS = (1, 7, 64, 513)
ATOL = 1e-5


def _init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():   # HF experts are torch.empty and the Qwen router is zeros
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def mixtral_pair(top_k: int = 2) -> tuple[torch.nn.Module, MoELayer]:
    cfg = hf.MixtralConfig(hidden_size=H, intermediate_size=96, num_local_experts=E, num_experts_per_tok=top_k)
    ref = MixtralSparseMoeBlock(cfg).eval()
    _init_(ref, seed=0)
    ours = MoELayer(MoEShape(hidden=H, intermediate=96, routing=RoutingConfig(E, top_k, "softmax", True)))
    _copy_routed(ref, ours)
    return ref, ours


def qwen2_pair(norm_topk_prob: bool) -> tuple[torch.nn.Module, MoELayer]:
    cfg = hf.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                            num_experts=E, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    ref = Qwen2MoeSparseMoeBlock(cfg).eval()
    _init_(ref, seed=1)
    ours = MoELayer(MoEShape(hidden=H, intermediate=48, routing=RoutingConfig(E, 2, "softmax", norm_topk_prob),
                             shared_intermediate=80, shared_gated=True))
    _copy_routed(ref, ours)
    with torch.no_grad():
        shared = ref.shared_expert
        ours.shared.gate_up.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared.down.weight.copy_(shared.down_proj.weight)
        ours.shared_gate.weight.copy_(ref.shared_expert_gate.weight)
    return ref, ours


def _copy_routed(ref: torch.nn.Module, ours: MoELayer) -> None:
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        ours.experts.w13.copy_(ref.experts.gate_up_proj)
        ours.experts.w2.copy_(ref.experts.down_proj)


PAIRS = {
    "mixtral": lambda: mixtral_pair(),
    "mixtral_top1": lambda: mixtral_pair(top_k=1),
    "qwen2_moe": lambda: qwen2_pair(norm_topk_prob=False),
    "qwen2_moe_norm": lambda: qwen2_pair(norm_topk_prob=True),
}


@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_matches_hf_block(kind: str, tokens: int) -> None:
    ref, ours = PAIRS[kind]()
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        expected = ref(x[None])[0]                          # HF blocks take [B, S, H]
        _, _, hf_ids = ref.gate(x)                          # [T, K] HF's chosen experts
        out, routing = ours(x)
        counts = routing.counts
    assert out.shape == (tokens, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    assert counts.dtype == torch.int64 and counts.shape == (E,)
    assert counts.tolist() == torch.bincount(hf_ids.flatten(), minlength=E).tolist()
    assert int(counts.sum()) == tokens * ours.routing_cfg.top_k


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_weights_match_hf_router(renormalize: bool) -> None:
    ref, ours = qwen2_pair(norm_topk_prob=renormalize)
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, hf_weights, hf_ids = ref.gate(x)
        routing = route(ours.router(x), ours.routing_cfg)
    assert torch.equal(routing.expert_ids, hf_ids)
    torch.testing.assert_close(routing.weights, hf_weights, atol=1e-6, rtol=1e-6)


# --- Experts holding a subset [first_expert, first_expert + num_local) -------------------------

def _experts(first: int, num_local: int, full: Experts) -> Experts:
    part = Experts(E, H, 48, first_expert=first, num_local=num_local)
    with torch.no_grad():
        part.w13.copy_(full.w13[first: first + num_local])
        part.w2.copy_(full.w2[first: first + num_local])
    return part


def _reference(full: Experts, x: torch.Tensor, routing: Routing, owned: range) -> torch.Tensor:
    """Sum over each token's routes to experts in `owned` of weight * SwiGLU expert: a plain loop."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(routing.expert_ids[t].tolist(), routing.weights[t]):
            if e in owned:
                gate, up = (full.w13[e] @ x[t]).chunk(2)
                out[t] += w * (full.w2[e] @ (F.silu(gate) * up))
    return out


@pytest.fixture(scope="module")
def full_experts() -> Experts:
    experts = Experts(E, H, 48)
    _init_(experts, seed=3)
    return experts


def _random_routing(tokens: int, top_k: int, seed: int) -> Routing:
    logits = torch.randn(tokens, E, generator=torch.Generator().manual_seed(seed))
    return route(logits, RoutingConfig(E, top_k))


@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("split", [(4, 4), (3, 5), (1, 7)])
def test_expert_subsets_sum_to_full(full_experts: Experts, tokens: int, split: tuple[int, int]) -> None:
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens + 1))
    routing = _random_routing(tokens, top_k=2, seed=tokens)
    with torch.no_grad():
        full = full_experts(x, routing)
        first, second = (_experts(0, split[0], full_experts), _experts(split[0], split[1], full_experts))
        part_a, part_b = first(x, routing), second(x, routing)
        if tokens <= 64:   # the loop reference is slow in Python; the sum check covers T=513
            torch.testing.assert_close(full, _reference(full_experts, x, routing, range(E)), atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(part_a, _reference(full_experts, x, routing, range(0, split[0])),
                                       atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(part_a + part_b, full, atol=ATOL, rtol=1e-5)


def test_subset_with_no_routes_returns_zeros(full_experts: Experts) -> None:
    """Every route goes to another rank's experts: grouped_mm leaves all rows uninitialised."""
    x = torch.randn(5, H)
    logits = torch.full((5, E), -10.0)
    logits[:, :2] = torch.tensor([2.0, 1.0])                 # experts 0 and 1 only
    routing = route(logits, RoutingConfig(E, 2))
    with torch.no_grad():
        out = _experts(4, 4, full_experts)(x, routing)
    assert torch.equal(out, torch.zeros_like(x))


def test_middle_subset_ignores_routes_on_both_sides(full_experts: Experts) -> None:
    """A rank owning experts [2, 5) drops routes to experts below and above its range."""
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(11))
    routing = _random_routing(40, top_k=3, seed=12)
    with torch.no_grad():
        out = _experts(2, 3, full_experts)(x, routing)
        expected = _reference(full_experts, x, routing, range(2, 5))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
