"""FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2 / Qwen3-*-FP8 layout: float8_e4m3fn
weights with a float32 `weight_scale_inv` per block) load dequantized and match transformers;
float8 weights without their scales, and every other quantization_config, are refused.

References: transformers running the FP8 checkpoint dequantized by tests/fp8_checkpoints.py's
block loop (any block size), and transformers' own FP8 loader (block sizes that divide every
weight: it refuses partial blocks).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file

from checkpoints import hf_config, hf_model
from fp8_checkpoints import (FP8, SCALES_FILE, dequantize_blocks, quantize_state, read_checkpoint,
                             set_quantization_config, write_dequantized, write_fp8_checkpoint)
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq
from moeserve.errors import CheckpointError
from moeserve.models import loader
from moeserve.models.config import MoEModelConfig
from moeserve.models.loader import load_model
from moeserve.models.weight_conversion import dequantize_fp8_blocks
from moeserve.worker.model_runner import ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from quant_quality import teacher_forced_compare  # noqa: E402

FP8_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                     "minimax_m2", "gpt_oss", "llama4")
# Divides some weight dims (96, 48 rows; 80 cols) and not others (64, 32, 128 rows; 64, 96, 48
# cols): whole blocks, and partial ones at the bottom and right edges.
EDGE_BLOCK = (24, 20)
WHOLE_BLOCK = (16, 16)      # divides every weight dim: what transformers' own FP8 loader accepts
# ... except DeepSeek's MLA dims (q_lora_rank 20, latent 24 + 8, kv_b 4 * (16 + 12) rows)
WHOLE_BLOCKS = {"deepseek_v2": (8, 8), "deepseek_v3": (4, 4)}
ATOL = 1e-4
BLOCK_SIZE, NUM_BLOCKS = 16, 8
# test_int8.py's workload and thresholds (int8 on the plain checkpoints, room for CPUs without
# VNNI). Measured here, mean KL int8-from-FP8 vs the dequantized float model: mixtral 1.7e-3,
# qwen2_moe 6.5e-4, qwen3_moe 8.7e-4, olmoe 4.9e-4 (the same as int8 from the dequantized
# checkpoint); scales shifted by one block (the control): 0.16, 0.14, 0.065, 0.071.
from test_int8 import F32, INT8, MAX_MEAN_KL, MIN_TOP1, WORKLOAD  # noqa: E402
# gpt_oss: int8-from-FP8 4.1e-3 (int8 alone 1.9e-3), shifted scales 0.12
# transformers' FP8 loader replaces nn.Linear layers only: GptOssExperts' fused 3-D parameters
# would be read as raw float8 values with their scale_inv left unused, so it is no reference there.
# The same for Llama 4 (its load report lists the fused experts' *_scale_inv as UNEXPECTED).
HF_FP8_LOADER_UNSUPPORTED = ("gpt_oss", "llama4")


def _load(directory: Path, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    return load_model(directory, dtype, progress=False, **kwargs)


@pytest.fixture(scope="module")
def make_fp8(tmp_path_factory):
    """make_fp8(arch, block, max_shard_size=None) -> (FP8 dir, dequantized float32 dir), cached.

    Callers treat both as read-only (copy before damaging)."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(arch: str, block: tuple[int, int], max_shard_size: str | None = None) -> tuple[Path, Path]:
        key = (arch, block, max_shard_size)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"fp8_{arch}")
            fp8 = write_fp8_checkpoint(hf_model(hf_config(arch)), root / "fp8", block, max_shard_size)
            cache[key] = fp8, write_dequantized(fp8, root / "dequantized", block)
        return cache[key]

    return make


@pytest.fixture()
def broken(tmp_path, make_fp8) -> Path:
    """A private copy of the Mixtral FP8 checkpoint, for a test to damage."""
    return Path(shutil.copytree(make_fp8("mixtral", EDGE_BLOCK)[0], tmp_path / "ckpt"))


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@torch.inference_mode()
def _greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """One prefill, then greedy decodes through the paged cache -> (prompt + steps + 1 tokens,
    logits [steps + 1, V] that chose the generated ones)."""
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    table = list(range(NUM_BLOCKS))[::-1]          # not 0, 1, 2...: paging mistakes show
    tokens, chunk, rows = list(prompt), list(prompt), []
    for _ in range(steps + 1):
        seq = ScheduledSeq(1, chunk, len(tokens) - len(chunk), table, True, None, [], [])
        rows.append(runner.forward_logits(ScheduledBatch([seq], len(chunk), BLOCK_SIZE))[0])
        chunk = [int(rows[-1].argmax())]
        tokens += chunk
    return tokens, torch.stack(rows)


def _check_greedy_parity(ours: torch.nn.Module, ref: torch.nn.Module, prompt_len: int = 21, steps: int = 6) -> None:
    prompt = torch.randint(0, ours.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    tokens, logits = _greedy(ours, prompt.tolist(), steps)
    with torch.no_grad():
        expected = ref(torch.tensor([tokens[:-1]])).logits[0, prompt_len - 1:].float()   # [steps + 1, V]
    diff = (logits - expected).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g}"
    assert tokens[prompt_len:] == expected.argmax(-1).tolist()


