"""How far --quantization int8 moves the model's next-token distributions, teacher-forced.

    python scripts/quant_quality.py /path/to/model [--dtype auto] [--prompts 64] [--json out.json]
    python scripts/quant_quality.py --arch-test-models          # tests/checkpoints.py, every arch

Random prompts (fixed seed) are extended by greedy tokens of the unquantized reference model; then
the reference and each variant score the same full sequences, one prefill per sequence, and the
next-token distributions are compared at every position of the generated part (and at all
positions): mean and max KL(ref || variant) in float64, and top-1 agreement. Variants: int8 (lm_head
in full precision, --no-quantize-lm-head), int8 with its lm_head (the default), and, on a CPU with
bf16 instructions, plain bf16 against float32 as a yardstick for what "close" means. `--schemes weight-only,q8_0` adds other int8
schemes simulated in float (scripts/int8_schemes.py): weight-only int8, and llama.cpp's Q8_0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from int8_schemes import SCHEMES, load_simulated
from moeserve.cpu_features import cpu_has_fast_bf16
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq
from moeserve.models.config import MoEModelConfig
from moeserve.models.loader import load_model
from moeserve.worker.device import resolve_dtype
from moeserve.worker.model_runner import ModelRunner

BLOCK = 16
CPU = torch.device("cpu")


def load(model_dir: Path, kwargs: dict) -> torch.nn.Module:
    """kwargs: load_model's (dtype, quantization, quantize_lm_head, pack)."""
    return load_model(model_dir, device=CPU, progress=False, **kwargs)


def random_prompts(vocab: int, num: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 2000), (num, length), generator=gen)    # [N, P]


