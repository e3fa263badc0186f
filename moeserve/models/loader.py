"""Load a Hugging Face MoE checkpoint directory into a moeserve model.

Tensors are read lazily, one name at a time, through safetensors' safe_open: a rank that owns a
subset of the experts never reads the others. Pickle (.bin) checkpoints are refused. FP8
block-quantized weights (quantization_config fp8) come out of the reader dequantized to float32,
MXFP4 ones (gpt-oss: `<name>_blocks` + `<name>_scales`) to bfloat16, where they are exact.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from moeserve.errors import CheckpointError
from moeserve.models.config import CheckpointQuant, MoEModelConfig
from moeserve.models.registry import model_class
from moeserve.models.weight_conversion import (WeightConversion, dequantize_fp8_blocks, materialize_buffers,
                                               plan_conversion)
from moeserve.models.weight_conversion import dequantize_mxfp4, gate_up_from_interleaved
from moeserve.models.weight_names import ExpertNames, WeightNames, weight_names

log = logging.getLogger(__name__)
_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)   # what weight_scale_inv blocks scale


class CheckpointReader:
    """Maps tensor names to safetensors files and reads one tensor at a time.

    A float8 tensor is returned dequantized (float32) with its `<name>_scale_inv` when `quant` says
    the checkpoint is FP8 block-quantized, and refused otherwise: served as stored, without its
    scales, it would be garbage.
    """

    def __init__(self, model_dir: Path, quant: CheckpointQuant | None = None) -> None:
        self.model_dir = model_dir
        self.quant = quant
        self.files = self._index(model_dir)              # tensor name -> file
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _index(model_dir: Path) -> dict[str, Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            return {name: model_dir / file for name, file in weight_map.items()}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in model_dir.glob("*.bin"))
            hint = (f" It holds pickle files ({', '.join(pickles)}): moeserve never loads pickle checkpoints "
                    "because unpickling runs arbitrary code; convert them to safetensors.") if pickles else ""
            raise CheckpointError(f"{model_dir}: no *.safetensors weights found.{hint}")
        names: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    names.update({name: file for name in f.keys()})
            except (SafetensorError, OSError) as exc:   # name the file, not just the directory
                raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
        return names

    def __contains__(self, name: str) -> bool:
        return name in self.files or self.is_mxfp4(name)

    def is_mxfp4(self, name: str) -> bool:
        """`name` is stored as MXFP4 `<name>_blocks` (+ `<name>_scales`), laid out [..., out, in]."""
        return name not in self.files and f"{name}_blocks" in self.files

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name` (only `rows` of dim 0 when given: a rank's slice of stacked experts)."""
        if self.is_mxfp4(name):
            return self._dequantize_mxfp4(name, rows)
        tensor = self._read(name, rows)
        if tensor.dtype.is_floating_point and tensor.element_size() == 1:
            tensor = self._dequantize(name, tensor, rows)
        return tensor

    def _dequantize(self, name: str, tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """float8 [..., out, in] -> float32; float32 because place() casts or quantizes it next."""
        if tensor.dtype not in _FP8_DTYPES:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is {tensor.dtype}, which moeserve cannot load")
        scale_name = self._scales_of(name, f"{tensor.dtype}", "fp8", f"{name}_scale_inv")
        scale = self._read(scale_name, rows)         # [..., ceil(out/b0), ceil(in/b1)]
        return dequantize_fp8_blocks(tensor, scale, self.quant.block_size, torch.float32, name)

    def _dequantize_mxfp4(self, name: str, rows: slice | None) -> torch.Tensor:
        """`<name>_blocks` [..., G, 16] and `<name>_scales` [..., G] -> bfloat16 [..., G * 32]."""
        scale_name = self._scales_of(name, f"stored as MXFP4 blocks ({name}_blocks)", "mxfp4", f"{name}_scales")
        return dequantize_mxfp4(self._read(f"{name}_blocks", rows), self._read(scale_name, rows), name=name)

    def _scales_of(self, name: str, stored_as: str, method: str, scale_name: str) -> str:
        """scale_name, once the config declares `method` and the checkpoint holds the scales; a
        quantized tensor without either would be served as garbage, so it is refused by name."""
        if self.quant is None or self.quant.method != method:
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} is {stored_as} but config.json has no {method} "
                "quantization_config: without its scales it would be served as garbage")
        if scale_name not in self.files:
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} is {stored_as} but its scales {scale_name!r} are missing "
                "from the checkpoint: without them it would be served as garbage")
        return scale_name

    def _read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        handle = self._handles.get(file)
        try:
            if handle is None:
                if not file.is_file():
                    raise CheckpointError(f"{file}: listed in the index but the file does not exist")
                handle = self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            # get_slice reads only the rows asked for, not the whole stacked tensor
            return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc

    def close(self) -> None:
        self._stack.close()


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
               first_expert: int = 0, num_local_experts: int | None = None,
               progress: bool = True, quantization: str | None = None,
               quantize_lm_head: bool = False, pack: bool = True,
               max_positions: int | None = None) -> torch.nn.Module:
    """Builds the model for model_dir and fills it from the checkpoint, one tensor at a time.

    max_positions: the longest sequence it will serve (rotary tables are built that long; default
    the model's max_position_embeddings).

    Only experts [first_expert, first_expert + num_local_experts) are read (all when None).
    Weights go into the fastest kernel layout this machine has (`pack=False`: plain tensors,
    for inspection); `quantization="int8"` stores the linears as int8 (see weight_conversion).
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    cfg = MoEModelConfig.from_dir(model_dir)
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, first_expert=first_expert, num_local_experts=num_local_experts, max_positions=max_positions)
    if pack or quantization:
        conversion = plan_conversion(model, dtype, device, quantization, quantize_lm_head)
    else:
        conversion = WeightConversion(dtype, device)
    reader = _open_reader(model_dir, cfg.checkpoint_quant)
    names = weight_names(cfg.architecture, cfg.multimodal)
    try:
        params = list(model.named_parameters())    # a tied lm_head is listed once, as embed
        for name, param in tqdm(params, desc="Loading weights", unit="tensor", disable=not progress):
            tensor = _read_param(reader, names, name, model)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{model_dir}: tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            conversion.place(model, name, tensor)
    finally:
        reader.close()
    materialize_buffers(model, dtype, device)
    model.post_load()
    if cfg.tie_word_embeddings and "lm_head.weight" in conversion.formats:
        conversion.place(model, "lm_head.weight", model.embed.weight)   # its own packed copy
    return model.eval()


def _open_reader(model_dir: Path, quant: CheckpointQuant | None) -> CheckpointReader:
    try:
        return CheckpointReader(model_dir, quant)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{model_dir}: unreadable safetensors file ({exc})") from exc


def _read_param(reader: CheckpointReader, names: WeightNames, name: str, model: torch.nn.Module) -> torch.Tensor:
    match = _LAYER_PARAM.fullmatch(name)
    if match is None:
        return _concat(reader, names.top_map[name])
    layer, suffix = int(match.group(1)), match.group(2)
    prefix = names.layer_prefix.format(i=layer)
    if suffix in ("moe.experts.b13", "moe.experts.b2"):
        experts = model.get_submodule(name.rsplit(".", 1)[0])
        rows = slice(experts.first_expert, experts.first_expert + experts.num_local)
        return _read_expert_bias(reader, names, prefix, suffix.endswith("b13"), rows)
    if suffix in ("moe.experts.w13", "moe.experts.w2"):
        experts = model.get_submodule(name.rsplit(".", 1)[0])
        owned = range(experts.first_expert, experts.first_expert + experts.num_local)
        return _read_experts(reader, names, prefix, suffix.endswith("w13"), owned)
    if suffix not in names.layer_map:
        raise CheckpointError(f"no checkpoint name is known for parameter {name}")
    return _concat(reader, tuple(prefix + s for s in names.layer_map[suffix]))


def _concat(reader: CheckpointReader, ckpt_names: tuple[str, ...]) -> torch.Tensor:
    parts = [reader.get(n) for n in ckpt_names]
    return parts[0] if len(parts) == 1 else _join(reader, parts, ckpt_names, stack=False)


def _join(reader: CheckpointReader, parts: list[torch.Tensor], labels: list[str] | tuple[str, ...],
          stack: bool) -> torch.Tensor:
    """torch.cat / torch.stack along dim 0; a shape mismatch names the two checkpoint tensors."""
    first = parts[0].shape if stack else parts[0].shape[1:]
    for label, part in zip(labels, parts):
        if (part.shape if stack else part.shape[1:]) != first:
            raise CheckpointError(
                f"{reader.model_dir}: tensor {label!r} has shape {tuple(part.shape)}, which does not fit "
                f"{labels[0]!r} with shape {tuple(parts[0].shape)}")
    return torch.stack(parts) if stack else torch.cat(parts, dim=0)


def _read_experts(reader: CheckpointReader, names: WeightNames, prefix: str, gate_up: bool,
                  experts: range) -> torch.Tensor:
    """Stacks this rank's experts: [E_local, 2I, H] (gate rows, then up) or [E_local, H, I]."""
    e_names = names.experts
    base = prefix + e_names.prefix
    fused = f"{base}.{e_names.fused_gate_up if gate_up else e_names.fused_down}"
    if f"{base}.{experts.start}.{e_names.gate}" not in reader and fused in reader:
        return _read_fused_experts(reader, e_names, fused, slice(experts.start, experts.stop), gate_up)
    stacked, labels = [], []
    for e in experts:
        if gate_up:
            stacked.append(_concat(reader, (f"{base}.{e}.{e_names.gate}", f"{base}.{e}.{e_names.up}")))
            labels.append(f"{base}.{e}.{e_names.gate} + {e_names.up}")
        else:
            stacked.append(reader.get(f"{base}.{e}.{e_names.down}"))
            labels.append(f"{base}.{e}.{e_names.down}")
    return _join(reader, stacked, labels, stack=True)


