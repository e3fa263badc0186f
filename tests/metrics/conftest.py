"""Fixtures for the metrics tests: the built-in model in a private cache, and a metrics parser."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ has no __init__.py: make `tests.checkpoints` importable however pytest is started.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


@pytest.fixture(scope="session")
def metrics_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metrics_moeserve_cache")


@pytest.fixture(scope="session")
def builtin_model_dir(metrics_cache_dir) -> Path:
    from moeserve.models.builtin import ensure_builtin_model
    return ensure_builtin_model(metrics_cache_dir)

