"""MXFP4 checkpoints (gpt-oss's layout: `mlp.experts.gate_up_proj_blocks` [E, 2I, H/32, 16] uint8,
two e2m1 values a byte, low nibble first, and `..._scales` [E, 2I, H/32] uint8 e8m0 exponents)
load dequantized and match transformers run on the dequantized float32 twin.

The quantizer here is the test's own few lines (nearest e2m1 value after dividing each 32-value
group by a power of two that brings its largest magnitude under 6); dequantization is checked
bit for bit against transformers' convert_moe_packed_tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from checkpoints import hf_config, hf_model
from test_fp8 import _greedy  # noqa: E402  (one prefill, then greedy decodes through the paged cache)
from moeserve.errors import CheckpointError
from moeserve.models import loader
from moeserve.models.config import CheckpointQuant, MoEModelConfig
from moeserve.models.loader import load_model
from moeserve.models.weight_conversion import dequantize_mxfp4

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])     # nibbles 0-7; bit 3 is the sign
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
ATOL = 1e-4
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                    "model.embed_tokens", "lm_head"]}



def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float (N a multiple of 32) -> (blocks [..., N/32, 16] uint8, scales [..., N/32] uint8)."""
    groups = weight.float().reshape(*weight.shape[:-1], -1, 32)                      # [..., G, 32]
    amax = groups.abs().amax(-1).clamp(min=2.0 ** -120)
    exponent = torch.ceil(torch.log2(amax / 6.0))                                     # amax / 2^e <= 6
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)                     # nearest e2m1
    nibbles = (magnitude + 8 * (scaled < 0)).to(torch.uint8)                          # [..., G, 32]
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)                           # low nibble first
    return blocks, (exponent + 127).to(torch.uint8)


def reference_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' own dequantization of [E, R, G, 16] -> [E, R, G * 32] (it returns [E, G*32, R])."""
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)


def write_mxfp4(model: torch.nn.Module, out_dir: Path) -> dict[str, torch.Tensor]:
    """save_pretrained, then every fused expert weight ([E, in, out] in memory) replaced by MXFP4
    blocks and scales of its [E, out, in] transpose, as gpt-oss ships them. Returns the tensors."""
    model.save_pretrained(out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(EXPERT_WEIGHTS)]:
        weight = tensors.pop(name)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(weight.transpose(1, 2))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