def _runner(model: torch.nn.Module, num_seqs: int, length: int) -> tuple[ModelRunner, int]:
    blocks = -(-length // BLOCK)                                   # per sequence
    return ModelRunner(model, num_seqs * blocks, BLOCK, model.embed.weight.dtype, CPU), blocks


@torch.inference_mode()
def greedy_extend(model: torch.nn.Module, prompts: torch.Tensor, gen_len: int) -> torch.Tensor:
    """prompts [N, P] -> [N, P + gen_len]: all prompts batched, one prefill then gen_len - 1 decodes."""
    n, p = prompts.shape
    runner, blocks = _runner(model, n, p + gen_len)
    seqs = prompts.tolist()
    step, start = [list(s) for s in seqs], [0] * n
    for _ in range(gen_len):
        batch = ScheduledBatch([ScheduledSeq(i, step[i], start[i], list(range(i * blocks, (i + 1) * blocks)),
                                             True, None, [], []) for i in range(n)],
                               sum(map(len, step)), BLOCK)
        next_ids = runner.forward_logits(batch).argmax(-1).tolist()               # [N]
        for i, tok in enumerate(next_ids):
            start[i] += len(step[i])
            step[i] = [tok]
            seqs[i].append(tok)
    return torch.tensor(seqs)                                                      # [N, P + G]


@torch.inference_mode()
def score(model: torch.nn.Module, runner: ModelRunner, seq: torch.Tensor) -> torch.Tensor:
    """seq [L] -> float32 logits [L, V]: the next-token logits at every position, one prefill."""
    batch = ScheduledBatch([ScheduledSeq(0, seq.tolist(), 0, list(range(runner.num_blocks)),
                                         True, None, [], [])], len(seq), BLOCK)
    step = runner.prepare(batch)
    return model.compute_logits(model(step.input_ids, step.meta, runner.kv_caches))


def divergence(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, V] x2 -> (KL(ref || test) [L] float64, top-1 equal [L] bool)."""
    lp, lq = ref.double().log_softmax(-1), test.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1), ref.argmax(-1) == test.argmax(-1)


def summarize(kl: torch.Tensor, agree: torch.Tensor) -> dict:
    return dict(mean_kl=kl.mean().item(), max_kl=kl.max().item(),
                top1=100.0 * agree.double().mean().item(), positions=kl.numel())


def compare_models(pairs: dict[str, tuple], seqs: torch.Tensor, prompt_len: int) -> dict[str, dict]:
    """pairs: name -> (ref model, test model); seqs [N, L]. Each model scores each sequence once."""
    runners = {id(m): _runner(m, 1, seqs.shape[1])[0] for pair in pairs.values() for m in pair}
    models = {id(m): m for pair in pairs.values() for m in pair}
    stats = {name: ([], []) for name in pairs}
    for seq in seqs:
        logits = {key: score(models[key], runners[key], seq) for key in models}    # [L, V] each
        for name, (ref, test) in pairs.items():
            kl, agree = divergence(logits[id(ref)], logits[id(test)])
            stats[name][0].append(kl)
            stats[name][1].append(agree)
    out = {}
    for name, (kls, agrees) in stats.items():
        kl, agree = torch.stack(kls), torch.stack(agrees)                         # [N, L]
        gen = slice(prompt_len - 1, seqs.shape[1] - 1)       # rows predicting the generated tokens
        out[name] = dict(summarize(kl[:, gen], agree[:, gen]), all=summarize(kl, agree))
    return out


def teacher_forced_compare(model_dir, ref_kwargs: dict, test_kwargs: dict, num_prompts: int = 64,
                           prompt_len: int = 32, gen_len: int = 32, seed: int = 0, test_dir=None) -> dict:
    """-> dict(mean_kl, max_kl, top1 (%), positions) over the generated part, and `all` positions.
    test_dir: load the test model from another checkpoint (e.g. a perturbed one, as a control)."""
    ref, test = load(Path(model_dir), ref_kwargs), load(Path(test_dir or model_dir), test_kwargs)
    prompts = random_prompts(ref.cfg.vocab_size, num_prompts, prompt_len, seed)
    seqs = greedy_extend(ref, prompts, gen_len)
    return compare_models({"test": (ref, test)}, seqs, prompt_len)["test"]


def model_dir_report(model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, dict]:
    """All variants of one model dir: name -> compare_models stats."""
    cfg = MoEModelConfig.from_dir(model_dir)
    ref_dtype = resolve_dtype(dtype, cfg.dtype, CPU)
    name = str(ref_dtype).replace("torch.", "")
    ref = load(model_dir, dict(dtype=ref_dtype, pack=False))
    int8 = load(model_dir, dict(dtype=ref_dtype, quantization="int8"))
    pairs = {f"int8 vs {name}": (ref, int8)}
    pairs[f"int8+lm_head vs {name}"] = (ref, load(model_dir, dict(dtype=ref_dtype, quantization="int8",
                                                                   quantize_lm_head=True)))
    for scheme in args.schemes:
        pairs[f"{scheme} int8, simulated, vs {name}"] = (ref, load_simulated(model_dir, ref_dtype, scheme))
    if cpu_has_fast_bf16():
        f32 = ref if ref_dtype == torch.float32 else load(model_dir, dict(dtype=torch.float32, pack=False))
        bf16 = ref if ref_dtype == torch.bfloat16 else load(model_dir, dict(dtype=torch.bfloat16, pack=False))
        pairs["bf16 vs float32 (yardstick)"] = (f32, bf16)
    seqs = greedy_extend(ref, random_prompts(cfg.vocab_size, args.prompts, args.prompt_len, args.seed), args.gen_len)
    return compare_models(pairs, seqs, args.prompt_len)


def arch_test_models(out_root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import ARCHITECTURES, write_checkpoint
    return {arch: write_checkpoint(out_root / arch, arch) for arch in ARCHITECTURES}


def markdown(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | variant | mean KL | max KL | top-1 agreement | positions |", "|---|---|---|---|---|---|"]
    for model, variants in results.items():
        for variant, st in variants.items():
            for label, s in (("generated", st), ("all", st["all"])):
                lines.append(f"| {model} | {variant} | {s['mean_kl']:.3g} | {s['max_kl']:.3g} | "
                             f"{s['top1']:.2f}% | {label} {s['positions']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="*", type=Path, help="checkpoint directories")
    p.add_argument("--arch-test-models", action="store_true", help="tests/checkpoints.py's tiny models too")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--schemes", default="", help=f"comma list of simulated int8 schemes to add: {','.join(SCHEMES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if not args.model and not args.arch_test_models:
        p.error("give a model directory or --arch-test-models")
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = sorted(set(args.schemes) - set(SCHEMES))
    if unknown:
        p.error(f"--schemes: unknown {', '.join(unknown)}; choose from {', '.join(SCHEMES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {str(d): d for d in args.model}
        if args.arch_test_models:
            dirs.update(arch_test_models(Path(tmp)))
        for name, model_dir in dirs.items():
            results[name] = model_dir_report(model_dir, args.dtype, args)
            print(markdown({name: results[name]}).split("\n", 2)[2], file=sys.stderr, flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
