"""Continuous batching over a paged KV cache: which sequences run each step, and how much of each.

Policy, as in vLLM v1: running sequences first, oldest first (a decode takes 1 token, a sequence
still prefilling takes its next chunk), then waiting sequences first come first served, all within
a per-step token budget and a cap on running sequences. A long prompt is split across steps
(chunked prefill) and shares steps with decodes. When KV blocks run out, the newest running
sequence is preempted by recompute: its blocks are freed and it goes back to the front of the
waiting queue, to prefill prompt + generated tokens when resumed, so its output continues as before.

The parts live beside this module: admission.py (waiting sequences and prefix lookup),
preemption.py, forks.py (n > 1); scheduler_state.py holds the configuration and shared state.

Step protocol: batch = schedule(); run it; updates = update(batch, step_output). Call update() for
every batch, even an empty one. abort() / finish_seq() may be called between steps.
Plain Python, no torch: this runs every step, so nothing here is worse than O(sequences).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Iterable

from moeserve.engine.admission import Admission
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq, StepOutput
from moeserve.engine.block_manager import BlockManager
from moeserve.engine.forks import Forks
from moeserve.engine.preemption import Preemption
from moeserve.engine.scheduler_state import FINISHED, RUNNING, SchedulerConfig, SeqUpdate
from moeserve.request import FinishReason, Sequence

__all__ = ["Scheduler", "SchedulerConfig", "SeqUpdate"]


class Scheduler(Admission, Preemption, Forks):
    def __init__(self, config: SchedulerConfig, num_kv_blocks: int,
                 eos_token_ids: Iterable[int] = (), kv_partitions: int = 1) -> None:
        """num_kv_blocks in all; kv_partitions > 1 splits them per rank (expert parallel alltoall)."""
        self.config = config
        self.blocks = BlockManager(num_kv_blocks, config.block_size, kv_partitions, config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        # Longest a sequence may grow: the model's context, or the whole KV cache if smaller, so
        # that any one sequence fits once the others are preempted and nothing can wait forever.
        self.max_seq_len = min(config.max_model_len, self.blocks.blocks_per_partition * config.block_size)
        self.waiting = deque()
        self.running = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._requests = {}
        self._queued = {}
        self._reserved_slots = 0
        self._finished_in_schedule = []
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
            if self.blocks.prefix is not None:
                self.blocks.name_full_blocks(seq, seq.num_computed_tokens)
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
