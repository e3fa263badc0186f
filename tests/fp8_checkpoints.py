"""FP8 block-quantized checkpoints in the layout DeepSeek-V3, Kimi-K2 and Qwen3-*-FP8 ship, written
from a transformers model, and their dequantized float32 twins as a reference.

Every linear weight except embeddings, lm_head and routers (`...gate.weight`) becomes
float8_e4m3fn with a float32 `<name>_scale_inv` [ceil(out/b0), ceil(in/b1)] beside it: one scale
per b0 x b1 block (partial at the bottom and right edges), scale = block amax / 448, and
weight = fp8 * scale_inv. Norms, biases and 1-D tensors stay as they are.

Quantizing and dequantizing here loop over blocks one at a time: slow but obviously right, and
written independently of moeserve's vectorised dequantize_fp8_blocks, which the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max        # 448
SCALES_FILE = "model-fp8-scales.safetensors"


def quantized_name(name: str, tensor: torch.Tensor) -> bool:
    """Which checkpoint tensors DeepSeek-V3 / Qwen3-FP8 store as FP8 (routers stay bf16 there)."""
    skip = ("embed", "lm_head", "norm")
    return tensor.dim() >= 2 and not name.endswith(("gate.weight", "router.weight", "_bias")) and not any(s in name for s in skip)


def _blocks(shape: torch.Size, block: tuple[int, int]):
    """(row block, col block, index of that block in a [..., out, in] tensor), edges included."""
    b0, b1 = block
    for i in range(0, shape[-2], b0):
        for j in range(0, shape[-1], b1):
            yield i // b0, j // b1, (..., slice(i, i + b0), slice(j, j + b1))


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (float8_e4m3fn [..., out, in], scale_inv [..., ceil(out/b0), ceil(in/b1)])."""
    nr, nc = -(-weight.shape[-2] // block[0]), -(-weight.shape[-1] // block[1])
    scale = torch.empty(*weight.shape[:-2], nr, nc, dtype=torch.float32)
    q = torch.empty(weight.shape, dtype=FP8)
    for r, c, idx in _blocks(weight.shape, block):
        part = weight[idx].float()
        scale[..., r, c] = part.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / FP8_MAX
        q[idx] = (part / scale[..., r, c, None, None]).to(FP8)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: float8 [..., out, in] times each block's scale -> float32 [..., out, in]."""
    out = q.float()
    for r, c, idx in _blocks(q.shape, block):
        out[idx] *= scale[..., r, c, None, None]
    return out


def quantize_state(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the same names, the quantized ones as FP8 plus their `_scale_inv`."""
    out = {}
    for name, tensor in tensors.items():
        if quantized_name(name, tensor):
            out[name], out[f"{name}_scale_inv"] = quantize_blocks(tensor, block)
        else:
            out[name] = tensor
    return out


def write_fp8_checkpoint(model: torch.nn.Module, out_dir: Path, block: tuple[int, int] = (16, 16),
                         max_shard_size: str | None = None) -> Path:
    """save_pretrained(model) (the hub layout), then its linears rewritten as FP8 blocks.

    Sharded (max_shard_size): every scale goes to a shard of its own, away from its weight, as
    only the index says where each tensor lives.
    """
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    scales = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        tensors = quantize_state(load_file(file), block)
        if index is not None:
            scales.update({n: tensors.pop(n) for n in list(tensors) if n.endswith("_scale_inv")})
        save_file(tensors, file, metadata={"format": "pt"})
    if index is not None:
        save_file(scales, out_dir / SCALES_FILE, metadata={"format": "pt"})
        index["weight_map"].update({name: SCALES_FILE for name in scales})
        index_path.write_text(json.dumps(index, indent=2))
    set_quantization_config(out_dir, {"quant_method": "fp8", "weight_block_size": list(block),
                                      "activation_scheme": "dynamic", "fmt": "e4m3"})
    return out_dir


def set_quantization_config(model_dir: Path, qcfg: dict | None) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    if qcfg is not None:
        config["quantization_config"] = qcfg
    path.write_text(json.dumps(config, indent=2))


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint directory."""
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_dequantized(fp8_dir: Path, out_dir: Path, block: tuple[int, int]) -> Path:
    """The float32 checkpoint an FP8 one stands for: same config without quantization_config,
    every FP8 tensor dequantized, no scales. transformers loads it as a plain model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = read_checkpoint(fp8_dir)
    plain = {name: dequantize_blocks(t, tensors[f"{name}_scale_inv"], block) if t.dtype == FP8 else t
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    save_file(plain, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text((fp8_dir / "config.json").read_text())
    set_quantization_config(out_dir, None)
    return out_dir
