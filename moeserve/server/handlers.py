"""/v1/completions and /v1/chat/completions: validate, submit, then respond whole or as SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from moeserve.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from moeserve.server.protocol import (
    MAX_LOGPROBS, APIError, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionChunk, CompletionRequest,
    CompletionResponse, CompletionStreamChoice, DeltaMessage, error_body, now, random_id)
from moeserve.server.serving import (
    LogprobFormatter, ServedModel, check_model, check_token_ids, finish_reason, merged, render_chat,
    sampling_params, submit_all, usage)

log = logging.getLogger(__name__)


@dataclass
class ServerContext:
    engine: AsyncEngine
    served: ServedModel
    tokenizer: object | None


@dataclass
class _Job:
    """One accepted OpenAI request: its engine streams and what the response needs."""

    id: str
    created: int
    model: str
    n: int
    prompt_lens: list[int]
    streams: list[RequestStream]
    include_usage: bool


def _tokenize_prompts(prompt, ctx: ServerContext) -> list[list[int]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        if any(not t for t in texts):
            raise APIError(400, "prompt must not be empty", "prompt")
        prompts = [ctx.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompts = prompt
    else:
        prompts = [prompt]
    for ids in prompts:
        check_token_ids(ids, ctx.served)
    return prompts


async def _submit(ctx: ServerContext, prefix: str, req, prompts: list[list[int]], max_tokens, logprobs) -> _Job:
    params = [sampling_params(req, len(p), ctx.served, max_tokens, logprobs) for p in prompts]
    job_id = random_id(prefix)
    try:
        streams = await submit_all(ctx.engine, job_id, prompts, params)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _Job(job_id, now(), ctx.served.name, req.n, [len(p) for p in prompts], streams, include_usage)


async def create_completion(req: CompletionRequest, ctx: ServerContext):
    check_model(req.model, ctx.served)
    if req.echo:
        raise APIError(400, "echo is not supported", "echo")
    job = await _submit(ctx, "cmpl", req, _tokenize_prompts(req.prompt, ctx), req.max_tokens, req.logprobs)
    fmt = LogprobFormatter(ctx.tokenizer)
    if req.stream:
        return EventSourceResponse(_sse(_completion_chunks(job, fmt, req.logprobs is not None), ctx), ping=15)
    finals = await _collect(job)
    choices = [CompletionChoice(index=i * job.n + o.index, text=o.text, finish_reason=finish_reason(o),
                                stop_reason=o.stop_reason,
                                logprobs=fmt.completion(o.logprobs) if o.logprobs is not None else None)
               for i, out in enumerate(finals) for o in out.outputs]
    return CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                              usage=usage(job.prompt_lens, finals))


async def create_chat_completion(req: ChatCompletionRequest, ctx: ServerContext):
    check_model(req.model, ctx.served)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}",
                       "top_logprobs")
    ids = render_chat(ctx.tokenizer, req)
    check_token_ids(ids, ctx.served)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = await _submit(ctx, "chatcmpl", req, [ids], max_tokens, logprobs)
    fmt = LogprobFormatter(ctx.tokenizer)
    if req.stream:
        return EventSourceResponse(_sse(_chat_chunks(job, fmt, logprobs is not None), ctx), ping=15)
    final = (await _collect(job))[0]
    choices = [ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                          finish_reason=finish_reason(o), stop_reason=o.stop_reason,
                          logprobs=fmt.chat(o.logprobs) if o.logprobs is not None else None)
               for o in final.outputs]
    return ChatCompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                  usage=usage(job.prompt_lens, [final]))


async def _collect(job: _Job) -> list:
    finals: list = [None] * len(job.streams)
    try:
        async for i, out in merged(job.streams):
            if out.finished:
                finals[i] = out
    except EngineDeadError as exc:
        raise APIError(500, f"the request failed: {exc}") from None
    return finals


def _dump(chunk: BaseModel) -> str:
    return chunk.model_dump_json(exclude={"usage"} if getattr(chunk, "usage", None) is None else set())


async def _sse(chunks: AsyncIterator[BaseModel], ctx: ServerContext) -> AsyncIterator[str]:
    """SSE data lines; an engine failure mid-stream becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield _dump(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure still ends the stream properly
        status, message = (exc.status, exc.message) if isinstance(exc, APIError) else (500, str(exc))
        if not isinstance(exc, (APIError, EngineDeadError)):
            log.exception("stream failed")
            message = f"internal server error ({type(exc).__name__})"
        if ctx.engine.metrics is not None:
            ctx.engine.metrics.errors.labels(status=str(status)).inc()
        yield json.dumps(error_body(status, message))
    yield "[DONE]"


async def _completion_chunks(job: _Job, fmt: LogprobFormatter, with_logprobs: bool):
    finals: list = [None] * len(job.streams)
    sent_finish: set[tuple[int, int]] = set()
    offsets: dict[tuple[int, int], int] = {}     # text_offset continues across chunks, as unstreamed
    async for i, out in merged(job.streams):
        for o in out.outputs:
            key = (i, o.index)
            if key in sent_finish or not (o.delta_token_ids or o.delta_text or o.finish_reason):
                continue
            if o.finish_reason is not None:
                sent_finish.add(key)
            lp = fmt.completion(o.delta_logprobs, offsets.get(key, 0)) if with_logprobs else None
            if lp is not None and lp.tokens:
                offsets[key] = lp.text_offset[-1] + len(lp.tokens[-1])
            yield CompletionChunk(id=job.id, created=job.created, model=job.model, choices=[
                CompletionStreamChoice(index=i * job.n + o.index, text=o.delta_text, logprobs=lp,
                                       finish_reason=finish_reason(o))])
        if out.finished:
            finals[i] = out
    if job.include_usage:
        yield CompletionChunk(id=job.id, created=job.created, model=job.model, choices=[],
                              usage=usage(job.prompt_lens, finals))


async def _chat_chunks(job: _Job, fmt: LogprobFormatter, with_logprobs: bool):
    def chunk(index: int, delta: DeltaMessage, reason=None, logprobs=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[
            ChatStreamChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)])

    for index in range(job.n):
        yield chunk(index, DeltaMessage(role="assistant", content=""))
    final = None
    sent_finish: set[int] = set()
    async for _, out in merged(job.streams):
        for o in out.outputs:
            if o.index in sent_finish or not (o.delta_token_ids or o.delta_text or o.finish_reason):
                continue
            lp = fmt.chat(o.delta_logprobs) if with_logprobs and o.delta_logprobs else None
            if o.finish_reason is not None:
                sent_finish.add(o.index)
            yield chunk(o.index, DeltaMessage(content=o.delta_text), finish_reason(o), lp)
        final = out if out.finished else final
    if job.include_usage:
        yield ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[],
                                  usage=usage(job.prompt_lens, [final]))
