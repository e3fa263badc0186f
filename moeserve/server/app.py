"""The FastAPI application: routes, OpenAI error objects, API key, body-size limit."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve import __version__
from moeserve.server.async_engine import EngineDeadError, QueueFullError
from moeserve.server.handlers import ServerContext, create_chat_completion, create_completion
from moeserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/version", "/metrics")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over max_bytes, by header or by bytes received."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        received, too_large = 0, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                too_large = True
                raise _TooLarge()
            return message

        async def guarded_send(message):
            # FastAPI turns any error raised while reading the body into its own 400; drop that
            # response and send the 413 below instead.
            if not too_large:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if too_large:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        response = _error(413, f"request body is larger than the limit of {self.max_bytes} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(ctx: ServerContext, api_key: str | None = None, max_body_bytes: int = 16 << 20,
               metrics=None, start_engine: bool = True) -> FastAPI:
    """start_engine: the app's lifespan runs the engine loop in a thread; False when the caller
    runs it (moeserve serve runs it in the main thread)."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if start_engine:
            ctx.engine.start()
        yield
        ctx.engine.stop()

    app = FastAPI(title="moeserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    _install_errors(app)
    if api_key:
        _install_auth(app, api_key)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if metrics is not None:   # added last: outermost, so it sees 401 and 413 too
        _install_error_counter(app, metrics)
    _install_routes(app, ctx, metrics)
    return app


def _install_error_counter(app: FastAPI, metrics) -> None:
    @app.middleware("http")
    async def count_errors(request: Request, call_next):
        response = await call_next(request)
        if response.status_code >= 400:
            metrics.errors.labels(status=str(response.status_code)).inc()
        return response


def _install_auth(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith(OPEN_PATHS) or request.method == "OPTIONS":
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")
        return await call_next(request)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        # Unknown routes (404) and methods (405), malformed bodies: OpenAI error objects too.
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        return _error(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}", loc[0] if loc else None)

    @app.exception_handler(QueueFullError)
    async def queue_full(_request: Request, exc: QueueFullError):
        return _error(429, str(exc))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_request: Request, exc: EngineDeadError):
        return _error(500, f"the engine failed: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal server error ({type(exc).__name__})")


async def _unless_disconnected(raw: Request, handler: Awaitable):
    """Runs a handler, cancelling it if the client goes away first: a non-streaming request is
    then aborted (freeing its KV blocks) instead of generating for nobody. Streaming responses
    return at once; sse-starlette watches for their disconnects."""
    work = asyncio.ensure_future(handler)
    watch = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        return Response(status_code=499)   # nginx's "client closed request"; nobody reads it
    return work.result()


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":   # the body is already read
        pass


def _install_routes(app: FastAPI, ctx: ServerContext, metrics) -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await _unless_disconnected(raw, create_completion(req, ctx))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await _unless_disconnected(raw, create_chat_completion(req, ctx))

    @app.get("/v1/models")
    async def models():
        served = ctx.served
        return ModelList(data=[ModelCard(id=served.name, root=served.name, max_model_len=served.max_model_len)])

    @app.get("/health")
    async def health():
        if not ctx.engine.is_alive:
            return _error(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_route():
        if metrics is None:
            return PlainTextResponse("", media_type="text/plain; version=0.0.4")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
