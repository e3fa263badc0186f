"""Helpers shared by the engine-level tests (fixtures live in conftest.py beside this file)."""

from __future__ import annotations

from pathlib import Path

import torch

from moeserve.llm import LLM
from moeserve.models.config import MoEModelConfig
from moeserve.worker.model_runner import kv_bytes_per_block

TINY_VOCAB = 320                 # tests/checkpoints.py vocab_size
LARGE_KV = 64 * 2**20            # bytes: far more than any test here can use


def make_llm(model_dir: Path, **overrides) -> LLM:
    args = dict(dtype="float32", kv_cache_memory=LARGE_KV, seed=0)
    args.update(overrides)
    return LLM(str(model_dir), **args)


def kv_bytes_for_blocks(model_dir: Path, num_blocks: int, block_size: int = 16) -> int:
    """kv_cache_memory that buys exactly num_blocks fp32 KV blocks."""
    cfg = MoEModelConfig.from_dir(Path(model_dir))
    return num_blocks * kv_bytes_per_block(cfg, block_size, torch.float32)


def random_prompts(lengths, seed: int = 0, vocab: int = TINY_VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers. The explicit attention mask matters: without it
    generate() masks every prompt token equal to pad_token_id (0 here) as padding."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def load_hf(model_dir: Path):
    import transformers as hf
    model = hf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None     # run to max_new_tokens, like ignore_eos
    return model
