"""Gated Mixture-of-Experts layer: router, stacked experts (layers/experts.py), weighted combine,
shared expert, expert-parallel exchange.

Legend: T tokens, E experts (E_local on this rank), K top-k, H hidden, I expert intermediate,
R = T*K routes. Per-expert counts ride along in the Routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.experts import ExpertOptions, Experts
from moeserve.layers.linear import Linear
from moeserve.layers.routing import Routing, RoutingConfig, route
from moeserve.parallel.expert_parallel import ExpertParallel


class DenseMLP(nn.Module):
    """SwiGLU MLP with fused gate/up projection: gate_up [2I, H], down [H, I]."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = Linear(hidden, 2 * intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass(frozen=True)
class MoEShape:
    hidden: int
    intermediate: int
    routing: RoutingConfig
    shared_intermediate: int = 0
    shared_gated: bool = False
    first_expert: int = 0
    num_local: int | None = None   # None: all experts on this rank
    correction_bias: bool = False  # DeepSeek-V3: a learned per-expert bias steers the choice
    router_bias: bool = False      # gpt-oss: the router Linear has a bias
    experts: ExpertOptions = ExpertOptions()   # gpt-oss: expert biases, clamped SwiGLU
    weight_input: bool = False     # Llama 4: the router weight scales the expert input (see Experts)
    router_fp32: bool = False      # DeepSeek, GLM-4.5: logits from float32 activations and weight


class MoELayer(nn.Module):
    def __init__(self, shape: MoEShape) -> None:
        super().__init__()
        self.routing_cfg = shape.routing   # replaced by set_capacity() for the serving knobs
        self.router = Linear(shape.hidden, shape.routing.num_experts, bias=shape.router_bias)
        # As the reference implementations compute them: near-tied experts flip under bf16 logits
        # (6% of tokens chose a different set at DeepSeek-V3's shape, 256 experts top-8).
        self.router_fp32 = shape.router_fp32
        self.router.keep_float32 = shape.router_fp32    # read by models/weight_conversion.py
        # float32 (see models/weight_conversion.py): added to scores in [0, 1] before the top-k.
        self.score_bias = nn.Parameter(torch.zeros(shape.routing.num_experts)) if shape.correction_bias else None
        self.experts = Experts(shape.routing.num_experts, shape.hidden, shape.intermediate,
                               shape.first_expert, shape.num_local, shape.experts, shape.weight_input)
        self.shared = DenseMLP(shape.hidden, shape.shared_intermediate) if shape.shared_intermediate else None
        self.shared_gate = Linear(shape.hidden, 1, bias=False) if shape.shared_gated else None
        self.ep: ExpertParallel | None = None   # set by MoEDecoder.attach_expert_parallel()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        # x [T, H] -> (out [T, H], routing: counts [E] and dropped [E] ride along)
        logits = self.router(x.float() if self.router_fp32 else x)                # [T, E]
        routing = route(logits, self.routing_cfg, score_bias=self.score_bias, with_aux_loss=False)
        ep = self.ep
        if ep is None:
            out = self.experts(x, routing)
        elif ep.mode == "allreduce":
            out = self.experts(x, routing)                # this rank's experts' share
            if ep.rank == 0 and self.shared is not None:
                out += self._shared(x)                    # added once, before the sum
            ep.all_reduce(out)
            return out, routing
        else:
            out = self._alltoall(x, routing, ep)
        if self.shared is not None:
            out = out + self._shared(x)
        return out, routing

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(x)                                   # [T, H]
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared  # [T, 1] gate
        return shared

    def _alltoall(self, x: torch.Tensor, routing: Routing, ep: ExpertParallel) -> torch.Tensor:
        # Routes sorted by global expert id are sorted by owner rank too (contiguous placement).
        k, num_experts = routing.expert_ids.shape[1], self.routing_cfg.num_experts
        ids = routing.expert_ids.flatten()                                        # [R]
        if routing.capacity_limited:
            ids = torch.where(routing.kept.flatten(), ids, num_experts)           # dropped: not sent
        order = ids.argsort(stable=True)                                          # [R]
        counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts]     # [E]
        sent = order if not routing.capacity_limited else order[: int(counts.sum())]   # [S]
        token_of_route = sent // k
        rows = x[token_of_route]                                                  # [S, H]
        weights = routing.weights.flatten()[sent, None].to(x.dtype)               # [S, 1]
        if self.experts.weight_input:   # Llama 4: the weight scales the sent rows, results sum as they are
            y = ep.exchange(rows * weights, counts, self.experts.run_rows)        # [S, H]
        else:
            y = ep.exchange(rows, counts, self.experts.run_rows) * weights
        return torch.zeros_like(x).index_add_(0, token_of_route, y)

    def serve_peers(self, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        """alltoall mode on a rank with no tokens this step: run the other ranks' routes."""
        nothing = torch.empty(0, hidden, dtype=dtype, device=device)
        counts = torch.zeros(self.routing_cfg.num_experts, dtype=torch.int64, device=device)
        self.ep.exchange(nothing, counts, self.experts.run_rows)
