"""The scheduler's configuration and the state its parts share (see engine/scheduler.py).

The scheduler is one class assembled from parts, one module per concern: admission of waiting
sequences with prefix lookup (admission.py), preemption (preemption.py), n > 1 forks (forks.py),
and the step itself (scheduler.py). SchedulerState declares what they all read and write.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from moeserve.engine.batch import SeqOutput
from moeserve.engine.block_manager import BlockManager
from moeserve.errors import ConfigError
from moeserve.request import Request, Sequence, SequenceStatus

RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048     # tokens per step, prefill chunks and decodes together
    block_size: int = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False    # the engine turns it on (EngineConfig's default)

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


class SchedulerState:
    config: SchedulerConfig
    blocks: BlockManager
    eos_token_ids: frozenset[int]
    max_seq_len: int                    # longest a sequence may grow
    waiting: deque[Sequence]            # holds no blocks; preempted ones at the front
    running: list[Sequence]             # oldest first; preemption pops the end
    num_preemptions: int
    prefix_cache_queries: int           # tokens of admitted sequences looked up (vLLM's meaning)
    prefix_cache_hits: int              # of those, tokens found in the prefix cache
    _requests: dict[str, Request]       # unfinished requests
    _queued: dict[int, Sequence]        # seq_id -> sequence in waiting or running
    _reserved_slots: int                # running slots kept for children not forked yet
    _finished_in_schedule: list[SeqUpdate]
    _seq_ids: itertools.count