def _read_fused_experts(reader: CheckpointReader, e_names: ExpertNames, fused: str, rows: slice,
                        gate_up: bool) -> torch.Tensor:
    """A fused 3-D expert tensor, this rank's rows only -> [E_local, 2I, H] (gate rows, then up) or
    [E_local, H, I]: transposed when stored for x @ W (gpt-oss, Llama 4), gate/up de-interleaved
    (gpt-oss)."""
    tensor = reader.get(fused, rows=rows)
    if e_names.fused_transposed and not reader.is_mxfp4(fused):
        tensor = tensor.transpose(1, 2)          # [E, in, out] -> [E, out, in]; MXFP4 is stored [E, out, in]
    if gate_up and e_names.gate_up_interleaved:
        tensor = gate_up_from_interleaved(tensor)
    return tensor.contiguous()


def _read_expert_bias(reader: CheckpointReader, names: WeightNames, prefix: str, gate_up: bool,
                      rows: slice) -> torch.Tensor:
    """This rank's expert biases: [E_local, 2I] (gate, then up) or [E_local, H]."""
    e_names = names.experts
    name = f"{prefix}{e_names.prefix}.{e_names.fused_gate_up_bias if gate_up else e_names.fused_down_bias}"
    bias = reader.get(name, rows=rows)
    return gate_up_from_interleaved(bias) if gate_up and e_names.gate_up_interleaved else bias
