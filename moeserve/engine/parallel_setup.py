"""From EngineConfig to one RankSpec per expert-parallel rank (rank 0 is this process)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moeserve.config import EngineConfig
from moeserve.errors import ConfigError
from moeserve.parallel.groups import Rendezvous, free_port
from moeserve.parallel.rank import RankSpec


def resolve_ep_size(cfg: EngineConfig, device: torch.device, num_experts: int) -> int:
    """--ep-size, or by default one rank per visible GPU (1 on CPU)."""
    size = cfg.ep_size
    if size is None:
        size = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
        size = min(size, num_experts)
    if size > num_experts:
        raise ConfigError(f"--ep-size {size} is more than the model's {num_experts} experts; "
                          "every rank needs at least one")
    local = size // cfg.nnodes
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"--ep-size {size} needs {local} GPUs per node; {torch.cuda.device_count()} are visible")
    return size


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def rank_specs(cfg: EngineConfig, ep_size: int, model_dir: Path, dtype: torch.dtype, device: torch.device,
               num_experts: int, num_kv_blocks: int, eos_token_ids: tuple[int, ...],
               max_model_len: int | None = None) -> list[RankSpec]:
    """One spec per global rank. Ranks are numbered node by node: node k holds
    [k * local, (k + 1) * local)."""
    local = ep_size // cfg.nnodes
    port = cfg.master_port or free_port(cfg.master_addr)
    init_method = f"tcp://{cfg.master_addr}:{port}"
    specs = []
    for rank in range(ep_size):
        rank_device = f"cuda:{rank % local}" if device.type == "cuda" else "cpu"
        rdv = Rendezvous(init_method, ep_size, rank, rank_device, cfg.ep_timeout)
        specs.append(RankSpec(
            rendezvous=rdv, model_dir=str(model_dir), dtype=dtype, mode=cfg.ep_dispatch, num_experts=num_experts,
            num_kv_blocks=num_kv_blocks, block_size=cfg.block_size, eos_token_ids=eos_token_ids, seed=cfg.seed,
            capacity_factor=cfg.capacity_factor, min_capacity=cfg.min_capacity, drop_policy=cfg.drop_policy,
            quantization=cfg.quantization, quantize_lm_head=cfg.quantize_lm_head, max_model_len=max_model_len))
    return specs


def threads_per_rank(cfg: EngineConfig, ep_size: int, device: torch.device) -> int:
    """CPU: the node's cores split evenly between its ranks (two OpenMP teams on one core thrash)."""
    return max(1, usable_cpus() // (ep_size // cfg.nnodes)) if device.type == "cpu" else 1


def rendezvous_for_node(cfg: EngineConfig, ep_size: int, device: torch.device) -> list[Rendezvous]:
    """The rendezvous of this node's ranks (--node-rank K > 0: no HTTP, workers only)."""
    local = ep_size // cfg.nnodes
    init_method = f"tcp://{cfg.master_addr}:{cfg.master_port}"
    first = cfg.node_rank * local
    return [Rendezvous(init_method, ep_size, rank, f"cuda:{rank - first}" if device.type == "cuda" else "cpu",
                       cfg.ep_timeout) for rank in range(first, first + local)]
