"""Session-cached tiny checkpoints (written by transformers' save_pretrained) for the model tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: the shared checkpoint helpers
from checkpoints import write_checkpoint  # noqa: E402

MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> MakeCheckpoint:
    """make_checkpoint(name, arch, **write_checkpoint kwargs) -> dir, written once per session per name.

    Callers treat the returned directory as read-only (copy it before corrupting it).
    """
    cache: dict[str, Path] = {}

    def make(name: str, arch: str, **kwargs) -> Path:
        if name not in cache:
            cache[name] = write_checkpoint(tmp_path_factory.mktemp(name), arch, **kwargs)
        return cache[name]

    return make

