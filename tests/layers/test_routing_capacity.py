"""Capacity limits inside MoELayer: a dropped route removes only that route.

A token that loses one of its K routes keeps the others (renormalised over the survivors when the
router renormalises, raw otherwise), its shared expert and (in the decoder) its residual path; a
token that loses every route gets only the shared expert. Legend: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moeserve.layers.moe import MoELayer, MoEShape
from moeserve.layers.routing import RoutingConfig, route

H, E, INTER, SHARED = 16, 4, 24, 20


def _layer(renormalize: bool, shared: bool, capacity_factor: float | None = 1.0) -> MoELayer:
    routing = RoutingConfig(E, 2, renormalize=renormalize, capacity_factor=capacity_factor, min_capacity=1)
    layer = MoELayer(MoEShape(hidden=H, intermediate=INTER, routing=routing,
                              shared_intermediate=SHARED if shared else 0, shared_gated=shared))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E)          # logits = x[:, :E]: the test picks the routes
    return layer.eval()


def _expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (layer.experts.w13[e] @ x).chunk(2)                  # [I] each
    return layer.experts.w2[e] @ (F.silu(gate) * up)                 # [H]


def _shared(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    if layer.shared is None:
        return torch.zeros_like(x)
    return torch.sigmoid(layer.shared_gate(x)) * layer.shared(x)


def _inputs() -> torch.Tensor:
    """T=2, E=4, K=2, capacity_factor 1 -> C = ceil(2 / 4 * 1 * 2) = 1 route per expert.
    Token 0 routes to experts (0, 1), token 1 to (0, 2): first choices are placed first, so token 0
    takes expert 0 and token 1 loses exactly its first route and keeps expert 2."""
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(1))
    x[0, :E] = torch.tensor([3.0, 2.0, 0.0, -1.0])
    x[1, :E] = torch.tensor([3.0, -1.0, 2.0, 0.0])
    return x


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_dropped_route_keeps_the_other_route(renormalize: bool, shared: bool) -> None:
    layer, x = _layer(renormalize, shared), _inputs()
    with torch.no_grad():
        out, routing = layer(x)
        dropless, _ = _layer(renormalize, shared, capacity_factor=None)(x)
        assert routing.expert_ids.tolist() == [[0, 1], [0, 2]]
        assert routing.kept.tolist() == [[True, True], [False, True]]
        assert routing.dropped.tolist() == [1, 0, 0, 0] and routing.counts.tolist() == [2, 1, 1, 0]
        probs = x[1, :E].softmax(-1)
        weight = torch.tensor(1.0) if renormalize else probs[2]      # renormalised over the survivor
        expected = weight * _expert(layer, 2, x[1]) + _shared(layer, x[1])
        torch.testing.assert_close(out[1], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[0], dropless[0], atol=1e-6, rtol=1e-5)   # token 0 lost nothing
        assert not torch.allclose(out[1], dropless[1])


def test_token_losing_every_route_keeps_the_shared_expert() -> None:
    """Three tokens all choose experts (0, 1); C = ceil(3 / 4 * 0.5 * 2) = 1: tokens 1 and 2 lose both."""
    layer = _layer(renormalize=True, shared=True)
    layer.routing_cfg = dataclasses.replace(layer.routing_cfg, capacity_factor=0.5)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(2))
    x[:, :E] = torch.tensor([3.0, 2.0, 0.0, -1.0])
    with torch.no_grad():
        out, routing = layer(x)
        assert routing.kept.tolist() == [[True, True], [False, False], [False, False]]
        assert routing.weights[1:].abs().sum() == 0
        for t in (1, 2):
            torch.testing.assert_close(out[t], _shared(layer, x[t]), atol=1e-6, rtol=1e-5)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_output_is_sum_over_kept_routes(top_k: int, policy: str) -> None:
    """Random tokens, a tight capacity: each token's output is exactly the sum over its kept routes."""
    routing_cfg = RoutingConfig(E, top_k, capacity_factor=0.5, min_capacity=1, drop_policy=policy)
    layer = MoELayer(MoEShape(hidden=H, intermediate=INTER, routing=routing_cfg))
    gen = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        x = torch.randn(40, H, generator=gen)
        out, routing = layer(x)
        assert routing.dropped.sum() > 0 and routing.kept.any()
        assert torch.equal(routing.dropped, routing.counts - torch.bincount(routing.expert_ids[routing.kept], minlength=E))
        expected = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, w, kept in zip(routing.expert_ids[t].tolist(), routing.weights[t], routing.kept[t].tolist()):
                if kept:
                    expected[t] += w * _expert(layer, e, x[t])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # the same routing, recomputed outside the layer
        again = route(layer.router(x), routing_cfg)
        assert torch.equal(again.kept, routing.kept)
