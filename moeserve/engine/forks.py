"""n > 1: sequence 0 prefills the prompt alone; then the other n - 1 fork from it, sharing its full
prompt blocks, and each recomputes the prompt tail (at least the last token, so that it samples its
own first token). Shared blocks are never written, so no copy-on-write is needed."""

from __future__ import annotations

from moeserve.engine.scheduler_state import FINISHED, RUNNING, SchedulerState
from moeserve.request import Sequence


class Forks(SchedulerState):
    @staticmethod
    def _is_unforked_parent(seq: Sequence) -> bool:
        return seq.index == 0 and seq.request.children_pending

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
