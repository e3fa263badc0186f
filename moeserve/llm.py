"""Offline API: LLM(model_dir, **engine_args).generate(prompts, sampling_params)."""

from __future__ import annotations

import itertools
from typing import Sequence, Union

from moeserve.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.engine.outputs import RequestOutput
from moeserve.request import SamplingParams

Prompt = Union[str, list[int]]


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops expert-parallel worker processes (they also exit with this process)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Runs every prompt to completion, batched together; results in the prompts' order."""
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        order = []
        try:
            for prompt, sp in zip(prompts, params):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, self._token_ids(prompt), sp)
                order.append(request_id)
        except Exception:
            # One bad prompt rejects the call: withdraw the ones already queued, or they would
            # run (unseen) inside the next generate() call.
            for request_id in order:
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[r] for r in order]

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)


def _as_list(prompts) -> list:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return list(params)
