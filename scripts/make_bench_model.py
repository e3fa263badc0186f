"""Write a random Mixtral-architecture checkpoint for benchmarks (default ~0.5B params, bf16).

    python scripts/make_bench_model.py DIR [--hidden 1024 --layers 8 --experts 8 ...]

The default shape is the one measured in /work/shared/FACTS.md (transformers and llama-server
numbers), so moeserve's throughput can be compared against them on the same weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moeserve.models.builtin import CheckpointSpec, write_mixtral_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="output directory (must be missing or empty)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", "--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=2048, help="expert FFN size")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000, help="model vocab (>= tokenizer size)")
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> CheckpointSpec:
    return CheckpointSpec(
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab_size=args.vocab,
        # Train as many merges as the corpus allows (about 2k); the rest of the vocab is padding.
        tokenizer_vocab=args.vocab,
        max_positions=args.max_positions,
        dtype=args.dtype,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        # Stale shards from an earlier run would be picked up by a loader globbing *.safetensors.
        print(f"error: DIR {args.dir} is not empty", file=sys.stderr)
        return 2
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    n_params = write_mixtral_checkpoint(args.dir, spec)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.dir}: {n_params:,} parameters ({n_params / 1e9:.3f} B), {args.dtype}, "
          f"in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
