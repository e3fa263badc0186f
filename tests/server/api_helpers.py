"""Helpers for the HTTP API tests: live server subprocesses, in-process servers, SSE parsing and
the OpenAI error-object check. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import httpx
import pytest

from moeserve.config import EngineConfig, ServerConfig

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-moeserve-test"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = float(os.environ.get("MOESERVE_TEST_STARTUP_TIMEOUT", "120"))
# float32: these tests compare batched against alone token for token, which bf16 rounding breaks
COMMON_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A `python -m moeserve.cli serve` subprocess; its output goes to a log quoted on failure."""

    def __init__(self, name: str, model_dir: Path, cache_dir: Path, log_dir: Path, flags: list[str]) -> None:
        self.name, self.model_dir, self.cache_dir, self.flags = name, model_dir, cache_dir, flags
        self.log_path = log_dir / f"{name}.log"
        self._port_retries = 3
        self._spawn()

    def _spawn(self) -> None:
        """Starts the server on a port free at this moment (another socket may still take it
        before the server binds: ready() then starts it again on a new one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "moeserve.cli", "serve", str(self.model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), *COMMON_ARGS, *self.flags]
        env = {**os.environ, "MOESERVE_CACHE": str(self.cache_dir), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MOESERVE_API_KEY", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._ready = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "LiveServer":
        """Waits for /health 200; fails with the server's output if it dies or never gets there."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                if "Address already in use" in self.log() and self._port_retries > 0:
                    self._port_retries -= 1     # the port was taken between free_port() and bind
                    self._spawn()
                    continue
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self._ready = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                pass
            if not self._ready:
                if time.monotonic() > deadline:
                    pytest.fail(f"server {self.name} not healthy after {timeout:.0f} s:\n{self.log()}")
                time.sleep(0.2)
        return self

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after timeout; returns the exit code."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------- in-process servers

def build_inproc_context(model_dir: Path, **engine_overrides):
    from moeserve.server.launch import build_context
    engine_cfg = EngineConfig(model=str(model_dir), kv_cache_memory=64 << 20, max_model_len=MAX_MODEL_LEN,
                              **engine_overrides)
    return build_context(engine_cfg, ServerConfig())


def blocks_of(ctx):
    return ctx.engine.engine.scheduler.blocks


def all_blocks_free(ctx) -> bool:
    blocks = blocks_of(ctx)
    return blocks.num_free_blocks == blocks.num_blocks


def wait_blocks_free(ctx, timeout: float = 1.0) -> float:
    """Seconds until every KV block is free again; fails after timeout."""
    start = time.monotonic()
    while not all_blocks_free(ctx):
        if time.monotonic() - start > timeout:
            blocks = blocks_of(ctx)
            pytest.fail(f"{blocks.num_blocks - blocks.num_free_blocks} KV blocks still allocated "
                        f"{timeout} s later")
        time.sleep(0.005)
    return time.monotonic() - start


@dataclass
class InProcServer:
    """The real app under uvicorn in a thread of this process; `ctx` reaches into the engine."""

    ctx: object
    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_inproc_server(ctx, **app_kwargs) -> InProcServer:
    import uvicorn

    from moeserve.server.app import create_app
    port = free_port()
    app_kwargs.setdefault("metrics", ctx.engine.metrics)      # as `moeserve serve` builds it
    config = uvicorn.Config(create_app(ctx, **app_kwargs), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)      # not the main thread: uvicorn installs no signal handlers
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the in-process uvicorn did not start")
        time.sleep(0.02)
    return InProcServer(ctx, f"http://127.0.0.1:{port}", server, thread)


# ---------------------------------------------------------------- checks

def assert_error(response: httpx.Response, status: int, *, param: object = ...,
                 contains: str | None = None) -> dict:
    """The status, and exactly OpenAI's error object {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] == status, error
    assert error["param"] is None or isinstance(error["param"], str), error
    if param is not ...:
        assert error["param"] == param, error
    if contains is not None:
        assert contains in error["message"], error
    return error


def sse_data(lines: Iterable[str]) -> list[str]:
    """The `data:` payloads of an SSE stream, in order (pings, comments and blank lines dropped)."""
    return [line[len("data:"):].strip() for line in lines if line.startswith("data:")]


def sse_chunks(events: list[str]) -> list[dict]:
    """JSON chunks of a complete stream: `data: [DONE]` exactly once, and last."""
    assert events and events[-1] == "[DONE]", events[-3:]
    assert events.count("[DONE]") == 1, events
    return [json.loads(e) for e in events[:-1]]


def stream_raw(client: httpx.Client, url: str, body: dict, headers: dict | None = None) -> list[str]:
    with client.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_data(response.iter_lines())
