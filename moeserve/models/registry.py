"""Architecture name -> model class. An explicit dict: adding a model is one line here."""

from __future__ import annotations

from torch import nn

from moeserve.errors import CheckpointError
from moeserve.models.decoder import MoEDecoder

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "mixtral": MoEDecoder,
    "qwen2_moe": MoEDecoder,
    "qwen3_moe": MoEDecoder,
    "olmoe": MoEDecoder,
    "deepseek_v2": MoEDecoder,
    "deepseek_v3": MoEDecoder,
    "glm4_moe": MoEDecoder,
    "minimax_m2": MoEDecoder,
    "gpt_oss": MoEDecoder,
    "llama4": MoEDecoder,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise CheckpointError(
            f"no model class for architecture {architecture!r}; supported: {', '.join(sorted(MODEL_CLASSES))}"
        ) from None
