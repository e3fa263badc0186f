"""Requests, sequences and sampling parameters: plain Python, no torch.

A Request is what one client asked for: a prompt and its SamplingParams. It owns n Sequences, one
per completion choice. The scheduler and the block manager work on Sequences; the server reads a
Sequence's output_token_ids and finish_reason.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

MAX_N = 128
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0
# Below this temperature, sampling is argmax: dividing logits by ~0 would overflow to inf.
GREEDY_TEMPERATURE = 1e-5
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id, or a stop string
    LENGTH = "length"      # max_tokens, or the context / KV cache limit
    ABORT = "abort"        # the client went away or cancelled
    ERROR = "error"        # the engine could not serve this sequence


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()    # not started yet; holds no KV blocks
    RUNNING = enum.auto()    # admitted; holds KV blocks for its computed tokens
    PREEMPTED = enum.auto()  # evicted by recompute; queued again, holds no KV blocks
    FINISHED = enum.auto()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16            # None: generate up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0                     # in (0, 1]
    top_k: int = -1                        # -1 or 0: off
    min_p: float = 0.0                     # in [0, 1]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None            # k: the sampled token's logprob plus the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    min_tokens: int = 0                    # EOS and stop token ids cannot end a shorter output
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # A single stop string is accepted for convenience; stored as a list like the rest.
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        _require(isinstance(stop, (list, tuple)),
                 f"stop must be a string or a list of strings, got {stop!r}")
        object.__setattr__(self, "stop", list(stop))
        stop_ids = self.stop_token_ids
        _require(isinstance(stop_ids, (list, tuple)),
                 f"stop_token_ids must be a list of integers, got {stop_ids!r}")
        object.__setattr__(self, "stop_token_ids", list(stop_ids))
        self._validate_counts()
        self._validate_sampling()
        self._validate_penalties()
        self._validate_stops()

    def _validate_counts(self) -> None:
        _require(_is_int(self.n) and 1 <= self.n <= MAX_N,
                 f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _require(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
                 f"max_tokens must be an integer >= 1 (or null for no limit), got {self.max_tokens!r}")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0,
                 f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens,
                 f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                 f"and max_tokens={self.max_tokens}")
        logprobs = self.logprobs
        _require(logprobs is None or (_is_int(logprobs) and 0 <= logprobs <= MAX_LOGPROBS),
                 f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or null), got {self.logprobs!r}")

    def _validate_sampling(self) -> None:
        _require(_is_real(self.temperature) and self.temperature >= 0,
                 f"temperature must be >= 0, got {self.temperature!r}")
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(_is_int(self.top_k) and self.top_k >= -1,
                 f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1,
                 f"min_p must be in [0, 1], got {self.min_p!r}")
        seed = self.seed
        _require(seed is None or (_is_int(seed) and _INT64_MIN <= seed <= _INT64_MAX),
                 f"seed must be a 64-bit signed integer (or null), got {self.seed!r}")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -MAX_PENALTY <= value <= MAX_PENALTY,
                     f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        _require(_is_real(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    def _validate_stops(self) -> None:
        for text in self.stop:
            _require(isinstance(text, str) and text != "",
                     f"stop strings must be non-empty strings, got {text!r}")
        for token_id in self.stop_token_ids:
            _require(_is_int(token_id) and token_id >= 0,
                     f"stop_token_ids must be integers >= 0, got {token_id!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    # Filled by Scheduler.add_request: n sequences, seqs[i].index == i.
    seqs: list[Sequence] = field(default_factory=list)
    # n > 1 and sequences 1..n-1 wait for sequence 0 to finish the prompt, to share its KV blocks.
    children_pending: bool = False
    first_scheduled_time: float | None = None    # time.monotonic() of its first step
    num_cached_tokens: int = 0                   # prompt tokens the prefix cache gave sequence 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        _require(len(self.prompt_token_ids) > 0, "prompt must contain at least one token")

    @property
    def is_finished(self) -> bool:
        return bool(self.seqs) and all(seq.status is SequenceStatus.FINISHED for seq in self.seqs)


@dataclass(eq=False, slots=True)
class Sequence:
    """One completion choice. Compared by identity: two sequences are never 'equal'."""

    seq_id: int                      # unique within the scheduler that made it
    request: Request
    index: int                       # 0..n-1 within the request (the OpenAI choice index)
    token_ids: list[int] = field(init=False)      # prompt + generated
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0     # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # prefix-cache names of its full blocks
    num_named_blocks: int = 0        # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
