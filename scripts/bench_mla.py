"""MLA on a DeepSeek-V2-Lite-shaped model: KV bytes per token, latent vs expanded, and decode speed
with the absorbed vs the expanded decode, alternated in one process on the same sequences.

    python scripts/bench_mla.py /tmp/bench/dsv2lite --make-model     # writes the model first
    python scripts/bench_mla.py /tmp/bench/dsv2lite --batches 1,16 --context 512

The model keeps DeepSeek-V2-Lite's attention exactly (16 heads, kv_lora_rank 512, no q_lora,
qk_nope 128, qk_rope 64, v_head 128, YaRN) and its expert shape (moe_intermediate 1408, 2 shared
experts, top-6, first layer dense), with fewer layers and experts so it fits this machine.
Random weights (transformers' own initialisation) written by transformers' save_pretrained.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moeserve import LLM, SamplingParams
from moeserve.layers.mla import MLAttention
from moeserve.models.config import MoEModelConfig

V2_LITE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2,
               num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0,
               max_position_embeddings=16384, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                    original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707,
                                    beta_fast=32, beta_slow=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--make-model", action="store_true", help="write the bench model to MODEL first")
    p.add_argument("--layers", type=int, default=4, help="with --make-model (V2-Lite: 27)")
    p.add_argument("--experts", type=int, default=16, help="with --make-model (V2-Lite: 64)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=512, help="prompt tokens of each sequence")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=3, help="absorbed / expanded alternations")
    return p.parse_args(argv)


def make_model(path: Path, layers: int, experts: int) -> None:
    import transformers as hf
    cfg = hf.DeepseekV2Config(**V2_LITE, num_hidden_layers=layers, n_routed_experts=experts)
    torch.manual_seed(0)
    model = hf.DeepseekV2ForCausalLM(cfg).to(torch.bfloat16)
    model.config.architectures = ["DeepseekV2ForCausalLM"]
    model.save_pretrained(path)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")


def kv_bytes(cfg: MoEModelConfig, elem: int) -> tuple[int, int]:
    """Per token over all layers: the latent row MLA caches, and per-head K and V expanded."""
    mla = cfg.mla
    expanded = cfg.num_heads * (mla.qk_head_dim + mla.v_head_dim)
    return cfg.num_layers * mla.latent_dim * elem, cfg.num_layers * expanded * elem


def set_absorb(llm: LLM, absorb: bool) -> None:
    for module in llm.engine.model.modules():
        if isinstance(module, MLAttention):
            module.absorb = absorb


def start_decoding(llm: LLM, batch: int, context: int, max_tokens: int) -> None:
    g = torch.Generator().manual_seed(batch)
    vocab = llm.engine.model_config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
        llm.engine.add_request(f"b{batch}-{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                       ignore_eos=True))
    while any(len(s.output_token_ids) == 0 for s in llm.engine.scheduler.running) or llm.engine.scheduler.waiting:
        llm.engine.step()


def timed_steps(llm: LLM, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    return (time.perf_counter() - start) / steps


def bench_batch(llm: LLM, batch: int, args: argparse.Namespace) -> dict[bool, float]:
    total = 2 * args.rounds * args.steps + 4
    start_decoding(llm, batch, args.context, total)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for absorb in ((True, False) if r % 2 == 0 else (False, True)):
            set_absorb(llm, absorb)
            llm.engine.step()                                   # warm this form
            times[absorb].append(timed_steps(llm, args.steps))
    set_absorb(llm, True)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    return {form: batch / statistics.median(ts) for form, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[int, dict[bool, float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.model)
    if args.make_model:
        make_model(path, args.layers, args.experts)
    cfg = MoEModelConfig.from_dir(path)
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(str(path), dtype=args.dtype, max_num_seqs=max(batches),
              max_num_batched_tokens=max(2048, args.context), seed=0)
    elem = llm.engine.runner.kv_caches.element_size()
    latent, expanded = kv_bytes(cfg, elem)
    print(f"KV bytes per token ({llm.engine.dtype}, {cfg.num_layers} layers): latent {latent:,}  "
          f"expanded K+V {expanded:,}  ({expanded / latent:.1f}x)")
    print(f"decode tok/s at context {args.context}, median of {args.rounds} rounds x {args.steps} steps")
    results = {}
    for batch in batches:
        speed = results[batch] = bench_batch(llm, batch, args)
        print(f"  batch {batch:3d}: absorbed {speed[True]:7.1f}  expanded {speed[False]:7.1f}  "
              f"absorbed/expanded {speed[True] / speed[False]:.2f}x")
    return results


if __name__ == "__main__":
    main()
