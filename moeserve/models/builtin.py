"""The small built-in model used when no --model is given, and the writer of random Mixtral
checkpoints it shares with scripts/make_bench_model.py.

Checkpoints are written by transformers itself (MixtralForCausalLM.save_pretrained), so the
files have the real hub layout (per-expert `block_sparse_moe.experts.N.w1/w2/w3` tensors) and
moeserve's loader is exercised exactly as with a downloaded Mixtral. Same spec -> same bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

from moeserve.cache import default_cache_dir
from moeserve.models.tokenizer_builder import BOS, PAD, build_tokenizer, eos_token_ids

logger = logging.getLogger(__name__)

BUILTIN_NAME = "builtin-v1"  # bump the suffix whenever BUILTIN_SPEC or the corpus changes
# The files that must exist for a checkpoint directory to count as complete.
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class CheckpointSpec:
    """Sizes and seed of a random Mixtral checkpoint."""

    hidden: int
    layers: int
    experts: int
    top_k: int
    intermediate: int
    heads: int
    kv_heads: int
    # Model vocab; None = the trained tokenizer's size rounded up to a multiple of 64.
    vocab_size: int | None
    tokenizer_vocab: int  # target size for BPE training (reached only if the corpus allows)
    max_positions: int = 4096
    dtype: str = "float32"  # torch dtype name: "float32" or "bfloat16"
    seed: int = 0
    init_std: float = 0.02  # as HF initializer_range

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, experts={self.experts}]")
        if self.heads % self.kv_heads or self.hidden % self.heads:
            raise ValueError("heads must divide hidden and kv_heads must divide heads")


# ~14M parameters in float32 (57 MB): written in about a second.
BUILTIN_SPEC = CheckpointSpec(
    hidden=256, layers=4, experts=8, top_k=2, intermediate=512, heads=8, kv_heads=2,
    vocab_size=None, tokenizer_vocab=2048, dtype="float32", seed=1234,
)


def is_complete_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_builtin_model(cache_dir: Path | None = None) -> Path:
    """Return the built-in checkpoint directory, creating it on first use.

    Built in a private temp dir beside the target and renamed into place: rename is atomic, so
    concurrent callers never see a half-written directory and the first one to finish wins.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / BUILTIN_NAME
    if is_complete_checkpoint(final):
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but is not a complete checkpoint; delete it to rebuild")
    root.mkdir(parents=True, exist_ok=True)
    logger.info("creating the built-in model in %s", final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}.tmp-", dir=root))
    try:
        write_mixtral_checkpoint(tmp, BUILTIN_SPEC)
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only on failure or a lost race
    logger.info("built-in model ready in %.1f s", time.perf_counter() - start)
    return final


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a finished checkpoint into place unless another process already did."""
    # mkdtemp makes the dir 0700 and save_pretrained writes the safetensors file 0600; make the
    # cache readable like any other, e.g. by a server running as another user.
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
    try:
        os.rename(tmp, final)
    except OSError:
        # A non-empty target makes rename fail: another process won the race.
        if not is_complete_checkpoint(final):
            raise


def write_mixtral_checkpoint(out_dir: Path, spec: CheckpointSpec) -> int:
    """Write a random Mixtral checkpoint with tokenizer and chat template; return its
    parameter count. out_dir may exist; files already in it are overwritten."""
    tokenizer = build_tokenizer(spec.tokenizer_vocab, spec.max_positions)
    vocab = spec.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    bos, pad = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(PAD)
    eos_ids = eos_token_ids(tokenizer)
    config = _mixtral_config(spec, vocab, bos, eos_ids[0], pad)
    model = _random_model(config, spec)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos_ids, pad_token_id=pad
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # One shard whatever the size: a stable file list, and sizes here are at most a few GB.
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100GB")
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def _mixtral_config(spec: CheckpointSpec, vocab: int, bos: int, eos: int, pad: int):
    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype=spec.dtype,
    )


@torch.no_grad()
def _random_model(config: MixtralConfig, spec: CheckpointSpec) -> MixtralForCausalLM:
    """Build on the meta device and fill in place: HF's default init of a 0.5B model is slow,
    and building in float32 first would double peak memory for bf16 checkpoints.
    For saving only: to_empty leaves non-persistent buffers (rotary inv_freq) uninitialised."""
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model = model.to(getattr(torch, spec.dtype)).to_empty(device="cpu")
    # A private generator: seeded and deterministic without touching torch's global RNG.
    gen = torch.Generator().manual_seed(spec.seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.fill_(1.0)  # RMSNorm weights (Mixtral has no biases)
        else:
            param.normal_(0.0, spec.init_std, generator=gen)
    return model
