"""Expert parallelism: which rank owns which expert, and the collectives of one MoE layer.

Legend: T tokens on this rank, E experts, E_loc experts on this rank, N ranks, K top-k,
H hidden, R = T*K routes, S routes this rank sends, Rr routes it receives.

Two dispatch modes (--ep-dispatch):
- alltoall: each rank routes its own tokens, sends every kept route's hidden row to the rank that
  owns the expert (all_to_all_single with variable splits; the per-expert counts go first), the
  owner runs its experts on what it received and sends the outputs back the same way. Routes are
  sorted by global expert id, so with contiguous placement they are also sorted by owner, and
  the per-expert counts tell the receiver which rows belong to which of its experts: no ids travel.
- allreduce: every rank holds the whole batch, computes only its own experts' share of the
  output (other ranks' routes contribute zero) and an all_reduce sums the shares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.distributed as dist

Dispatch = Literal["alltoall", "allreduce"]


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement of E experts over N ranks; the first E % N ranks hold one more."""

    num_experts: int
    num_ranks: int

    def __post_init__(self) -> None:
        if not 1 <= self.num_ranks <= self.num_experts:
            raise ValueError(f"cannot place {self.num_experts} experts on {self.num_ranks} ranks: "
                             "every rank needs at least one expert")

    @property
    def sizes(self) -> list[int]:
        base, extra = divmod(self.num_experts, self.num_ranks)
        return [base + (r < extra) for r in range(self.num_ranks)]

    @property
    def starts(self) -> list[int]:
        sizes = self.sizes
        return [sum(sizes[:r]) for r in range(self.num_ranks)]

    def experts_of(self, rank: int) -> range:
        start = self.starts[rank]
        return range(start, start + self.sizes[rank])

    def owner(self, expert: int) -> tuple[int, int]:
        """Global expert id -> (owner rank, local id on that rank)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.num_experts})")
        for rank in range(self.num_ranks):
            local = expert - self.starts[rank]
            if local < self.sizes[rank]:
                return rank, local
        raise AssertionError("unreachable")


@dataclass
class CommStats:
    """Time and bytes spent in this rank's MoE collectives (read by scripts/bench_ep.py)."""

    seconds: float = 0.0
    bytes_sent: int = 0          # payload handed to the collectives (hidden rows and partial sums)
    bytes_remote: int = 0        # of which left this rank


@dataclass
class ExpertParallel:
    """The process group and placement one rank's MoE layers exchange tokens over."""

    group: dist.ProcessGroup
    rank: int
    placement: ExpertPlacement
    mode: Dispatch
    stats: CommStats = field(default_factory=CommStats)   # two perf_counter calls per collective
    _recv_pattern: torch.Tensor | None = None             # [N * E_loc] local expert of each count

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    def all_reduce(self, partial: torch.Tensor) -> None:
        """allreduce mode: sums every rank's [T, H] share of the MoE output, in place."""
        start = time.perf_counter()
        dist.all_reduce(partial, group=self.group)
        nbytes = partial.numel() * partial.element_size()
        self._record(start, nbytes, nbytes)

    def exchange(self, x_send: torch.Tensor, expert_counts: torch.Tensor,
                 run_experts: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
        """alltoall mode: x_send [S, H] rows sorted by global expert, expert_counts [E] int64 rows
        per expert -> [S, H] expert outputs for those rows, computed on the experts' owners.
        run_experts(rows [Rr, H], local_ids [Rr], rows_per_local_expert) computes this rank's share.
        A rank with no tokens calls this too, with S = 0: it still serves the others."""
        start = time.perf_counter()
        sizes, n, mine = self.placement.sizes, self.num_ranks, self.placement.sizes[self.rank]
        recv_counts = expert_counts.new_empty(n * mine)                            # [N * E_loc]
        dist.all_to_all_single(recv_counts, expert_counts, [mine] * n, sizes, group=self.group)
        host = torch.cat([expert_counts, recv_counts]).tolist()   # the one host copy per layer
        send_host, recv_host = host[: self.placement.num_experts], host[self.placement.num_experts:]
        starts = self.placement.starts
        send_splits = [sum(send_host[starts[r]: starts[r] + sizes[r]]) for r in range(n)]
        recv_splits = [sum(recv_host[r * mine: (r + 1) * mine]) for r in range(n)]
        hidden = x_send.shape[1]
        x_recv = x_send.new_empty(sum(recv_splits), hidden)                       # [Rr, H]
        dist.all_to_all_single(x_recv, x_send, recv_splits, send_splits, group=self.group)
        self._record_rows(start, x_send, send_splits)
        local_ids = self._local_ids(recv_counts, x_recv.shape[0])                 # [Rr]
        per_expert = [sum(recv_host[r * mine + e] for r in range(n)) for e in range(mine)]
        y_recv = run_experts(x_recv, local_ids, per_expert)                       # [Rr, H]
        start = time.perf_counter()
        y_back = x_send.new_empty(x_send.shape)                                   # [S, H]
        dist.all_to_all_single(y_back, y_recv, send_splits, recv_splits, group=self.group)
        self._record_rows(start, y_recv, recv_splits)
        return y_back

    def _local_ids(self, recv_counts: torch.Tensor, total: int) -> torch.Tensor:
        # rows arrive as [source rank][local expert]: expert e repeated recv_counts[src, e] times
        if self._recv_pattern is None or self._recv_pattern.device != recv_counts.device:
            mine = self.placement.sizes[self.rank]
            self._recv_pattern = torch.arange(mine, device=recv_counts.device).repeat(self.num_ranks)
        return self._recv_pattern.repeat_interleave(recv_counts, output_size=total)   # no device sync

    # ---- accounting, read by scripts/bench_ep.py ----
    def _record(self, start: float, nbytes: int, remote: int) -> None:
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes_sent += nbytes
        self.stats.bytes_remote += remote

    def _record_rows(self, start: float, sent: torch.Tensor, splits: list[int]) -> None:
        row = sent.shape[1] * sent.element_size()                   # sent [rows, H]
        self._record(start, sum(splits) * row, (sum(splits) - splits[self.rank]) * row)
