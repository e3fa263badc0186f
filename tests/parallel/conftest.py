"""Expert-parallel tests: tiny checkpoints of every architecture, engines over spawned gloo ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.checkpoints import ARCHITECTURES, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def ep_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ep_ckpts")
    return {arch: write_checkpoint(root / arch, arch) for arch in ARCHITECTURES}
