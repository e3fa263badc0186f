"""Host-side totals of what the engine did, read by metrics at scrape time (never per token)."""

from __future__ import annotations

from moeserve.engine.batch import ScheduledBatch, StepOutput


class StepStats:
    def __init__(self, num_moe_layers: int, num_experts: int) -> None:
        self.expert_tokens = [[0] * num_experts for _ in range(num_moe_layers)]   # [layers][experts]
        self.expert_dropped = [[0] * num_experts for _ in range(num_moe_layers)]
        self.steps = 0
        self.tokens = 0
        self.busy_seconds = 0.0

    def observe(self, batch: ScheduledBatch, output: StepOutput, seconds: float) -> None:
        if batch.is_empty:
            return
        self.steps += 1
        self.tokens += batch.num_tokens
        self.busy_seconds += seconds
        _accumulate(self.expert_tokens, output.expert_counts)
        _accumulate(self.expert_dropped, output.dropped_counts)


def _accumulate(totals: list[list[int]], step: list[list[int]] | None) -> None:
    if step is None:
        return
    for row, add in zip(totals, step):
        for e, n in enumerate(add):
            row[e] += n
