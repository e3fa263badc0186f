"""Continuous batching over a paged KV cache: which sequences run each step, and how much of each.

Policy, as in vLLM v1: running sequences first, oldest first (a decode takes 1 token, a sequence
still prefilling takes its next chunk), then waiting sequences first come first served, all within
a per-step token budget and a cap on running sequences. A long prompt is split across steps
(chunked prefill) and shares steps with decodes. When KV blocks run out, the newest running
sequence is preempted by recompute: its blocks are freed and it goes back to the front of the
waiting queue, to prefill prompt + generated tokens when resumed, so its output continues as before.

n > 1: sequence 0 prefills the prompt alone; then the other n - 1 fork from it, sharing its full
prompt blocks, and each recomputes the prompt tail (at least the last token, so that it samples its
own first token). Shared blocks are never written, so no copy-on-write is needed.

Step protocol: batch = schedule(); run it; updates = update(batch, step_output). Call update() for
every batch, even an empty one. abort() / finish_seq() may be called between steps.
Plain Python, no torch: this runs every step, so nothing here is worse than O(sequences).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from moeserve.engine.batch import ScheduledBatch, ScheduledSeq, SeqOutput, StepOutput
from moeserve.engine.block_manager import BlockManager
from moeserve.errors import ConfigError
from moeserve.request import FinishReason, Request, Sequence, SequenceStatus

RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048     # tokens per step, prefill chunks and decodes together
    block_size: int = 16
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"without chunked prefill a whole prompt must fit in one step: "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_model_len ({self.max_model_len})")


@dataclass(slots=True)
class SeqUpdate:
    """What a step did to one sequence: a new token, and maybe the end (seq.finish_reason)."""

    seq: Sequence
    output: SeqOutput | None     # None: finished by the scheduler without a new token


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_kv_blocks: int,
                 eos_token_ids: Iterable[int] = (), kv_partitions: int = 1) -> None:
        """num_kv_blocks in all; kv_partitions > 1 splits them per rank (expert parallel alltoall)."""
        self.config = config
        self.blocks = BlockManager(num_kv_blocks, config.block_size, kv_partitions)
        self.eos_token_ids = frozenset(eos_token_ids)
        # Longest a sequence may grow: the model's context, or the whole KV cache if smaller, so
        # that any one sequence fits once the others are preempted and nothing can wait forever.
        self.max_seq_len = min(config.max_model_len, self.blocks.blocks_per_partition * config.block_size)
        self.waiting: deque[Sequence] = deque()     # holds no blocks; preempted ones at the front
        self.running: list[Sequence] = []           # oldest first; preemption pops the end
        self.num_preemptions = 0
        self._requests: dict[str, Request] = {}     # unfinished requests
        self._queued: dict[int, Sequence] = {}      # seq_id -> sequence in waiting or running
        self._reserved_slots = 0                    # running slots kept for children not forked yet
        self._finished_in_schedule: list[SeqUpdate] = []
        self._seq_ids = itertools.count()

    # ---- metrics ----
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- requests in and out ----
    def add_request(self, request: Request) -> list[Sequence]:
        """Queue a request; returns its n sequences. ValueError if it can never be served."""
        self._check_admissible(request)
        n = request.sampling.n
        request.seqs = [Sequence(next(self._seq_ids), request, index) for index in range(n)]
        request.children_pending = n > 1
        first = request.seqs[0]
        self.waiting.append(first)
        self._queued[first.seq_id] = first
        self._requests[request.request_id] = request
        return request.seqs

    def _check_admissible(self, request: Request) -> None:
        num_prompt, cfg = len(request.prompt_token_ids), self.config
        if request.request_id in self._requests or request.seqs:
            raise ValueError(f"request {request.request_id!r} was already added")
        if num_prompt >= cfg.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens but the model's context is "
                             f"{cfg.max_model_len} tokens; shorten the prompt to leave room for at "
                             "least one generated token")
        if num_prompt > self.max_seq_len:
            raise ValueError(f"the prompt has {num_prompt} tokens but the KV cache holds only "
                             f"{self.max_seq_len}; shorten the prompt or give the cache more memory")
        if request.sampling.n > cfg.max_num_seqs:
            raise ValueError(f"n={request.sampling.n} is more than the server runs at once "
                             f"(max_num_seqs={cfg.max_num_seqs}); ask for fewer choices")

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with ABORT. Unknown or finished ids: []."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason) -> list[Sequence]:
        """Finish the request's unfinished sequences, free their blocks, return them."""
        request = self._requests.get(request_id)
        if request is None:
            return []
        finished = []
        # Children first, so that finishing sequence 0 does not hand unforked children to the queue.
        for seq in reversed(request.seqs):
            if seq.status is not FINISHED:
                self._unqueue(seq)
                self._finish(seq, reason)
                finished.append(seq)
        finished.reverse()
        return finished

    def finish_seq(self, seq_id: int, reason: FinishReason = FinishReason.STOP) -> Sequence | None:
        """Finish one sequence (a stop string matched, say) and free its blocks."""
        seq = self._queued.get(seq_id)
        if seq is None:
            return None
        self._unqueue(seq)
        self._finish(seq, reason)
        return seq

    # ---- one step ----
    def schedule(self) -> ScheduledBatch:
        scheduled: list[ScheduledSeq] = []
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        budget = self._schedule_running(scheduled, budget)
        # As vLLM v1: no admissions in a step that had to preempt; the freed blocks are spoken for.
        if self.num_preemptions == preemptions_before:
            budget = self._schedule_waiting(scheduled, budget)
        num_tokens = self.config.max_num_batched_tokens - budget
        return ScheduledBatch(seqs=scheduled, num_tokens=num_tokens, block_size=self.config.block_size)

    def update(self, batch: ScheduledBatch, step_output: StepOutput) -> list[SeqUpdate]:
        """Apply a step: advance computed tokens, append sampled tokens, finish and free sequences."""
        num_sampled = sum(1 for sched in batch.seqs if sched.sample)
        if num_sampled != len(step_output.outputs):
            raise ValueError(f"the step sampled {len(step_output.outputs)} tokens for {num_sampled} "
                             "sequences that asked for one")
        updates, self._finished_in_schedule = self._finished_in_schedule, []
        outputs = iter(step_output.outputs)
        forks: dict[int, list[Sequence]] = {}
        any_finished = False
        for sched in batch.seqs:
            output = next(outputs) if sched.sample else None
            seq = self._queued.get(sched.seq_id)
            if seq is None or seq.status is not RUNNING:
                continue  # finished or aborted since schedule(); its output is dropped
            seq.num_computed_tokens += len(sched.token_ids)
            if output is None:
                continue
            if output.seq_id != seq.seq_id:
                raise ValueError(f"step output for seq {output.seq_id} where seq {seq.seq_id} was due")
            seq.append_token(output.token_id)
            if seq.index == 0 and seq.request.children_pending:
                forks[seq.seq_id] = self._fork_children(seq)
            reason = self._stop_reason(seq, output.token_id)
            if reason is not None:
                self._finish(seq, reason)
                any_finished = True
            updates.append(SeqUpdate(seq, output))
        if any_finished or forks:
            self._rebuild_running(forks)
        return updates

    # ---- scheduling helpers ----
    def _schedule_running(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = self._chunk_len(seq, budget)
            if num_new > 0:
                if not self._grow_or_preempt(seq, seq.num_computed_tokens + num_new):
                    if self.blocks.num_partitions == 1:
                        break  # seq preempted itself: it was the newest left, and the rest are gone
                    continue   # the newest of its partition; the next sequence now sits at index
                scheduled.append(self._scheduled_seq(seq, num_new))
                budget -= num_new
            index += 1
        return budget

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for num_tokens, preempting the newest running sequences as needed."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self._newest_sharing_partition(seq)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate_for(seq, num_tokens)
        return True

    def _newest_sharing_partition(self, seq: Sequence) -> Sequence:
        """Pops the newest running sequence whose blocks would free room for seq's (every one,
        unless the KV cache is split per rank)."""
        if self.blocks.num_partitions == 1:
            return self.running.pop()
        partition = self.blocks.partition_of(seq)
        for index in range(len(self.running) - 1, -1, -1):
            candidate = self.running[index]
            if candidate is seq or (candidate.block_table and self.blocks.partition_of(candidate) == partition):
                return self.running.pop(index)
        raise AssertionError("seq is running, so the loop returns it at the latest")

    def _schedule_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            slots = seq.sampling.n if self._is_unforked_parent(seq) else 1
            if len(self.running) + self._reserved_slots + slots > self.config.max_num_seqs:
                break
            num_new = self._chunk_len(seq, budget)
            if num_new == 0:
                break  # chunked prefill off and the prompt does not fit what is left of the step
            num_tokens = seq.num_computed_tokens + num_new
            if not self.blocks.can_grow(seq, num_tokens):
                if self.running:
                    break  # wait for running sequences to finish or be preempted
                self._finish_unschedulable(seq)  # cannot fit even alone; not reachable by design
                continue
            self.waiting.popleft()
            self.blocks.allocate_for(seq, num_tokens)
            seq.status = RUNNING
            self.running.append(seq)
            self._reserved_slots += slots - 1
            scheduled.append(self._scheduled_seq(seq, num_new))
            budget -= num_new
        return budget

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _scheduled_seq(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        if seq.request.first_scheduled_time is None:   # for the queue-time metric
            seq.request.first_scheduled_time = time.monotonic()
        start = seq.num_computed_tokens
        end = start + num_new
        return ScheduledSeq(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start:end], start_pos=start,
            block_table=seq.block_table, sample=end == seq.num_tokens, sampling=seq.sampling,
            output_token_ids=seq.output_token_ids, prompt_token_ids=seq.request.prompt_token_ids,
            seed_offset=seq.index)

    # ---- state transitions ----
    @staticmethod
    def _is_unforked_parent(seq: Sequence) -> bool:
        return seq.index == 0 and seq.request.children_pending

    def _preempt(self, seq: Sequence) -> None:
        """Evict a sequence popped from running: free its blocks, requeue it at the front."""
        if self._is_unforked_parent(seq):
            self._reserved_slots -= seq.sampling.n - 1
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _fork_children(self, parent: Sequence) -> list[Sequence]:
        """Start sequences 1..n-1 from the parent's prompt blocks, now that they are computed."""
        request = parent.request
        self._reserved_slots -= request.sampling.n - 1
        request.children_pending = False
        # Share only blocks wholly before the last prompt token: each child recomputes at least
        # that token to sample its own first token, so no shared block is ever written.
        shared_tokens = len(request.prompt_token_ids) - 1
        children = [seq for seq in request.seqs[1:] if seq.status is not FINISHED]
        for child in children:
            child.num_computed_tokens = self.blocks.fork(parent, child, shared_tokens)
            child.status = RUNNING
            self._queued[child.seq_id] = child
        return children

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        sampling, num_output = seq.sampling, seq.num_output_tokens
        # A stop token counts only once min_tokens tokens precede it (the sampler masks it before).
        if num_output > sampling.min_tokens:
            if token_id in sampling.stop_token_ids:
                return FinishReason.STOP
            if not sampling.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
        if sampling.max_tokens is not None and num_output >= sampling.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _unqueue(self, seq: Sequence) -> None:
        """Remove seq from running or waiting (O(queue); only on aborts and stop strings)."""
        if seq.seq_id not in self._queued:
            return  # an unforked child: in no queue yet
        if seq.status is RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark seq finished and free its blocks; the caller takes it out of running / waiting."""
        request = seq.request
        if self._is_unforked_parent(seq):
            self._release_children(seq)
        self.blocks.free(seq)
        seq.status = FINISHED
        seq.finish_reason = reason
        self._queued.pop(seq.seq_id, None)
        if request.is_finished:
            self._requests.pop(request.request_id, None)

    def _release_children(self, parent: Sequence) -> None:
        """The parent ends before its prompt was computed: children prefill on their own."""
        request = parent.request
        if parent.status is RUNNING:
            self._reserved_slots -= request.sampling.n - 1
        request.children_pending = False
        for child in reversed(request.seqs[1:]):
            if child.status is not FINISHED:
                self.waiting.appendleft(child)
                self._queued[child.seq_id] = child

    def _finish_unschedulable(self, seq: Sequence) -> None:
        self.waiting.popleft()
        reason = FinishReason.LENGTH if seq.output_token_ids else FinishReason.ERROR
        self._finish(seq, reason)
        self._finished_in_schedule.append(SeqUpdate(seq, None))

    def _rebuild_running(self, forks: dict[int, list[Sequence]]) -> None:
        """Drop finished sequences; put forked children right after their parent (same age)."""
        rebuilt: list[Sequence] = []
        for seq in self.running:
            if seq.status is RUNNING:
                rebuilt.append(seq)
            children = forks.get(seq.seq_id)
            if children:
                rebuilt.extend(children)
        self.running = rebuilt

    # ---- debugging ----
    def check_invariants(self) -> None:
        """Raise AssertionError if the queues, counters and block ref counts disagree. For tests."""
        self.blocks.check_invariants(self.running)  # only running sequences hold blocks
        queued = {seq.seq_id for seq in self.running} | {seq.seq_id for seq in self.waiting}
        if len(queued) != len(self.running) + len(self.waiting) or queued != self._queued.keys():
            raise AssertionError("running / waiting / _queued disagree")
        for seq in self.waiting:
            if seq.block_table or seq.num_computed_tokens or seq.status in (RUNNING, FINISHED):
                raise AssertionError(f"waiting seq {seq.seq_id} holds blocks or has state {seq.status}")
        for seq in self.running:
            covered = len(seq.block_table) * self.config.block_size
            if seq.status is not RUNNING or not seq.num_computed_tokens <= covered:
                raise AssertionError(f"running seq {seq.seq_id}: {seq.status}, "
                                     f"{seq.num_computed_tokens} computed, {covered} covered")
        reserved = sum(s.sampling.n - 1 for s in self.running if self._is_unforked_parent(s))
        if reserved != self._reserved_slots:
            raise AssertionError(f"reserved slots {self._reserved_slots}, expected {reserved}")
        if len(self.running) + reserved > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running + {reserved} reserved > max_num_seqs")
