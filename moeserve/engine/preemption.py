"""Preemption by recompute: when KV blocks run out, the newest running sequence gives its blocks
back and returns to the front of the waiting queue; resumed, it prefills prompt + generated
tokens again (from its cached prefix, with prefix caching), so its output continues as before."""

from __future__ import annotations

from moeserve.engine.scheduler_state import SchedulerState
from moeserve.request import Sequence, SequenceStatus


class Preemption(SchedulerState):
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

    def _preempt(self, seq: Sequence) -> None:
        """Evict a sequence popped from running: free its blocks, requeue it at the front."""
        if self._is_unforked_parent(seq):
            self._reserved_slots -= seq.sampling.n - 1
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