# --- dequantize_fp8_blocks against the block-by-block reference ---------------------------------

@pytest.mark.parametrize("shape", [(48, 80), (40, 50), (7, 5), (3, 33, 17), (2, 3, 16, 40)], ids=str)
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_dequantize_fp8_blocks_matches_block_loop(shape, fp8_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    block = (16, 20)
    q = (torch.randn(shape, generator=gen) * 100).to(fp8_dtype)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = torch.exp(torch.empty(grid).uniform_(-7, 7, generator=gen))    # 1e-3 .. 1e3: every block differs
    expected = dequantize_blocks(q, scale, block)
    got = dequantize_fp8_blocks(q, scale, block, torch.float32)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)
    assert torch.equal(dequantize_fp8_blocks(q, scale, block, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (4, 3), (1, 3, 3), (3,)], ids=str)
def test_dequantize_fp8_blocks_refuses_mis_shaped_scales(shape) -> None:
    q = torch.zeros(40, 50, dtype=FP8)                    # with (16, 20) blocks: scales (3, 3)
    assert dequantize_fp8_blocks(q, torch.ones(3, 3), (16, 20), torch.float32).shape == (40, 50)
    with pytest.raises(CheckpointError, match=r"tensor 'w\.weight' has shape \(40, 50\).*must have shape \(3, 3\)"):
        dequantize_fp8_blocks(q, torch.ones(shape), (16, 20), torch.float32, name="w.weight")


# --- FP8 checkpoints against transformers --------------------------------------------------------

@pytest.mark.parametrize("arch", FP8_ARCHITECTURES)
def test_fp8_checkpoint_matches_dequantized_transformers(make_fp8, arch) -> None:
    """Partial edge blocks; prefill then greedy decodes: logits within 1e-4, the same tokens."""
    fp8, dequantized = make_fp8(arch, EDGE_BLOCK)
    edges = [name for name, t in read_checkpoint(fp8).items()
             if t.dtype == FP8 and t.shape[-2] % EDGE_BLOCK[0] and t.shape[-1] % EDGE_BLOCK[1]]
    assert edges, "the checkpoint must have weights with partial blocks at both edges"
    ref = hf.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    _check_greedy_parity(_load(fp8), ref)


@pytest.mark.parametrize("arch", FP8_ARCHITECTURES)
def test_fp8_checkpoint_matches_transformers_fp8_loader(make_fp8, arch) -> None:
    """transformers dequantizes the FP8 checkpoint itself (on CPU it always dequantizes)."""
    pytest.importorskip("accelerate")              # transformers' FP8 loader needs it
    if arch in HF_FP8_LOADER_UNSUPPORTED:
        pytest.skip(f"transformers' FP8 loader does not dequantize {arch}'s fused expert parameters")
    fp8, _ = make_fp8(arch, WHOLE_BLOCKS.get(arch, WHOLE_BLOCK))
    ref = hf.AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
    assert ref.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    _check_greedy_parity(_load(fp8), ref)


def test_fp8_loads_as_its_dequantized_twin(make_fp8) -> None:
    """Parameter by parameter, exactly (pack=False), in float32 and cast to bf16."""
    fp8, dequantized = make_fp8("qwen2_moe", EDGE_BLOCK)
    for dtype in (torch.float32, torch.bfloat16):
        ours = dict(_load(fp8, dtype, pack=False).named_parameters())
        twin = dict(_load(dequantized, dtype, pack=False).named_parameters())
        assert ours.keys() == twin.keys()
        for name, param in twin.items():
            assert ours[name].dtype == dtype and torch.equal(ours[name], param), name


