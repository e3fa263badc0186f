"""Router policies of the published MoE systems, as one pure function: route(logits, cfg) -> Routing.

Legend: T tokens, E experts, K top-k, G expert groups, C capacity (routes an expert may take).

Contract. Given router logits [T, E] (any float dtype; the math runs in float32):
  1. scores = softmax(logits) (GShard, Switch, Mixtral, Qwen, OLMoE, DeepSeek-V2) or
     sigmoid(logits) (DeepSeek-V3); "softmax_topk" (gpt-oss): the raw logits choose and the
     weights are a softmax over the chosen K only (the same as softmax then renormalising, but
     computed as the reference does).
  2. Experts are chosen by top-k over scores + score_bias (DeepSeek-V3's auxiliary-loss-free
     correction bias: it steers the choice and never the weights), optionally limited to the
     topk_group best of n_group expert groups (group score: max for DeepSeek-V2, sum of the top 2
     for DeepSeek-V3) or to the device_limit best devices (DeepSeek-V2 device-limited routing;
     device score = best expert score on it).
  3. weights = the chosen experts' scores, renormalised over the K if `renormalize`.
  4. capacity_factor (None = dropless): each expert takes at most
     C = max(min_capacity, ceil(T / E * capacity_factor * K)) routes (computed in float32, as
     DeepSpeed-MoE's _capacity), as DeepSpeed-MoE's top1gating / top2gating / topkgating with random
     token selection off. A capacity limit only removes routes; weights follow `renormalize` as in
     step 3, over the routes that survive (a token that loses every route gets weight 0 and keeps its
     residual path). So `renormalize=False` is DeepSpeed's top1gating at K = 1 (raw probability) and
     `renormalize=True` is top2gating / topkgating (renormalised over survivors; at K = 1 weight 1),
     and a capacity that drops nothing changes nothing. drop_policy "position": K = 1 keeps the
     tokens top1gating keeps (torch.topk over the 0/1 expert mask along tokens: its tie-break, NOT
     token order); K = 2 places every first choice before any second choice, then keeps the earliest
     (top2gating); K > 2 keeps the earliest tokens (topkgating). "probs" keeps the highest-scoring
     routes of each expert (topkgating).
  5. weights *= routed_scaling_factor. counts are routes chosen before dropping; dropped the routes
     removed by the capacity limit; aux_loss the load-balancing loss DeepSpeed computes for that K.
Inference is deterministic; jitter / rsample / random token selection exist for training only.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid", "softmax_topk"] = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: Literal["position", "probs"] = "position"
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    device_limit: int | None = None          # M: at most M devices per token
    num_devices: int = 1                     # experts split contiguously over this many devices
    noisy_gate: Literal["none", "jitter", "rsample"] = "none"   # training only
    jitter_eps: float = 1e-2
    # Llama 4: choose by the raw logits (sigmoid is monotonic, but saturates to equal float32
    # scores for large logits, where the top-k tie-break would differ from the checkpoint's router)
    select_on_logits: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.scoring not in ("softmax", "sigmoid", "softmax_topk"):
            raise ValueError(f"scoring must be softmax, sigmoid or softmax_topk, got {self.scoring!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.drop_policy not in ("position", "probs"):
            raise ValueError(f"drop_policy must be position or probs, got {self.drop_policy!r}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}) "
                             f"and topk_group ({self.topk_group}) must be in [1, n_group]")
        if self.device_limit is not None and not 1 <= self.device_limit <= self.num_devices:
            raise ValueError(f"device_limit must be in [1, {self.num_devices}], got {self.device_limit}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"top_k ({self.top_k}) exceeds the experts in topk_group ({self.topk_group}) groups")
        if self.device_limit is not None and self.num_experts % self.num_devices == 0 \
                and self.top_k > self.device_limit * (self.num_experts // self.num_devices):
            raise ValueError(f"top_k ({self.top_k}) exceeds the experts on device_limit ({self.device_limit}) devices")

    def capacity(self, num_tokens: int) -> int:
        # float32, as DeepSpeed's _capacity: ceil(f32(T / E) * f32(capacity_factor * K)). float64 can
        # land past an integer: T=100, E=11, factor 1.1 gives 10.000000000000002 -> 11; DeepSpeed 10.
        scaled = _f32(_f32(num_tokens / self.num_experts) * _f32(self.capacity_factor * self.top_k))
        return max(self.min_capacity, math.ceil(scaled))


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (the product of two float32 values is exact in float64)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass
class Routing:
    expert_ids: torch.Tensor   # [T, K] int64
    weights: torch.Tensor      # [T, K] float32 (0 where dropped)
    kept: torch.Tensor         # [T, K] bool
    counts: torch.Tensor       # [E] int64 routes chosen, before dropping
    dropped: torch.Tensor      # [E] int64 routes removed by the capacity limit
    aux_loss: torch.Tensor     # [] float32
    capacity_limited: bool = False   # a capacity limit was applied: `kept` may be False somewhere


def route(logits: torch.Tensor, cfg: RoutingConfig, score_bias: torch.Tensor | None = None,
          training: bool = False, generator: torch.Generator | None = None,
          with_aux_loss: bool = True) -> Routing:
    """logits [T, E] -> Routing; see the module docstring for the contract."""
    logits = logits.float()
    if training and cfg.noisy_gate == "jitter":
        noise = torch.empty_like(logits).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps, generator=generator)
        logits = logits * noise
    scores = _scores(logits, cfg.scoring)                                               # [T, E]
    choice = scores if score_bias is None else scores + score_bias.float()
    if cfg.select_on_logits:
        choice = logits
    if training and cfg.noisy_gate == "rsample":
        choice = choice + torch.randn(choice.shape, generator=generator) / cfg.num_experts
    choice = _limit_groups(choice, cfg)
    expert_ids = torch.topk(choice, cfg.top_k, dim=-1).indices                         # [T, K]
    weights = scores.gather(1, expert_ids)                                              # [T, K]
    if cfg.scoring == "softmax_topk":   # the chosen logits -> their softmax
        weights = weights.softmax(-1)
    counts = torch.bincount(expert_ids.flatten(), minlength=cfg.num_experts)            # [E]
    # The loss is for training; serving skips its ~20 small ops per layer and step.
    aux_loss = _aux_loss(_probs(scores, cfg.scoring), expert_ids, cfg) if with_aux_loss or training \
        else scores.new_zeros(())
    if cfg.capacity_factor is None:
        if cfg.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        kept = torch.ones_like(expert_ids, dtype=torch.bool)
        dropped = torch.zeros_like(counts)
    else:
        kept = _apply_capacity(expert_ids, weights, cfg)
        weights = weights * kept
        if cfg.renormalize:   # over the surviving routes, clamped as DeepSpeed does (all dropped -> 0)
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
        dropped = torch.bincount(expert_ids[~kept], minlength=cfg.num_experts)
    return Routing(expert_ids, weights * cfg.routed_scaling_factor, kept, counts, dropped, aux_loss,
                   capacity_limited=cfg.capacity_factor is not None)


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[T, E] float32 -> what top-k chooses from: probabilities, or the logits (softmax_topk)."""
    if scoring == "softmax":
        return logits.softmax(-1)
    return logits.sigmoid() if scoring == "sigmoid" else logits


