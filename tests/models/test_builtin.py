"""The built-in model and the bench-model writer: deterministic, atomic, loadable by transformers.

Every test writes under pytest tmp dirs (cache_dir argument), never the user's real cache.
"""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, MixtralForCausalLM

from moeserve.models.builtin import (
    BUILTIN_NAME,
    BUILTIN_SPEC,
    REQUIRED_FILES,
    CheckpointSpec,
    default_cache_dir,
    ensure_builtin_model,
    publish_dir,
    write_mixtral_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
CREATE_SNIPPET = "from moeserve.models.builtin import ensure_builtin_model as e; import sys; " \
                 "print(e(sys.argv[1]))"


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("cache_a"))


@pytest.fixture(scope="module")
def raced_cache(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two fresh processes (different hash seeds) creating the model in one cache at once."""
    root = tmp_path_factory.mktemp("cache_b")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_SNIPPET, str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        for seed in (1, 2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return root, [out.strip() for out, _ in outs]


def read_tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_created_twice_is_byte_identical(builtin_dir, raced_cache):
    root, _ = raced_cache
    first, second = read_tree(builtin_dir), read_tree(root / BUILTIN_NAME)
    assert sorted(first) == sorted(second)
    assert set(REQUIRED_FILES) | {"tokenizer_config.json", "chat_template.jinja"} <= set(first)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two creations"


def test_concurrent_creation_publishes_one_complete_dir(raced_cache):
    root, printed = raced_cache
    assert printed == [str(root / BUILTIN_NAME)] * 2
    assert [p.name for p in root.iterdir()] == [BUILTIN_NAME]  # no temp dirs left behind


def test_second_call_reuses_without_rewriting(builtin_dir):
    before = {p: p.stat().st_mtime_ns for p in builtin_dir.iterdir()}
    start = time.perf_counter()
    assert ensure_builtin_model(builtin_dir.parent) == builtin_dir
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in builtin_dir.iterdir()} == before


def test_incomplete_existing_dir_is_an_error(tmp_path):
    (tmp_path / BUILTIN_NAME).mkdir()
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ensure_builtin_model(tmp_path)


def test_publish_dir_losing_the_race_keeps_the_winner(tmp_path):
    winner, loser = tmp_path / "final", tmp_path / "tmp"
    for d, text in ((winner, "winner"), (loser, "loser")):
        d.mkdir()
        for name in REQUIRED_FILES:
            (d / name).write_text(text)
    publish_dir(loser, winner)
    assert (winner / "config.json").read_text() == "winner"


def test_default_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESERVE_CACHE", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MOESERVE_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "moeserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "moeserve"


def test_config_and_generation_config(builtin_dir):
    config = AutoConfig.from_pretrained(builtin_dir)
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    assert config.model_type == "mixtral"
    assert config.hidden_size == BUILTIN_SPEC.hidden
    assert config.num_hidden_layers == BUILTIN_SPEC.layers
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)
    assert config.tie_word_embeddings is False
    gen = GenerationConfig.from_pretrained(builtin_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.eos_token_id == [tokenizer.eos_token_id, im_end]
    assert gen.bos_token_id == tokenizer.bos_token_id and gen.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_chat_template_and_multibyte_text(builtin_dir):
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen == prompt.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    for text in ("café naïve résumé", "日本語のテキスト 你好", "emoji 😀🚀 ❤️", "unseen: ⅞ ʬ 𝔘"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.unk_token_id not in tokenizer.encode(text)


def test_checkpoint_has_hub_layout_per_expert_tensors(builtin_dir):
    with safe_open(builtin_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    for layer in range(BUILTIN_SPEC.layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert f"{prefix}.gate.weight" in keys
        for expert in range(BUILTIN_SPEC.experts):
            assert {f"{prefix}.experts.{expert}.{w}.weight" for w in ("w1", "w2", "w3")} <= keys


def test_transformers_loads_and_generates(builtin_dir):
    model, info = MixtralForCausalLM.from_pretrained(builtin_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.isfinite(model(**inputs).logits).all()


def test_bf16_checkpoint_with_padded_vocab(tmp_path):
    spec = CheckpointSpec(hidden=64, layers=1, experts=4, top_k=2, intermediate=32, heads=4,
                          kv_heads=2, vocab_size=32000, tokenizer_vocab=32000, dtype="bfloat16")
    n_params = write_mixtral_checkpoint(tmp_path, spec)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.vocab_size == 32000 and config.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(tmp_path)) < 32000
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == n_params


def test_bench_script_refuses_non_empty_dir_and_writes_small_model(tmp_path, capsys):
    script = runpy.run_path(str(REPO / "scripts" / "make_bench_model.py"), run_name="bench_script")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert script["main"]([str(tmp_path / "full")]) == 2
    small = ["--hidden", "64", "--layers", "1", "--intermediate", "32", "--heads", "4",
             "--kv-heads", "2", "--experts", "4"]
    assert script["main"]([str(tmp_path / "out"), *small]) == 0
    assert "parameters" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "out").num_local_experts == 4
