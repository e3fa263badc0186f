"""Admission: which waiting sequences join the running batch, and from which cached prefix.

Waiting sequences are admitted first come first served while the step's token budget, the cap
on running sequences and the KV blocks allow. With prefix caching a sequence first looks up the
longest cached prefix of its tokens (engine/prefix_cache.py) and prefills only the rest; with
expert parallelism (alltoall) that also picks the rank whose cache holds it.
"""

from __future__ import annotations

from moeserve.engine.batch import ScheduledSeq
from moeserve.engine.scheduler_state import RUNNING, SchedulerState, SeqUpdate
from moeserve.request import FinishReason, Request, Sequence


class Admission(SchedulerState):
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

    def _schedule_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            slots = seq.sampling.n if self._is_unforked_parent(seq) else 1
            if len(self.running) + self._reserved_slots + slots > self.config.max_num_seqs:
                break
            partition, cached = self._find_prefix(seq, budget)
            num_cached = len(cached) * self.config.block_size
            num_new = self._chunk_len(seq, budget, num_cached)
            if num_new == 0:
                break  # chunked prefill off and the prompt does not fit what is left of the step
            num_tokens = num_cached + num_new
            if not self._can_admit(seq, partition, cached, num_tokens):
                if self.running:
                    break  # wait for running sequences to finish or be preempted
                self._finish_unschedulable(seq)  # cannot fit even alone; not reachable by design
                continue
            self.waiting.popleft()
            self._count_prefix_lookup(seq, num_cached)
            self.blocks.take_prefix(seq, partition, cached)
            seq.num_computed_tokens = num_cached
            self.blocks.allocate_for(seq, num_tokens)
            seq.status = RUNNING
            self.running.append(seq)
            self._reserved_slots += slots - 1
            scheduled.append(self._scheduled_seq(seq, num_new))
            budget -= num_new
        return budget

    def _find_prefix(self, seq: Sequence, budget: int) -> tuple[int, list[int]]:
        """(partition, cached block ids) a waiting sequence starts from: none without caching."""
        if self.blocks.prefix is None:
            return 0, []
        return self.blocks.find_prefix(seq, budget)

    def _can_admit(self, seq: Sequence, partition: int, cached: list[int], num_tokens: int) -> bool:
        if not cached:
            return self.blocks.can_grow(seq, num_tokens)
        return self.blocks.can_admit(partition, cached, self.blocks.blocks_for_tokens(num_tokens) - len(cached))

    def _count_prefix_lookup(self, seq: Sequence, num_cached: int) -> None:
        if self.blocks.prefix is None:
            return
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += num_cached
        if seq.index == 0 and seq.request.first_scheduled_time is None:
            seq.request.num_cached_tokens = num_cached   # usage.prompt_tokens_details.cached_tokens

    def _chunk_len(self, seq: Sequence, budget: int, num_computed: int | None = None) -> int:
        computed = seq.num_computed_tokens if num_computed is None else num_computed
        remaining = seq.num_tokens - computed
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _finish_unschedulable(self, seq: Sequence) -> None:
        self.waiting.popleft()
        reason = FinishReason.LENGTH if seq.output_token_ids else FinishReason.ERROR
        self._finish(seq, reason)
        self._finished_in_schedule.append(SeqUpdate(seq, None))
