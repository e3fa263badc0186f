"""Process groups for expert parallelism, created once per process and passed explicitly.

Two groups over the same ranks:
- compute: the MoE collectives (NCCL on CUDA devices, gloo on CPU), with --ep-timeout, so a dead
  or stuck peer fails the step instead of hanging it;
- control: gloo, carries rank 0's step messages. Workers wait on it between steps for as long as
  the server stays idle, so its timeout is long; a dead rank 0 still ends the wait at once (the
  connection closes).
- reply: gloo, the ranks' answers to rank 0 (sampled tokens, expert totals), with --ep-timeout:
  rank 0 never waits longer than that for a rank that vanished without closing its connection.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_IDLE_FOREVER = timedelta(days=365)
_RENDEZVOUS_S = 600.0


@dataclass(frozen=True)
class Rendezvous:
    """Where and how one rank joins: the same on every rank except `rank`."""

    init_method: str          # tcp://host:port
    world_size: int
    rank: int
    device: str               # "cpu" or "cuda:<local index>"
    timeout_s: float = 120.0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


@dataclass(frozen=True)
class Groups:
    compute: dist.ProcessGroup
    control: dist.ProcessGroup
    reply: dist.ProcessGroup


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_groups(rdv: Rendezvous) -> Groups:
    if rdv.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rdv.device))
    # The rendezvous waits for ranks still importing torch or starting on other nodes: its timeout
    # is generous; the step timeout applies to the groups created after it.
    dist.init_process_group(rdv.backend, init_method=rdv.init_method, world_size=rdv.world_size,
                            rank=rdv.rank, timeout=timedelta(seconds=max(rdv.timeout_s, _RENDEZVOUS_S)))
    step_timeout = timedelta(seconds=rdv.timeout_s)
    compute = dist.new_group(backend=rdv.backend, timeout=step_timeout)
    control = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)
    reply = dist.new_group(backend="gloo", timeout=step_timeout)
    return Groups(compute=compute, control=control, reply=reply)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
