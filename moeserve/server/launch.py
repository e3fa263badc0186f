"""Builds the engine and the app, and runs uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

import uvicorn
from sse_starlette.sse import AppStatus

from moeserve.config import EngineConfig, ServerConfig
from moeserve.engine.engine import Engine
from moeserve.errors import MoEServeError
from moeserve.metrics import Metrics
from moeserve.server.app import create_app
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.handlers import ServerContext
from moeserve.server.serving import ServedModel

log = logging.getLogger("moeserve")
_GIL_SWITCH_INTERVAL_S = 0.0005   # see serve()


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
    if engine_cfg.node_rank > 0:
        return _serve_worker_node(engine_cfg)
    # The port is taken before the model loads: a busy port fails at once, and the sockets that
    # expert-parallel ranks open while starting cannot land on it (seen: gloo took the free port
    # a test had picked, and uvicorn's bind then failed).
    sock = bind_socket(server_cfg.host, server_cfg.port)
    ctx = build_context(engine_cfg, server_cfg)
    app = create_app(ctx, api_key=server_cfg.api_key, max_body_bytes=server_cfg.max_body_bytes,
                     metrics=ctx.engine.metrics, start_engine=False)
    log.info("serving %s on http://%s:%d", ctx.served.name, server_cfg.host, sock.getsockname()[1])
    config = uvicorn.Config(app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
                            timeout_graceful_shutdown=server_cfg.shutdown_timeout)
    # sse-starlette ends every open stream as soon as uvicorn sees SIGTERM; a drain must let the
    # running requests finish (uvicorn cancels whatever is left after --shutdown-timeout).
    AppStatus.disable_automatic_graceful_drain()
    server = uvicorn.Server(config)
    # HTTP runs in a thread and the engine loop in the main thread (see AsyncEngine.run_loop).
    # Signals reach the main thread only: they ask uvicorn to drain (a second SIGINT forces it).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: _request_exit(server, signum))
    http = threading.Thread(target=_run_http, args=(server, ctx, sock), name="moeserve-http")
    # The engine thread drops the GIL inside every torch op and needs it back after each one;
    # with CPython's default 5 ms switch interval a busy HTTP thread (16 streams' SSE chunks a
    # step) kept it that long. 0.5 ms: int8 at 16 streams 252 -> 264 tok/s (two alternating
    # pairs of servers in one run, bench shape).
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    _exit_if_stuck_after_failure(ctx)
    try:
        http.start()
        ctx.engine.run_loop()          # returns once the HTTP thread has shut down (or the engine failed)
        if ctx.engine.error is not None:
            server.should_exit = True  # the engine died: stop serving, exit non-zero
        http.join()
    finally:
        ctx.engine.engine.close()      # expert-parallel workers
    return 1 if ctx.engine.error is not None or not server.started else 0


def _exit_if_stuck_after_failure(ctx: ServerContext, grace_s: float = 5.0) -> None:
    """A dead expert-parallel worker normally fails the step in flight; should a collective hang
    instead, the process must still end (non-zero, workers killed) rather than serve nothing."""
    executor = ctx.engine.engine.executor
    wake = executor.on_failure

    def on_failure() -> None:
        wake()
        threading.Thread(target=guard, name="moeserve-failure-guard", daemon=True).start()

    def guard() -> None:
        if not ctx.engine.wait_stopped(grace_s):
            log.critical("the engine loop did not stop %.0f s after a worker failure; exiting", grace_s)
            executor.kill_workers()
            os._exit(1)

    executor.on_failure = on_failure


def _serve_worker_node(cfg: EngineConfig) -> int:
    """Multi-node expert parallelism, nodes 1..nnodes-1: ranks only; node 0 serves HTTP."""
    from moeserve.engine.parallel_setup import rendezvous_for_node, threads_per_rank
    from moeserve.parallel.worker import run_worker_node
    from moeserve.worker.device import resolve_device
    device = resolve_device(cfg.device)
    log.info("node %d of %d: ranks of --ep-size %d, rendezvous at %s:%d", cfg.node_rank, cfg.nnodes,
             cfg.ep_size, cfg.master_addr, cfg.master_port)
    return run_worker_node(rendezvous_for_node(cfg, cfg.ep_size, device), threads_per_rank(cfg, cfg.ep_size, device))


def _request_exit(server: uvicorn.Server, signum: int) -> None:
    if server.should_exit and signum == signal.SIGINT:
        server.force_exit = True
    server.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (uvicorn serves it; connections queue until then).
    Listening, not just bound: another socket with SO_REUSEADDR may bind a merely bound port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise MoEServeError(f"--host {host} --port {port}: cannot listen there ({exc})") from None
    return sock


def _run_http(server: uvicorn.Server, ctx: ServerContext, sock: socket.socket) -> None:
    try:
        server.run(sockets=[sock])
    finally:
        ctx.engine.stop(timeout=0)  # ends the engine loop in the main thread
