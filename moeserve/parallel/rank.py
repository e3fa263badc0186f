"""One expert-parallel rank: its slice of the model, and what it does with rank 0's step messages.

Rank 0 (the server process) and every worker process build their rank with build_rank(); workers
then loop in serve_steps() until rank 0 says Shutdown or goes away.

Messages travel on the control group (parallel/messages.py), answers on the reply group
(gather_object to rank 0):
- allreduce mode: every rank gets the same StepMessage, `seqs` the whole batch without sampling
  state; every rank runs all of it (attention replicated), only rank 0 samples, nothing comes back.
- alltoall mode: each rank gets its own StepMessage, `seqs` the sequences whose KV blocks live on
  it; it samples them and sends the outputs back.
- seqs None is a query between steps: every rank answers (outputs [], expert totals, CommStats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.engine.batch import ScheduledBatch, ScheduledSeq, SeqOutput
from moeserve.models.loader import load_model
from moeserve.parallel.expert_parallel import Dispatch, ExpertParallel, ExpertPlacement
from moeserve.parallel import messages
from moeserve.parallel.groups import Groups, Rendezvous
from moeserve.worker.model_runner import ModelRunner
from moeserve.worker.sampler import Sampler


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build itself. Rank 0 broadcasts every rank's spec once the
    process groups exist, so workers on other nodes need nothing but the rendezvous."""

    rendezvous: Rendezvous
    model_dir: str
    dtype: torch.dtype
    mode: Dispatch
    num_experts: int
    num_kv_blocks: int                 # this rank's own KV cache
    block_size: int
    eos_token_ids: tuple[int, ...]
    seed: int
    capacity_factor: float | None
    min_capacity: int
    drop_policy: str
    quantization: str | None = None
    quantize_lm_head: bool = False
    max_model_len: int | None = None   # positions the rotary tables hold


@dataclass(slots=True)
class StepMessage:
    seqs: list[ScheduledSeq] | None          # None: no step, a query: every rank replies
    want_totals: bool = False                # alltoall: reply with this rank's expert totals


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class RankReport:
    """What a rank says once it is built: its parameter counts, or why it failed."""

    rank: int
    experts: range
    params: int = 0
    expert_params: int = 0
    param_bytes: int = 0
    error: str | None = None

    @property
    def shared_params(self) -> int:
        return self.params - self.expert_params


class RankRunner:
    """A ModelRunner over this rank's experts, driven by step messages."""

    def __init__(self, spec: RankSpec, runner: ModelRunner, ep: ExpertParallel) -> None:
        self.spec, self.runner, self.ep = spec, runner, ep
        self.rank = spec.rendezvous.rank
        self.model = runner.model
        self.block_offset = self.rank * spec.num_kv_blocks   # alltoall: global -> local block ids

    def report(self) -> RankReport:
        params = sum(p.numel() for p in self.model.parameters())
        experts = sum(p.numel() for name, p in self.model.named_parameters() if ".experts." in name)
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return RankReport(self.rank, self.ep.placement.experts_of(self.rank), params, experts, nbytes)

    @torch.inference_mode()
    def run_whole_batch(self, seqs: list[ScheduledSeq]) -> None:
        """allreduce mode, ranks > 0: attention over the whole batch, no logits, no sampling."""
        self.runner.forward_only(ScheduledBatch(seqs, sum(len(s.token_ids) for s in seqs), self.spec.block_size))

    @torch.inference_mode()
    def run_own(self, seqs: list[ScheduledSeq]) -> list[SeqOutput]:
        """alltoall mode: this rank's sequences (possibly none: it still serves the others)."""
        if not seqs:
            self.model.serve_peers()
            return []
        if self.block_offset:
            for seq in seqs:
                seq.block_table = [b - self.block_offset for b in seq.block_table]
        batch = ScheduledBatch(seqs, sum(len(s.token_ids) for s in seqs), self.spec.block_size)
        return self.runner.execute(batch).outputs

    def expert_totals(self) -> list:
        return self.model.expert_totals.tolist()


def build_rank(spec: RankSpec, groups: Groups) -> RankRunner:
    rank = spec.rendezvous.rank
    device = torch.device(spec.rendezvous.device)
    placement = ExpertPlacement(spec.num_experts, spec.rendezvous.world_size)
    experts = placement.experts_of(rank)
    model = load_model(spec.model_dir, spec.dtype, device, experts.start, len(experts), progress=rank == 0,
                       quantization=spec.quantization, quantize_lm_head=spec.quantize_lm_head,
                       max_positions=spec.max_model_len)
    model.set_capacity(spec.capacity_factor, spec.min_capacity, spec.drop_policy)
    # allreduce: every rank routes every token, so rank 0's counts are already the global ones.
    model.count_experts = rank == 0 or spec.mode == "alltoall"
    ep = ExpertParallel(groups.compute, rank, placement, spec.mode)
    model.attach_expert_parallel(ep)
    sampler = Sampler(spec.eos_token_ids, seed=spec.seed, device=device)
    runner = ModelRunner(model, spec.num_kv_blocks, spec.block_size, spec.dtype, device, sampler)
    return RankRunner(spec, runner, ep)


def serve_steps(rank: RankRunner, groups: Groups) -> None:
    """A worker's loop: one message from rank 0 per step, until Shutdown."""
    while True:
        message = messages.receive(groups.control)
        if isinstance(message, Shutdown):
            return
        if message.seqs is None:       # a query between steps
            totals = rank.expert_totals() if message.want_totals else None
            dist.gather_object(([], totals, rank.ep.stats), None, dst=0, group=groups.reply)
        elif rank.spec.mode == "allreduce":
            rank.run_whole_batch(message.seqs)
        else:
            dist.gather_object(rank.run_own(message.seqs), None, dst=0, group=groups.reply)


def slim(seq: ScheduledSeq) -> ScheduledSeq:
    """What a rank that does not sample needs of a sequence: tokens, positions, blocks."""
    return ScheduledSeq(seq.seq_id, seq.token_ids, seq.start_pos, seq.block_table, False, None, [], [])


def for_sampling(seq: ScheduledSeq) -> ScheduledSeq:
    """What a rank that samples needs: the prompt only for a repetition penalty (it can be long),
    the outputs for penalties, min_tokens and seeded generators (their count is the position)."""
    if not seq.sample:
        return slim(seq)
    prompt = seq.prompt_token_ids if seq.sampling.repetition_penalty != 1.0 else []
    return ScheduledSeq(seq.seq_id, seq.token_ids, seq.start_pos, seq.block_table, True, seq.sampling,
                        seq.output_token_ids, prompt, seq.seed_offset)
