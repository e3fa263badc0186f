"""Turns OpenAI requests into engine requests, and engine outputs into OpenAI responses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.request import SamplingParams
from moeserve.server.async_engine import AsyncEngine, RequestStream
from moeserve.server.protocol import (
    MAX_LOGPROBS, APIError, ChatCompletionRequest, ChatLogprobs, CompletionLogprobs, SamplingFields,
    PromptTokensDetails, TokenLogprob, TopLogprob, UsageInfo)


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    vocab_size: int


def check_model(requested: str | None, served: ServedModel) -> None:
    if requested is not None and requested != served.name:
        raise APIError(404, f"The model `{requested}` does not exist. Available: `{served.name}`.", "model")


def sampling_params(req: SamplingFields, prompt_len: int, served: ServedModel, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    """Builds SamplingParams, turning every invalid value into a 400 that names the parameter."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    limit = served.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                            f"has {prompt_len} tokens. Please reduce the length of the prompt.",
                       "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the length of the prompt or completion.", "max_tokens")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens if max_tokens is not None else limit - prompt_len,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0, seed=req.seed, stop=_stops(req.stop), stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos, logprobs=logprobs, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            skip_special_tokens=req.skip_special_tokens, min_tokens=req.min_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        raise APIError(400, str(exc), _param_of(str(exc))) from None


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _param_of(message: str) -> str | None:
    word = message.split(" ", 1)[0]
    return word if word.isidentifier() else None


def check_token_ids(ids: list[int], served: ServedModel) -> None:
    if not ids:
        raise APIError(400, "prompt must not be empty", "prompt")
    bad = next((t for t in ids if not 0 <= t < served.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {served.vocab_size})", "prompt")


def render_chat(tokenizer, req: ChatCompletionRequest) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    if not req.messages:
        raise APIError(400, "messages must not be empty", "messages")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                                             **(req.chat_template_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - template errors are the client's (bad roles, content)
        raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def finish_reason(out: CompletionOutput) -> str | None:
    return None if out.finish_reason is None else out.finish_reason.value


def usage(prompt_lens: list[int], finals: list[RequestOutput]) -> UsageInfo:
    """Usage of a job's finished requests (one per prompt), as OpenAI reports it."""
    completion = sum(len(o.token_ids) for final in finals for o in final.outputs)
    cached = PromptTokensDetails(cached_tokens=sum(final.num_cached_tokens for final in finals))
    return UsageInfo(prompt_tokens=sum(prompt_lens), completion_tokens=completion,
                     total_tokens=sum(prompt_lens) + completion, prompt_tokens_details=cached)


async def submit_all(engine: AsyncEngine, base_id: str, prompts: list[list[int]],
                     params: list[SamplingParams]) -> list[RequestStream]:
    """Adds every prompt's request; if one is refused, the accepted ones are aborted."""
    streams: list[RequestStream] = []
    try:
        for i, (ids, sp) in enumerate(zip(prompts, params)):
            streams.append(await engine.add_request(f"{base_id}-{i}", ids, sp))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several request streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def chat(self, entries: list[dict]) -> ChatLogprobs:
        content = []
        for e in entries:
            text = self.token(e["token_id"])
            top = [TopLogprob(token=self.token(t), logprob=lp, bytes=list(self.token(t).encode()))
                   for t, lp in (e["top"] or [])]
            content.append(TokenLogprob(token=text, logprob=e["logprob"], bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)

    def completion(self, entries: list[dict], offset: int = 0) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for e in entries:
            text = self.token(e["token_id"])
            result.tokens.append(text)
            result.token_logprobs.append(e["logprob"])
            result.top_logprobs.append({self.token(t): lp for t, lp in (e["top"] or [])})
            result.text_offset.append(offset)
            offset += len(text)
        return result
