"""Every preset in configs/ is a valid `moeserve serve --config` file."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.cli import build_parser, resolve_options

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_builds_valid_configs(path):
    engine, server = resolve_options(build_parser().parse_args(["serve", "--config", str(path)]))
    assert engine.max_num_seqs >= 1 and server.port >= 0


def test_expert_parallel_preset_reads_as_flags():
    path = next(p for p in CONFIGS if p.name == "expert-parallel.yaml")
    engine, _ = resolve_options(build_parser().parse_args(["serve", "--config", str(path), "--ep-size", "4"]))
    assert engine.ep_size == 4 and engine.ep_dispatch == "alltoall"   # the flag wins over the file


def test_int8_quantizes_the_lm_head_unless_told_not_to():
    def engine(*flags):
        return resolve_options(build_parser().parse_args(["serve", *flags]))[0]
    assert engine("--quantization", "int8").quantize_lm_head is True
    assert engine("--quantization", "int8", "--no-quantize-lm-head").quantize_lm_head is False
    assert engine().quantize_lm_head is False
