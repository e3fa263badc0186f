"""gpt-oss's layers against transformers' own: the MoE block (biased router, softmax over the
chosen k, expert biases, clamped SwiGLU, gate/up interleaved on the HF side) on every Experts path
(one token, per expert plain and bf16, expert subsets, run_rows, grouped_mm), and sink attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP, eager_attention_forward

from moeserve.layers.attention import causal_mask, sink_attention
from moeserve.layers.linear import WeightFormat
from moeserve.layers.moe import ExpertOptions, Experts, MoELayer, MoEShape
from moeserve.layers.routing import RoutingConfig, route
from moeserve.models.weight_conversion import gate_up_from_interleaved

H, E, I, K = 64, 8, 48, 2
TOKEN_COUNTS = (1, 7, 64, 513)
ATOL = 1e-5


def gpt_oss_pair(limit: float = 0.6) -> tuple[GptOssMLP, MoELayer]:
    cfg = hf.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                          swiglu_limit=limit)
    ref = GptOssMLP(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():     # HF starts the expert biases at zero
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    options = ExpertOptions(activation="clamped_swiglu", bias=True, alpha=cfg.swiglu_alpha, limit=limit)
    ours = MoELayer(MoEShape(hidden=H, intermediate=I, routing=RoutingConfig(E, K, "softmax_topk", True),
                             router_bias=True, experts=options))
    with torch.no_grad():     # what the loader does: [E, in, out] -> [E, out, in], gate/up de-interleaved
        ours.router.weight.copy_(ref.router.weight)
        ours.router.bias.copy_(ref.router.bias)
        ours.experts.w13.copy_(gate_up_from_interleaved(ref.experts.gate_up_proj.transpose(1, 2)))
        ours.experts.b13.copy_(gate_up_from_interleaved(ref.experts.gate_up_proj_bias))
        ours.experts.w2.copy_(ref.experts.down_proj.transpose(1, 2))
        ours.experts.b2.copy_(ref.experts.down_proj_bias)
    return ref, ours


def _x(tokens: int) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_moe_block_matches_hf(tokens: int) -> None:
    ref, ours = gpt_oss_pair()
    x = _x(tokens)
    with torch.no_grad():
        want = ref(x[None])[0][0]
        got, routing = ours(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.equal(routing.counts, torch.bincount(routing.expert_ids.flatten(), minlength=E))
    assert routing.counts.sum() == tokens * K


def test_clamp_and_biases_matter() -> None:
    """The checks above would catch a missing clamp or bias: each changes the output."""
    _, ours = gpt_oss_pair()
    x = _x(64)
    with torch.no_grad():
        base = ours(x)[0]
        loose = gpt_oss_pair(limit=100.0)[1](x)[0]
        ours.experts.b2.zero_()
        no_bias = ours(x)[0]
    assert (base - loose).abs().max() > 1e-2 and (base - no_bias).abs().max() > 1e-2


def test_router_matches_hf_router() -> None:
    ref, ours = gpt_oss_pair()
    x = _x(64)
    with torch.no_grad():
        _, scores, indices = ref.router(x)
        routing = route(ours.router(x), ours.routing_cfg, with_aux_loss=False)
    assert torch.equal(routing.expert_ids, indices)
    torch.testing.assert_close(routing.weights, scores, atol=1e-6, rtol=0)


def test_capacity_drops_keep_counts_and_renormalize() -> None:
    """softmax_topk under a capacity limit: counts are routes chosen, survivors renormalised."""
    cfg = RoutingConfig(E, K, "softmax_topk", True, capacity_factor=0.5, min_capacity=1)
    logits = torch.randn(40, E, generator=torch.Generator().manual_seed(5))
    routing = route(logits, cfg)
    assert torch.equal(routing.counts, torch.bincount(routing.expert_ids.flatten(), minlength=E))
    assert routing.dropped.sum() == (~routing.kept).sum() > 0
    sums = routing.weights.sum(-1)
    survivors = routing.kept.any(-1)
    torch.testing.assert_close(sums[survivors], torch.ones_like(sums[survivors]))
    assert routing.aux_loss > 0


def _subset(full: Experts, first: int, num: int) -> Experts:
    part = Experts(E, H, I, first_expert=first, num_local=num, options=full.options)
    with torch.no_grad():
        for attr in ("w13", "w2", "b13", "b2"):
            getattr(part, attr).copy_(getattr(full, attr)[first: first + num])
    return part


@pytest.mark.parametrize("cut", [3, 5])
def test_expert_subsets_and_run_rows_match_full(cut: int) -> None:
    """Expert parallelism with biases: two ranks' shares (allreduce) sum to the full layer, and
    run_rows (alltoall) gives each routed row its expert's unweighted output."""
    _, ours = gpt_oss_pair()
    full, x = ours.experts, _x(33)
    low, high = _subset(full, 0, cut), _subset(full, cut, E - cut)
    with torch.no_grad():
        routing = route(ours.router(x), ours.routing_cfg)
        torch.testing.assert_close(low(x, routing) + high(x, routing), full(x, routing), atol=ATOL, rtol=0)
        ids = routing.expert_ids.flatten()
        rows = (ids >= cut).nonzero()[:, 0]                                   # routes the high rank owns
        local = ids[rows] - cut
        out = high.run_rows(x[rows // K], local, torch.bincount(local, minlength=E - cut).tolist())
        for row, got in zip(rows.tolist(), out):
            want = full._one_token(x[row // K][None], _single_route(int(ids[row])))
            torch.testing.assert_close(got[None], want, atol=ATOL, rtol=0)


def _single_route(expert: int):
    from moeserve.layers.routing import Routing
    ids = torch.tensor([[expert]])
    return Routing(ids, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(E, dtype=torch.long),
                   torch.zeros(E, dtype=torch.long), torch.zeros(()))


def test_grouped_path_matches_per_expert() -> None:
    """The GPU path (F.grouped_mm, which also runs on CPU in float32) with biases and the clamp."""
    _, ours = gpt_oss_pair()
    experts = ours.experts
    x = _x(64)
    with torch.no_grad():
        routing = route(ours.router(x), ours.routing_cfg)
        ids = routing.expert_ids.flatten()
        order = ids.argsort(stable=True)
        x_sorted = x.index_select(0, order // K)
        sizes = torch.bincount(ids, minlength=E + 1)
        grouped = experts._grouped(x_sorted, sizes)
        per_expert = experts._per_expert(x_sorted, sizes.tolist())
    torch.testing.assert_close(grouped, per_expert, atol=ATOL, rtol=0)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs fbgemm")
def test_packed_int8_experts_with_biases() -> None:
    """Packed per-expert weights (int8, the --quantization layout) add the biases after the matmul."""
    _, ours = gpt_oss_pair()
    x = _x(7)
    with torch.no_grad():
        routing = route(ours.router(x), ours.routing_cfg)
        want = ours.experts(x, routing)
        packed = ours.experts
        for attr in ("w13", "w2"):
            packed.pack(attr, getattr(packed, attr).clone(), WeightFormat.INT8_FBGEMM)
        got = packed(x, routing)
        one = packed(x[:1], route(ours.router(x[:1]), ours.routing_cfg))
    assert (got - want).norm() / want.norm() < 0.03 and one.shape == (1, H)     # int8's error, not a lost bias


# --- attention sinks ------------------------------------------------------------------------------

class _Holder(torch.nn.Module):
    def __init__(self, sinks: torch.Tensor, groups: int) -> None:
        super().__init__()
        self.sinks, self.num_key_value_groups, self.training = sinks, groups, False


@pytest.mark.parametrize("n, length, window", [(1, 1, None), (5, 5, None), (6, 20, None), (9, 30, 8),
                                               (300, 300, None), (290, 310, 40)])
def test_sink_attention_matches_hf_eager(n: int, length: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(n)
    nh, nkv, d = 4, 2, 16
    q, sinks = torch.randn(1, nh, n, d, generator=gen), torch.randn(nh, generator=gen)
    k, v = torch.randn(1, nkv, length, d, generator=gen), torch.randn(1, nkv, length, d, generator=gen)
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None, None]
    want, _ = eager_attention_forward(_Holder(sinks, nh // nkv), q, k, v, additive, scaling=d ** -0.5)
    got = sink_attention(q, k, v, mask, sinks, d ** -0.5)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-6, rtol=0)
    if n == length and window is None:
        assert torch.equal(causal_mask(n, q.device), mask)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    assert (plain - got).abs().max() > 1e-3      # the sink takes its share of every row


@pytest.mark.parametrize("b, n, length", [(1, 300, 310), (6, 1, 50), (3, 40, 60)])
def test_sink_attention_in_blocks_equals_one_block(monkeypatch, b: int, n: int, length: int) -> None:
    """A score budget smaller than one [b, NH, n, L] block splits the queries into row blocks
    (prefill) and the batch into sequence blocks (decode); the result does not change."""
    from moeserve.layers import attention
    gen = torch.Generator().manual_seed(b * n)
    nh, nkv, d = 4, 2, 16
    q, sinks = torch.randn(b, nh, n, d, generator=gen), torch.randn(nh, generator=gen)
    k, v = torch.randn(b, nkv, length, d, generator=gen), torch.randn(b, nkv, length, d, generator=gen)
    lens = torch.randint(n, length + 1, (b,), generator=gen)[:, None, None, None]      # per-sequence context
    q_pos = lens - n + torch.arange(n)[:, None]                                         # [b, 1, n, 1]
    mask = torch.arange(length)[None, :] <= q_pos                                       # [b, 1, n, L]
    whole = sink_attention(q, k, v, mask, sinks, d ** -0.5)
    monkeypatch.setattr(attention, "_SINK_SCORE_BUDGET", nh * length * 2)   # 2 rows a block, or 2 decodes
    blocked = sink_attention(q, k, v, mask, sinks, d ** -0.5)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)
