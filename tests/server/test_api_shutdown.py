"""SIGTERM drains: a running stream finishes completely, new connections are refused, and the
process exits with code 0 within --shutdown-timeout."""

from __future__ import annotations

import signal
import time

import httpx

from tests.server.api_helpers import sse_chunks, sse_data


def test_sigterm_lets_running_streams_finish(drain_server):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", drain_server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            head = [next(lines) for _ in range(4)]              # two events: generation is under way
            drain_server.proc.send_signal(signal.SIGTERM)
            assert _refuses_connections(drain_server.url, within=3.0)
            events = sse_data(head + list(lines))
    chunks = sse_chunks(events)
    *deltas, usage = chunks
    assert usage["usage"]["completion_tokens"] == 200
    assert [c["choices"][0]["finish_reason"] for c in deltas if c["choices"][0]["finish_reason"]] == ["length"]
    assert drain_server.proc.wait(timeout=20) == 0, drain_server.log()


def _refuses_connections(url: str, within: float) -> bool:
    """uvicorn closes its listening socket a moment after the signal (it polls a flag every 0.1 s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False
