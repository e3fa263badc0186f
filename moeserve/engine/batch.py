"""The one contract between the scheduler (plain Python) and the model runner (tensors).

A ScheduledBatch lists, for each sequence that takes part in this step, the slice of its tokens
to run (a prefill chunk or a single decode token), where they sit in the sequence, and the KV
blocks that hold the sequence. Everything here is plain ints and lists: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeserve.request import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    seq_id: int                      # unique per sequence (a request with n > 1 has n sequences)
    token_ids: list[int]             # the tokens to run this step: a prefill chunk, or 1 decode token
    start_pos: int                   # position of token_ids[0]; == tokens already in the KV cache
    block_table: list[int]           # KV block ids covering positions [0, start_pos + len(token_ids))
    sample: bool                     # True when this chunk reaches the sequence end: sample a token
    sampling: "SamplingParams"
    output_token_ids: list[int]      # tokens generated so far (penalties); shared list, read only
    prompt_token_ids: list[int]      # the prompt (repetition penalty); shared list, read only
    seed_offset: int = 0             # sequence index within its request, mixes into a seeded generator


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    num_tokens: int                  # sum of len(s.token_ids)
    block_size: int

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class SeqOutput:
    seq_id: int
    token_id: int
    logprob: float | None = None                     # of the sampled token, when asked for
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class StepOutput:
    outputs: list[SeqOutput]                          # one per ScheduledSeq with sample=True, in order
