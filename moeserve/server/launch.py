"""Builds the engine and the app, and runs uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import signal

import uvicorn
from sse_starlette.sse import AppStatus

from moeserve.config import EngineConfig, ServerConfig
from moeserve.engine.engine import Engine
from moeserve.metrics import Metrics
from moeserve.server.app import create_app
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.handlers import ServerContext
from moeserve.server.serving import ServedModel

log = logging.getLogger("moeserve")


def build_context(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> ServerContext:
    engine = Engine(engine_cfg)
    name = server_cfg.served_model_name or engine.model_dir.name
    served = ServedModel(name=name, max_model_len=engine.scheduler.max_seq_len,
                         vocab_size=engine.model_config.vocab_size)
    metrics = Metrics(engine, name, server_cfg.expert_metrics)
    engine.model.count_experts = server_cfg.expert_metrics != "off"
    return ServerContext(AsyncEngine(engine, server_cfg.max_queue, metrics), served, engine.tokenizer)


def serve(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> int:
    logging.basicConfig(level=server_cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = build_context(engine_cfg, server_cfg)
    app = create_app(ctx, api_key=server_cfg.api_key, max_body_bytes=server_cfg.max_body_bytes,
                     metrics=ctx.engine.metrics)
    log.info("serving %s on http://%s:%d", ctx.served.name, server_cfg.host, server_cfg.port)
    config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
                            timeout_graceful_shutdown=server_cfg.shutdown_timeout)
    # sse-starlette ends every open stream as soon as uvicorn sees SIGTERM; a drain must let the
    # running requests finish (uvicorn cancels whatever is left after --shutdown-timeout).
    AppStatus.disable_automatic_graceful_drain()
    # Once it has shut down, uvicorn re-raises the signal it caught, which would kill the process
    # with that signal; a finished drain is a clean exit, so that re-raised signal is ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)
    uvicorn.Server(config).run()
    return 1 if ctx.engine.error is not None else 0


def _ignore_signal(_signum, _frame) -> None:
    pass