def write_twin(mxfp4_dir: Path, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """The float32 checkpoint the MXFP4 one stands for, in transformers' unquantized layout."""
    out_dir.mkdir()
    plain = {n: t for n, t in tensors.items() if not n.endswith(("_blocks", "_scales"))}
    for name in [n.removesuffix("_blocks") for n in tensors if n.endswith("_blocks")]:
        plain[name] = reference_dequantize(tensors[f"{name}_blocks"], tensors[f"{name}_scales"]).transpose(1, 2)
    save_file({n: t.contiguous() for n, t in plain.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4_dir / "config.json").read_text())
    config.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(MXFP4 dir, dequantized float32 twin dir, the MXFP4 checkpoint's tensors); read-only.
    intermediate_size 64: MXFP4 groups of 32 run along the down projection's I too."""
    root = tmp_path_factory.mktemp("mxfp4")
    tensors = write_mxfp4(hf_model(hf_config("gpt_oss", intermediate_size=64)), root / "mxfp4")
    return root / "mxfp4", write_twin(root / "mxfp4", tensors, root / "twin"), tensors


def _load(directory: Path, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    return load_model(directory, dtype, progress=False, **kwargs)


# --- dequantization ------------------------------------------------------------------------------

def test_dequantize_mxfp4_matches_transformers_bit_for_bit() -> None:
    """Every byte (both nibbles, signed zeros) under scales from 2^-127 to 2^127."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)      # [2, 3, 16, 16]
    blocks[1] = torch.randint(0, 256, (3, 16, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 255, (2, 3, 16), generator=gen, dtype=torch.uint8)
    scales[0, 0] = torch.tensor([0, 1, 126, 127, 128, 254] + [127] * 10, dtype=torch.uint8)
    want = reference_dequantize(blocks, scales)                                             # [2, 3, 512]
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (2, 3, 512) and torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    finite = want.abs() <= torch.finfo(torch.bfloat16).max          # 6 * 2^126 and up overflow bf16
    assert torch.equal(dequantize_mxfp4(blocks, scales)[finite].float(), want[finite])   # bf16 default: exact


def test_quantizer_round_trips_within_e2m1_precision() -> None:
    weight = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (4, 8, 2, 16) and scales.shape == (4, 8, 2)
    error = (dequantize_mxfp4(blocks, scales, torch.float32) - weight).abs()
    assert error.max() <= weight.abs().max() / 4        # half the widest e2m1 gap (4 -> 6) at scale


@pytest.mark.parametrize("blocks, scales, match", [
    (torch.zeros(2, 4, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8), r"uint8 \[\.\.\., G, 16\]"),
    (torch.zeros(2, 4, 8, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8), r"\(2, 4, 8\)"),
    (torch.zeros(2, 4, 16), torch.zeros(2, 4, dtype=torch.uint8), "torch.float32"),
])
def test_dequantize_mxfp4_refuses_bad_shapes(blocks, scales, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        dequantize_mxfp4(blocks, scales, name="w")


# --- config --------------------------------------------------------------------------------------

def test_mxfp4_quantization_config_is_accepted(mxfp4) -> None:
    cfg = MoEModelConfig.from_dir(mxfp4[0])
    assert cfg.checkpoint_quant == CheckpointQuant(method="mxfp4")
    assert cfg.architecture == "gpt_oss" and cfg.swiglu_limit == 0.6 and cfg.expert_activation == "clamped_swiglu"


# --- MXFP4 checkpoints against transformers ------------------------------------------------------

def test_mxfp4_checkpoint_matches_dequantized_transformers(mxfp4) -> None:
    """Prefill of 21 tokens (past the sliding window of 8), then greedy decodes: logits within
    1e-4 of transformers on the dequantized twin, the same tokens."""
    directory, twin, _ = mxfp4
    ref = hf.AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    prompt = torch.randint(0, 320, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens, logits = _greedy(_load(directory), prompt, 6)
    with torch.no_grad():
        expected = ref(torch.tensor([tokens[:-1]])).logits[0, len(prompt) - 1:].float()     # [7, V]
    assert (logits - expected).abs().max().item() <= ATOL
    assert tokens[len(prompt):] == expected.argmax(-1).tolist()


def test_mxfp4_loads_as_its_dequantized_twin(mxfp4) -> None:
    """Parameter by parameter, exactly (pack=False), in float32 and in bf16."""
    directory, twin, _ = mxfp4
    for dtype in (torch.float32, torch.bfloat16):
        ours = dict(_load(directory, dtype, pack=False).named_parameters())
        want = dict(_load(twin, dtype, pack=False).named_parameters())
        assert ours.keys() == want.keys() and "layers.0.moe.experts.b13" in ours
        for name, param in want.items():
            assert ours[name].dtype == dtype and torch.equal(ours[name], param), name


def test_rank_dequantizes_only_its_experts(mxfp4, monkeypatch) -> None:
    """Expert parallelism: a rank holding experts 2-5 reads (and dequantizes) only their rows."""
    directory = mxfp4[0]
    full = _load(directory, pack=False)
    seen = []
    original = loader.dequantize_mxfp4
    monkeypatch.setattr(loader, "dequantize_mxfp4",
                        lambda b, s, **kw: seen.append((kw["name"], b.shape[0])) or original(b, s, **kw))
    part = _load(directory, pack=False, first_expert=2, num_local_experts=4)
    assert seen and all(rows == 4 for _, rows in seen) and len(seen) == 3 * 2
    for mine, whole in zip(part.layers, full.layers):
        for attr in ("w13", "w2", "b13", "b2"):
            assert torch.equal(getattr(mine.moe.experts, attr), getattr(whole.moe.experts, attr)[2:6]), attr


def test_int8_from_mxfp4_is_int8_from_the_twin(mxfp4) -> None:
    """--quantization int8 quantizes the dequantized weights: the same logits as int8 on the twin."""
    directory, twin, _ = mxfp4
    prompt = list(range(3, 20))
    tokens, logits = _greedy(_load(directory, quantization="int8"), prompt, 4)
    twin_tokens, twin_logits = _greedy(_load(twin, quantization="int8"), prompt, 4)
    assert tokens == twin_tokens and torch.equal(logits, twin_logits)


# --- refusals ------------------------------------------------------------------------------------

def test_missing_scales_are_refused_by_name(mxfp4, tmp_path) -> None:
    broken = Path(shutil.copytree(mxfp4[0], tmp_path / "ckpt"))
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.down_proj'.*"
                                              r"'model\.layers\.1\.mlp\.experts\.down_proj_scales' are missing"):
        _load(broken)


def test_blocks_without_mxfp4_quantization_config_are_refused(mxfp4, tmp_path) -> None:
    broken = Path(shutil.copytree(mxfp4[0], tmp_path / "ckpt"))
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' is stored as "
                                              r"MXFP4 blocks .* no mxfp4 quantization_config"):
        _load(broken)
