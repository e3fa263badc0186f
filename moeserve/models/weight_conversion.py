"""The one place a checkpoint tensor becomes a served weight: dtype conversion, then either a plain
parameter or a kernel's packed layout (int8, oneDNN bf16).

The loader hands over one tensor at a time, as it reads it, so the float copy of a packed weight
never exists beside the packed one: peak memory is the served model plus the tensor in flight.
Checkpoint-side conversions (dequantizing FP8 / MXFP4 blocks) belong here too, before `place`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeserve.errors import CheckpointError
from moeserve.layers.linear import Linear, WeightFormat, choose_format
from moeserve.layers.experts import Experts

QUANTIZATIONS = ("int8",)
# Linears that stay in full precision under --quantization: routers pick experts from small
# logit differences, and the shared-expert gate is one row.
_FULL_PRECISION = ("router", "shared_gate")
# Parameters kept in float32 whatever the serving dtype: DeepSeek-V3's router correction bias is
# added to sigmoid scores in [0, 1], where bf16 rounding would change which experts are chosen.
_FLOAT32_PARAMS = ("score_bias",)


@dataclass(frozen=True)
class WeightConversion:
    dtype: torch.dtype                       # of every tensor kept as a parameter or buffer
    device: torch.device
    formats: dict[str, WeightFormat] = field(default_factory=dict)   # parameter name -> packed format

    def place(self, model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Puts checkpoint tensor `tensor` where parameter `name` of `model` lives."""
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        fmt = self.formats.get(name)
        if fmt is None:
            dtype = self.dtype if tensor.is_floating_point() else None
            if attr in _FLOAT32_PARAMS or getattr(module, "keep_float32", False):
                dtype = torch.float32
            value = tensor.to(device=self.device, dtype=dtype)
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        elif isinstance(module, Experts):
            module.pack(attr, tensor, fmt)
        else:
            module.pack(tensor, fmt)


def plan_conversion(model: nn.Module, dtype: torch.dtype, device: torch.device,
                    quantization: str | None = None, quantize_lm_head: bool = False) -> WeightConversion:
    """Which parameters of `model` (still on the meta device) get which packed format."""
    float_fmt = choose_format(dtype, device, quantize_int8=False)
    quant_fmt = choose_format(dtype, device, quantize_int8=True) if quantization == "int8" else float_fmt
    formats: dict[str, WeightFormat] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Experts):
            for attr in ("w13", "w2"):
                formats[f"{module_name}.{attr}"] = quant_fmt
        elif isinstance(module, Linear):
            if getattr(module, "keep_float32", False):
                continue                           # a plain float32 weight (see place)
            leaf = module_name.rpartition(".")[2]
            if leaf in _FULL_PRECISION or module.out_features < 16:
                fmt = float_fmt
            elif leaf == "lm_head":
                fmt = quant_fmt if quantize_lm_head else float_fmt
            else:
                fmt = quant_fmt
            formats[f"{module_name}.weight"] = fmt
    packed = {name: fmt for name, fmt in formats.items() if fmt is not WeightFormat.PLAIN}
    return WeightConversion(dtype, device, packed)


def materialize_buffers(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Meta buffers -> empty tensors on `device` (floating ones in `dtype`); post_load fills them."""
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                kind = dtype if buf.is_floating_point() else buf.dtype
                module._buffers[key] = torch.empty(buf.shape, dtype=kind, device=device)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int],
                          dtype: torch.dtype, name: str = "weight") -> torch.Tensor:
    """FP8 block-quantized weight [..., out, in] -> `dtype` [..., out, in], computed in float32.

    scale_inv [..., ceil(out/b0), ceil(in/b1)] multiplies each b0 x b1 block (DeepSeek-V3's
    weight_scale_inv; blocks at the bottom and right edges may be partial). Leading dims (stacked
    experts) pair up one to one.
    """
    if weight.dim() < 2:
        raise CheckpointError(f"tensor {name!r}: a block-quantized weight needs 2 or more dims, "
                              f"it has shape {tuple(weight.shape)}")
    *lead, rows, cols = weight.shape
    b0, b1 = block_size
    nr, nc = -(-rows // b0), -(-cols // b1)
    if tuple(scale_inv.shape) != (*lead, nr, nc):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(weight.shape)}, so with weight_block_size {[b0, b1]} its "
            f"scale_inv must have shape {(*lead, nr, nc)}; it has {tuple(scale_inv.shape)}")
    # Pad to whole blocks so that one broadcast multiply scales every block, edges included;
    # without padding (the common case) this is the only float32 copy.
    padded = weight.new_zeros((*lead, nr * b0, nc * b1), dtype=torch.float32)
    padded[..., :rows, :cols] = weight
    blocks = padded.view(*lead, nr, b0, nc, b1)                           # [..., R, b0, C, b1]
    blocks.mul_(scale_inv.to(torch.float32)[..., :, None, :, None])      # scale [..., R, 1, C, 1]
    return padded[..., :rows, :cols].to(dtype).contiguous()


# The 16 values of an fp4 e2m1 nibble (sign bit 3, exponent bits 2-1, mantissa bit 0).
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MXFP4_CHUNK_ROWS = 1 << 18     # 32-value groups dequantized at once: bounds the temporaries (~100 MB)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     name: str = "weight") -> torch.Tensor:
    """MXFP4 (gpt-oss): blocks [..., G, 16] uint8 (two e2m1 values a byte, low nibble first) and
    scales [..., G] uint8 (e8m0: 2^(s - 127) for each 32 values) -> `dtype` [..., G * 32].

    bfloat16 by default: an e2m1 value times a power of two is exact in it (8 exponent bits),
    so the serving dtype or int8 quantization downstream sees the same numbers as float32, at
    half the memory of the tensor in flight.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() < 2 \
            or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"tensor {name!r}: MXFP4 blocks must be uint8 [..., G, 16] with uint8 scales [..., G]; got "
            f"{blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    *lead, groups, _ = blocks.shape
    flat_blocks, flat_scales = blocks.reshape(-1, 16), scales.reshape(-1)             # [N, 16], [N]
    out = torch.empty(flat_blocks.shape[0], 32, dtype=dtype)                           # [N, 32]
    for start in range(0, flat_blocks.shape[0], _MXFP4_CHUNK_ROWS):
        rows = slice(start, start + _MXFP4_CHUNK_ROWS)
        out[rows] = _mxfp4_groups(flat_blocks[rows], flat_scales[rows])
    return out.view(*lead, groups * 32)


def _mxfp4_groups(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[n, 16] uint8 + [n] uint8 -> [n, 32] float32."""
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]                 # [n, 16] each
    values = torch.stack((low, high), dim=-1).view(-1, 32)                             # low nibble first
    return values * torch.exp2(scales.float() - 127.0)[:, None]


def gate_up_from_interleaved(tensor: torch.Tensor) -> torch.Tensor:
    """gpt-oss's fused gate/up [E, 2I, ...] with gate and up alternating along 2I (gate = rows
    0, 2, 4, ...) -> moeserve's [E, 2I, ...]: every gate row, then every up row."""
    return torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
