"""Fixtures for the HTTP API tests: live `moeserve serve` subprocesses and in-process servers.

Live servers are real subprocesses over the built-in model, built once per session in a temp
MOESERVE_CACHE. Each takes ~10 s to import torch and load, so every live server the selected
tests need is spawned at once when the first server test starts; each fixture then waits only
for its own /health. Helpers are in api_helpers.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

# tests/ has no __init__.py: make `tests.server.api_helpers` importable however pytest is started.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.server.api_helpers import API_KEY, LiveServer  # noqa: E402

# fixture name -> extra `moeserve serve` flags
SERVER_FLAGS: dict[str, list[str]] = {
    "live_server": [],
    "auth_server": ["--api-key", API_KEY],
    # One running sequence and one waiting request: a third concurrent request gets 429.
    "queue_server": ["--max-num-seqs", "1", "--max-queue", "1"],
    # Used up by the SIGTERM test.
    "drain_server": ["--shutdown-timeout", "20"],
}
_WANTED = pytest.StashKey[set]()


def pytest_collection_modifyitems(config, items):
    """Remember which live servers the selected tests use, so that only those are started."""
    wanted: set[str] = set()
    for item in items:
        wanted |= set(getattr(item, "fixturenames", ())) & set(SERVER_FLAGS)
    config.stash[_WANTED] = wanted



@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moeserve_cache")


@pytest.fixture(scope="session")
def builtin_dir(cache_dir) -> Path:
    from moeserve.models.builtin import ensure_builtin_model
    return ensure_builtin_model(cache_dir)


@pytest.fixture(scope="session")
def builtin_tokenizer(builtin_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(builtin_dir))


@pytest.fixture(scope="session", autouse=True)
def server_pool(request, tmp_path_factory) -> Iterator[Callable[[str], LiveServer]]:
    """Spawns, up front, every live server the selected tests use; stops them all at the end."""
    wanted = request.config.stash.get(_WANTED, set(SERVER_FLAGS))
    pool: dict[str, LiveServer] = {}
    log_dir = tmp_path_factory.mktemp("server_logs")

    def get(name: str) -> LiveServer:
        if name not in pool:
            model_dir = request.getfixturevalue("builtin_dir")
            cache = request.getfixturevalue("cache_dir")
            pool[name] = LiveServer(name, model_dir, cache, log_dir, SERVER_FLAGS[name])
        return pool[name]

    for name in sorted(wanted):
        get(name)
    yield get
    for server in pool.values():     # all at once: each takes a second or two to exit
        server.terminate()
    for server in pool.values():
        server.stop()


@pytest.fixture(scope="session")
def live_server(server_pool) -> LiveServer:
    return server_pool("live_server").ready()


@pytest.fixture(scope="session")
def auth_server(server_pool) -> LiveServer:
    return server_pool("auth_server").ready()


@pytest.fixture(scope="session")
def queue_server(server_pool) -> LiveServer:
    return server_pool("queue_server").ready()


@pytest.fixture(scope="session")
def drain_server(server_pool) -> LiveServer:
    return server_pool("drain_server").ready()
