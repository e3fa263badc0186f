"""Host-side totals of what the engine did, read by metrics at scrape time (never per token).

Expert loads are not here: they accumulate on the device inside the forward pass
(MoEDecoder.expert_tokens) and are read at scrape time.
"""

from __future__ import annotations

from moeserve.engine.batch import ScheduledBatch


class StepStats:
    def __init__(self) -> None:
        self.steps = 0
        self.tokens = 0              # tokens run through the model (prefill chunks + decodes)
        self.busy_seconds = 0.0

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        if batch.is_empty:
            return
        self.steps += 1
        self.tokens += batch.num_tokens
        self.busy_seconds += seconds