def _probs(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert probabilities for the load-balancing loss (softmax_topk scores are logits)."""
    return scores.softmax(-1) if scoring == "softmax_topk" else scores


def _limit_groups(choice: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """Masks to -inf the experts outside each token's best groups / devices. [T, E] -> [T, E]."""
    t, e = choice.shape
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.view(t, cfg.n_group, e // cfg.n_group)                          # [T, G, E/G]
        group_score = grouped.max(-1).values if cfg.group_score == "max" else grouped.topk(2, -1).values.sum(-1)
        choice = _keep_best_groups(choice, group_score, cfg.topk_group)
    if cfg.device_limit is not None and cfg.device_limit < cfg.num_devices:
        per_device = _device_view(choice, cfg.num_devices)                               # [T, D, E/D]
        choice = _keep_best_groups(choice, per_device.max(-1).values, cfg.device_limit)
    return choice


def _device_view(choice: torch.Tensor, devices: int) -> torch.Tensor:
    t, e = choice.shape
    if e % devices:
        raise ValueError(f"device-limited routing needs num_experts ({e}) divisible by the device count ({devices})")
    return choice.view(t, devices, e // devices)


def _keep_best_groups(choice: torch.Tensor, group_score: torch.Tensor, keep: int) -> torch.Tensor:
    t, e = choice.shape
    groups = group_score.shape[1]
    best = torch.topk(group_score, keep, dim=-1).indices                                # [T, keep]
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)      # [T, G]
    mask = mask[:, :, None].expand(t, groups, e // groups).reshape(t, e)
    return choice.masked_fill(~mask, float("-inf"))


def _apply_capacity(expert_ids: torch.Tensor, weights: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """[T, K] bool: which routes fit in their expert's capacity (DeepSpeed-MoE semantics)."""
    t, k = expert_ids.shape
    capacity = cfg.capacity(t)
    if k == 1 and cfg.drop_policy == "position":
        return _top1_survivors(expert_ids, capacity, cfg.num_experts)
    # Placement order. K = 2 (top2gating): every first choice in token order, then every second
    # choice. K > 2 (topkgating): token order; a token's routes go to distinct experts. ("probs"
    # ignores the order; K = 1 comes here only for it.)
    choice_major = k <= 2
    order_ids = (expert_ids.t() if choice_major else expert_ids).reshape(-1)            # [R]
    one_hot = torch.nn.functional.one_hot(order_ids, cfg.num_experts)                   # [R, E]
    if cfg.drop_policy == "position":
        position = (one_hot.cumsum(0) - 1).gather(1, order_ids[:, None])[:, 0]          # [R]
        kept = position < capacity
    else:   # keep each expert's `capacity` highest-probability routes
        route_w = (weights.t() if choice_major else weights).reshape(-1)                # [R]
        per_expert = torch.where(one_hot.bool(), route_w[:, None], -1.0)                # [R, E]
        top = torch.topk(per_expert, min(capacity, per_expert.shape[0]), dim=0).indices  # [C, E]
        keep_mask = torch.zeros_like(per_expert, dtype=torch.bool).scatter_(0, top, True)
        kept = (keep_mask & one_hot.bool()).any(1)
    return kept.view(k, t).t() if choice_major else kept.view(t, k)


def _top1_survivors(expert_ids: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """[T, 1] -> [T, 1] bool, exactly as DeepSpeed's top1gating without random token selection:
    torch.topk over the int64 0/1 mask along tokens. Ties among the 1s are broken by topk's
    selection algorithm (on CPU neither the earliest nor the latest tokens), so this reproduces
    DeepSpeed on the same device rather than keeping the earliest tokens."""
    mask = torch.nn.functional.one_hot(expert_ids[:, 0], num_experts)                   # [T, E] int64
    top = torch.topk(mask, min(capacity, mask.shape[0]), dim=0).indices                 # [C, E]
    selected = torch.zeros_like(mask).scatter_(0, top, 1)                               # [T, E]
    return selected.gather(1, expert_ids).bool()                                        # [T, 1]


def _aux_loss(scores: torch.Tensor, expert_ids: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """DeepSpeed's l_aux: me = mean gate prob per expert, ce = fraction of routes (first choice
    for k <= 2, all k for topk). k=1: Switch's E * sum(me * ce); k=2: mean(me*ce) * E^2;
    k > 2: mean(me*ce) * E^2 / k."""
    e = cfg.num_experts
    me = scores.mean(0)                                                                 # [E]
    first = expert_ids[:, 0] if cfg.top_k <= 2 else expert_ids.flatten()
    ce = torch.bincount(first, minlength=e).float() / expert_ids.shape[0]
    loss = (me * ce).mean() * e * e
    return loss / cfg.top_k if cfg.top_k > 2 else loss
