"""What the engine hands back each step: per request, what each of its sequences produced."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.request import FinishReason


@dataclass(slots=True)
class CompletionOutput:
    index: int                                   # choice index within the request
    text: str = ""                               # all text so far
    token_ids: list[int] = field(default_factory=list)   # all generated ids so far
    delta_text: str = ""                         # text new in this step
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict] = field(default_factory=list)  # per new token: token_id, logprob, top
    logprobs: list[dict] | None = None           # all of them (offline API), when asked for
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None         # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None    # time.monotonic(), for the queue-time metric

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
