"""`moeserve serve --ep-size 2` end to end: the OpenAI client, /metrics across ranks, and a worker
killed mid-traffic (health 503 within 5 s, clients get errors, the server exits non-zero, no
process left behind)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.api_helpers import LiveServer

openai = pytest.importorskip("openai")

PROMPTS = ["The expert", "Tokens travel to", "A mixture of", "Hello"]


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory) -> Path:
    from moeserve.models.builtin import ensure_builtin_model
    return ensure_builtin_model(tmp_path_factory.mktemp("ep_cache"))


@pytest.fixture(scope="module")
def servers(builtin_dir, tmp_path_factory):
    """One rank, and two ranks in each dispatch mode, started together."""
    logs = tmp_path_factory.mktemp("ep_logs")
    cache = builtin_dir.parent
    flags = {"ep1": [], "alltoall": ["--ep-size", "2", "--ep-dispatch", "alltoall"],
             "allreduce": ["--ep-size", "2", "--ep-dispatch", "allreduce"]}
    started = {name: LiveServer(f"ep-{name}", builtin_dir, cache, logs, f) for name, f in flags.items()}
    try:
        yield {name: server.ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.terminate()
        for server in started.values():
            server.stop()


def _completions(server: LiveServer) -> list[str]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = []
    for prompt in PROMPTS:
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                        max_tokens=16, temperature=0.0)
        texts.append(out.choices[0].text)
    return texts


def _expert_series(server: LiveServer, name: str) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^moeserve_{name}_total(\{{[^}}]*\}}) (\S+)$", text, re.M)}


def test_openai_client_gets_the_one_rank_answers(servers):
    reference = _completions(servers["ep1"])
    for mode in ("alltoall", "allreduce"):
        assert _completions(servers[mode]) == reference, mode
    # streaming chat through the official client; every server gets the same requests, so the
    # metrics test below can compare their expert counts
    answers = {}
    for name, server in servers.items():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        chat = [{"role": "user", "content": "Say hello."}]
        whole = client.chat.completions.create(model=model, messages=chat, max_tokens=12, temperature=0.0)
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=chat, max_tokens=12, temperature=0.0, stream=True) if c.choices]
        assert "".join(pieces) == whole.choices[0].message.content
        answers[name] = whole.choices[0].message.content
    assert answers["alltoall"] == answers["allreduce"] == answers["ep1"]


def test_metrics_count_every_rank_experts(servers):
    time.sleep(1.0)     # totals are published when the engine goes idle
    reference = _expert_series(servers["ep1"], "expert_tokens")
    for mode in ("alltoall", "allreduce"):
        got = _expert_series(servers[mode], "expert_tokens")
        assert got == reference, mode      # the same requests were routed the same way
        ranks = _expert_series(servers[mode], "rank_expert_tokens")
        assert set(ranks) == {'{rank="0"}', '{rank="1"}'}
        assert all(v > 0 for v in ranks.values())


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent and int(entry.name) not in found:
                    found.add(int(entry.name))
                    todo.append(int(entry.name))
    return found


def _worker_pids(pid: int) -> list[int]:
    pids = []
    for child in _descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(child)
        except OSError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stream(url: str, errors: list, started: threading.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                started.set()
                if line.startswith("data:") and '"error"' in line:
                    errors.append(line)
                    return
        errors.append("ended without an error event")
    except httpx.HTTPError as exc:
        errors.append(repr(exc))


# SIGKILL: the watchdog sees the dead process. SIGSTOP: the worker is alive but silent, so only the
# collective timeout (--ep-timeout 3) can notice; health must turn within that plus 5 s.
@pytest.mark.parametrize("mode, busy, sig, timeout", [("alltoall", True, signal.SIGKILL, 120),
                                                      ("allreduce", False, signal.SIGKILL, 120),
                                                      ("alltoall", True, signal.SIGSTOP, 3)])
def test_lost_worker_ends_the_server(builtin_dir, tmp_path, mode, busy, sig, timeout):
    server = LiveServer(f"kill-{mode}", builtin_dir, builtin_dir.parent, tmp_path,
                        ["--ep-size", "2", "--ep-dispatch", mode, "--ep-timeout", str(timeout)]).ready()
    try:
        workers = _worker_pids(server.proc.pid)
        assert len(workers) == 1, f"expected one worker process, found {workers}"
        family = _descendants(server.proc.pid)
        errors: list = []
        threads = []
        if busy:
            started = threading.Event()
            threads = [threading.Thread(target=_stream, args=(server.url, errors, started)) for _ in range(3)]
            for t in threads:
                t.start()
            assert started.wait(60), "no stream started"
            time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(workers[0], sig)
        limit = 5.0 if sig == signal.SIGKILL else timeout + 5.0
        unhealthy = None
        while time.monotonic() - killed_at < limit and unhealthy is None:
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 503:
                    unhealthy = time.monotonic() - killed_at
            except httpx.TransportError:
                unhealthy = time.monotonic() - killed_at    # already gone: not serving either
            time.sleep(0.05)
        assert unhealthy is not None, f"health never turned 503 within {limit:.0f} s:\n{server.log()}"
        code = server.proc.wait(timeout=30)
        assert code != 0
        for t in threads:
            t.join(30)
        assert len(errors) == len(threads) and all("ended without" not in e for e in errors), errors
        time.sleep(0.5)
        left = [pid for pid in family if _alive(pid)]
        assert not left, f"processes left behind: {left}"
    finally:
        server.stop()
        for pid in _worker_pids(server.proc.pid) if server.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)


def test_two_nodes_rendezvous_like_torchrun(builtin_dir, tmp_path):
    """--nnodes 2 on one machine: node 1 runs rank 1 (no HTTP), node 0 serves; a SIGTERM to node 0
    shuts both down cleanly."""
    import subprocess
    import sys

    from tests.server.api_helpers import COMMON_ARGS, REPO, free_port

    master_port = free_port()
    common = ["--ep-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log1 = open(tmp_path / "node1.log", "wb")
    node1 = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", str(builtin_dir), *COMMON_ARGS,
                              *common, "--node-rank", "1"], cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    node0 = LiveServer("node0", builtin_dir, builtin_dir.parent, tmp_path, [*common, "--node-rank", "0"])
    try:
        node0.ready()
        assert node1.poll() is None, (tmp_path / "node1.log").read_text()
        assert _completions(node0) and _expert_series(node0, "rank_expert_tokens").get('{rank="1"}', 0) > 0
        assert node0.stop() == 0
        assert node1.wait(timeout=30) == 0, (tmp_path / "node1.log").read_text()
    finally:
        node0.stop()
        if node1.poll() is None:
            node1.kill()
        log1.close()