def test_sharded_fp8_checkpoint_with_scales_in_other_shards(make_fp8) -> None:
    single, _ = make_fp8("mixtral", EDGE_BLOCK)
    sharded, _ = make_fp8("mixtral", EDGE_BLOCK, "50KB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    scales = [n for n in weight_map if n.endswith("_scale_inv")]
    assert len(set(weight_map.values())) > 3 and scales
    assert all(weight_map[n] == SCALES_FILE != weight_map[n.removesuffix("_scale_inv")] for n in scales)
    ours = dict(_load(sharded, pack=False).named_parameters())
    want = dict(_load(single, pack=False).named_parameters())
    assert ours.keys() == want.keys()
    for name, param in want.items():
        assert torch.equal(ours[name], param), name


def test_fused_3d_expert_tensors_dequantize_only_owned_experts(tmp_path, monkeypatch) -> None:
    """Stacked experts on disk (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) with
    3-D scales [E, ceil(rows/b0), ceil(cols/b1)]: a rank dequantizes only its own experts."""
    model = hf_model(hf_config("qwen3_moe"))
    model.save_pretrained(tmp_path)           # config.json; the weights are replaced below
    tensors = quantize_state(dict(model.state_dict()), EDGE_BLOCK)     # in memory, the experts are fused
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_scale_inv"].shape == (8, 4, 4)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    set_quantization_config(tmp_path, {"quant_method": "fp8", "weight_block_size": list(EDGE_BLOCK)})
    rows = []
    original = loader.dequantize_fp8_blocks
    monkeypatch.setattr(loader, "dequantize_fp8_blocks",
                        lambda w, *args: rows.append((args[-1], w.shape[0])) or original(w, *args))
    part = _load(tmp_path, pack=False, first_expert=2, num_local_experts=4)
    assert {n: e for n, e in rows if ".experts." in n} == {
        f"model.layers.{i}.mlp.experts.{w}": 4 for i in range(3) for w in ("gate_up_proj", "down_proj")}
    for i, layer in enumerate(part.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for ours, theirs in ((layer.moe.experts.w13, "gate_up_proj"), (layer.moe.experts.w2, "down_proj")):
            want = dequantize_blocks(tensors[prefix + theirs], tensors[prefix + theirs + "_scale_inv"], EDGE_BLOCK)
            assert torch.equal(ours, want[2:6]), (i, theirs)


@pytest.mark.parametrize("arch", FP8_ARCHITECTURES)
def test_int8_from_fp8_checkpoint(make_fp8, tmp_path, arch) -> None:
    """--quantization int8 on an FP8 checkpoint: the dequantized float32 weights are what int8
    quantizes, so it is exactly int8 on the dequantized checkpoint, and as close to it as int8 is."""
    fp8, dequantized = make_fp8(arch, EDGE_BLOCK)
    prompt = list(range(3, 20))
    tokens, logits = _greedy(_load(fp8, **INT8), prompt, 4)
    plain_tokens, plain_logits = _greedy(_load(dequantized, **INT8), prompt, 4)
    assert tokens == plain_tokens and torch.equal(logits, plain_logits)
    got = teacher_forced_compare(dequantized, F32, INT8, **WORKLOAD, test_dir=fp8)
    print(f"{arch} int8 from FP8: mean KL {got['mean_kl']:.3g} top-1 {got['top1']:.1f}%")
    assert got["mean_kl"] < MAX_MEAN_KL[arch] and got["top1"] > MIN_TOP1
    # The bound can fail: scales shifted by one block column (a block-mapping bug) are caught.
    shifted = Path(shutil.copytree(fp8, tmp_path / "shifted"))
    _rewrite(shifted / "model.safetensors", lambda t: t.update(
        {n: torch.roll(s, 1, dims=-1) for n, s in t.items() if n.endswith("_scale_inv")}))
    bad = teacher_forced_compare(dequantized, F32, F32, **WORKLOAD, test_dir=shifted)
    assert bad["mean_kl"] > MAX_MEAN_KL[arch] and bad["top1"] < MIN_TOP1


# --- refusals -------------------------------------------------------------------------------------

def test_float8_weight_without_its_scale_is_refused(broken) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(broken / "model.safetensors", lambda t: t.pop(f"{name}_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is torch.float8_e4m3fn but its scales "
                                              rf"'{name}_scale_inv' are missing.*garbage"):
        _load(broken)


def test_float8_weights_without_quantization_config_are_refused(broken) -> None:
    """The old behaviour: FP8 values loaded as if they were the weights, scales ignored."""
    set_quantization_config(broken, None)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is "
                                              r"torch\.float8_e4m3fn but config\.json has no fp8 quantization_config"):
        _load(broken)


def test_other_float8_dtypes_are_refused(broken) -> None:
    name = "model.layers.2.self_attn.o_proj.weight"
    _rewrite(broken / "model.safetensors", lambda t: t.__setitem__(name, t[name].float().to(torch.float8_e4m3fnuz)))
    with pytest.raises(CheckpointError, match=rf"'{name}' is torch\.float8_e4m3fnuz, which moeserve cannot load"):
        _load(broken)


def test_mis_shaped_scale_is_refused(broken) -> None:
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"     # [64, 96]: scales (3, 5)
    _rewrite(broken / "model.safetensors", lambda t: t.__setitem__(f"{name}_scale_inv", torch.ones(3, 4)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \(64, 96\).*must have shape \(3, 5\)"):
        _load(broken)


OTHER_QUANT = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized"},
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8"},    # mxfp4 is loaded since gpt-oss (test_mxfp4.py)
}


@pytest.mark.parametrize("method", sorted(OTHER_QUANT))
def test_other_quant_methods_are_refused_by_name(broken, method) -> None:
    raw = json.loads((broken / "config.json").read_text())
    raw["quantization_config"] = OTHER_QUANT[method]
    with pytest.raises(CheckpointError, match=rf"quant_method '{method}' is not supported"):
        MoEModelConfig.from_hf(raw)
    set_quantization_config(broken, OTHER_QUANT[method])
    with pytest.raises(CheckpointError, match=rf"config\.json: quantization_config\.quant_method '{method}'"):
        _load(broken)


@pytest.mark.parametrize("block", [None, [128], [0, 128], "128x128"])
def test_fp8_without_block_size_is_refused(broken, block) -> None:
    """Per-tensor / per-channel FP8 (no weight_block_size) is another format: refused, not guessed."""
    qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if block is not None:
        qcfg["weight_block_size"] = block
    set_quantization_config(broken, qcfg)
    with pytest.raises(CheckpointError, match=r"weight_block_size is"):
        _load(broken)
