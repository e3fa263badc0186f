"""Llama 4's MoE block: the router weight scales the expert INPUT (expert(w * x)), checked against
transformers' Llama4TextMoe on every Experts path (one token, CPU per expert, grouped matmul,
an expert subset as an expert-parallel rank holds it).

Legend: T tokens, E experts, H hidden, I expert intermediate.
transformers keeps gate_up_proj [E, H, 2I] and down_proj [E, I, H] (x @ W); moeserve's Experts
hold their transposes [E, 2I, H] and [E, H, I], as the loader converts them.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from moeserve.layers.moe import Experts, MoELayer, MoEShape, RoutingConfig, route

H, E, I = 64, 8, 48
TOKEN_COUNTS = (1, 7, 64, 513)
ATOL = 1e-5



def llama4_pair(top_k: int) -> tuple[Llama4TextMoe, MoELayer]:
    cfg = hf.Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=top_k)
    ref = Llama4TextMoe(cfg).eval()
    gen = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    routing = RoutingConfig(E, top_k, "sigmoid", renormalize=False, select_on_logits=True)
    ours = MoELayer(MoEShape(hidden=H, intermediate=I, routing=routing, shared_intermediate=I, weight_input=True))
    with torch.no_grad():
        ours.router.weight.copy_(ref.router.weight)
        ours.experts.w13.copy_(ref.experts.gate_up_proj.transpose(1, 2))     # [E, H, 2I] -> [E, 2I, H]
        ours.experts.w2.copy_(ref.experts.down_proj.transpose(1, 2))         # [E, I, H] -> [E, H, I]
        shared = ref.shared_expert
        ours.shared.gate_up.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared.down.weight.copy_(shared.down_proj.weight)
    return ref, ours


def _x(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)) * 3   # routes spread out


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_matches_hf_llama4_moe(tokens: int, top_k: int) -> None:
    """tokens == 1 takes the one-token path, the others the per-expert CPU path."""
    ref, ours = llama4_pair(top_k)
    x = _x(tokens)
    with torch.no_grad():
        expected, logits = ref(x)
        out, routing = ours(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    hf_ids = logits.topk(top_k, dim=-1).indices
    assert routing.counts.tolist() == torch.bincount(hf_ids.flatten(), minlength=E).tolist()


def test_weighting_the_output_instead_would_differ() -> None:
    """The control: SwiGLU is not linear, so w * expert(x) is not expert(w * x)."""
    ref, ours = llama4_pair(1)
    x = _x(64)
    with torch.no_grad():
        expected, _ = ref(x)
        ours.experts.weight_input = False
        out, _ = ours(x)
    assert (out - expected).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", (7, 64))
def test_grouped_path_matches_hf(tokens: int, monkeypatch) -> None:
    """The GPU grouped-matmul path, run on CPU (F.grouped_mm takes CPU tensors with aligned strides)."""
    ref, ours = llama4_pair(2)
    experts = ours.experts
    monkeypatch.setattr(experts, "_per_expert", lambda xs, sizes: experts._grouped(xs, torch.tensor(sizes + [0])))
    x = _x(tokens)
    with torch.no_grad():
        expected, _ = ref(x)
        out, _ = ours(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def _subset(full: Experts, first: int, num_local: int) -> Experts:
    part = Experts(E, H, I, first_expert=first, num_local=num_local, weight_input=True)
    with torch.no_grad():
        part.w13.copy_(full.w13[first: first + num_local])
        part.w2.copy_(full.w2[first: first + num_local])
    return part


@pytest.mark.parametrize("tokens", (1, 7, 64))
def test_expert_subsets_sum_to_full(tokens: int) -> None:
    """allreduce expert parallelism: each rank's share (its experts' routes) sums to the whole."""
    _, ours = llama4_pair(2)
    x = _x(tokens)
    with torch.no_grad():
        routing = route(ours.router(x), ours.routing_cfg, with_aux_loss=False)
        full = ours.experts(x, routing)
        parts = [_subset(ours.experts, 0, 3)(x, routing), _subset(ours.experts, 3, 5)(x, routing)]
    torch.testing.assert_close(parts[0] + parts[1], full, atol=ATOL, rtol=1e-5)


def test_run_rows_of_pre_weighted_rows() -> None:
    """alltoall: the sending rank weights the rows it sends; run_rows computes them unweighted."""
    _, ours = llama4_pair(1)
    x = _x(40)
    with torch.no_grad():
        routing = route(ours.router(x), ours.routing_cfg, with_aux_loss=False)
        ids = routing.expert_ids[:, 0]
        rows = x * routing.weights                                               # [T, H] w * x
        per_expert = torch.bincount(ids, minlength=E).tolist()
        out = ours.experts.run_rows(rows, ids, per_expert)
        full = ours.experts(x, routing)
    torch.testing.assert_close(out, full, atol=ATOL, rtol=1e-5)
