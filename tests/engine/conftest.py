"""Shared fixtures for the engine-level tests: tiny checkpoints of every architecture (written once
per session), the built-in model (it has a tokenizer), and a shared engine.
Helpers (engine builders, random prompts, the transformers reference) are in engine_helpers.py.

Engines are cheap to build over a tiny checkpoint (~50 ms), so a test that needs special settings
(a small KV cache, a small token budget) makes its own; the plain ones share `mixtral_llm`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ has no __init__.py: make `tests.checkpoints` importable however pytest is started.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.checkpoints import ARCHITECTURES, write_checkpoint  # noqa: E402
from tests.engine.engine_helpers import make_llm  # noqa: E402

from moeserve.llm import LLM  # noqa: E402



@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {arch: write_checkpoint(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def mixtral_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["mixtral"]


@pytest.fixture(scope="session")
def mixtral_llm(mixtral_dir) -> LLM:
    """One shared engine for tests that leave it empty when they finish."""
    return make_llm(mixtral_dir, max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory) -> Path:
    from moeserve.models.builtin import ensure_builtin_model
    return ensure_builtin_model(cache_dir=tmp_path_factory.mktemp("builtin_cache"))
