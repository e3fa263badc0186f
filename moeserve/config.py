"""Frozen, validated configuration for the engine. Values found at run time (KV block count,
EOS ids, the resolved dtype) live on the engine, not here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moeserve.errors import ConfigError

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, option: str = "--kv-cache-memory") -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes. Decimal units for GB, binary for GiB."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{option}: cannot read {text!r} as a size (examples: 2GiB, 512MiB, 1000000)")
    number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).lower()
    base = 1024 if suffix.startswith("i") else 1000
    return int(number * base ** " KMGT".index(unit or " "))


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None                 # checkpoint directory; None = the built-in model
    dtype: DType = "auto"
    device: Device = "auto"
    max_model_len: int | None = None         # None = the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None       # bytes; None = kv_cache_fraction of available memory
    kv_cache_fraction: float = 0.1
    seed: int = 0
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True       # reuse cached KV blocks of shared prompt prefixes
    capacity_factor: float | None = None     # None = dropless (the checkpoint's own behaviour)
    min_capacity: int = 4
    drop_policy: Literal["position", "probs"] = "position"
    quantization: Literal["int8"] | None = None   # int8: linears stored int8 (CPU kernels)
    # with --quantization: the lm_head too. None = yes, as llama.cpp's Q8_0 stores its output
    # matrix: on CPU decode it is read whole every step (README, Speed on a CPU, for its cost in KL)
    quantize_lm_head: bool | None = None
    # expert parallelism (see moeserve/parallel/); ep_size None = the number of visible GPUs, else 1
    ep_size: int | None = None
    ep_dispatch: Literal["alltoall", "allreduce"] = "alltoall"   # measured: see README, Expert parallelism
    ep_timeout: float = 120.0                # seconds a MoE collective may wait for a peer
    nnodes: int = 1                          # torchrun-style multi-node rendezvous
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None           # None: a free port (single node only)

    def __post_init__(self) -> None:
        _choice("drop_policy", self.drop_policy, ("position", "probs"))
        _choice("ep_dispatch", self.ep_dispatch, ("alltoall", "allreduce"))
        self._check_parallel()
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"--capacity-factor must be > 0, got {self.capacity_factor}")
        _positive_int("min_capacity", self.min_capacity)
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.quantization is not None:
            _choice("quantization", self.quantization, ("int8",))
        if self.quantize_lm_head and self.quantization is None:
            raise ConfigError("--quantize-lm-head needs --quantization (int8)")
        if self.quantize_lm_head is None:
            object.__setattr__(self, "quantize_lm_head", self.quantization is not None)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "quantize_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.kv_cache_memory is not None:
            _positive_int("kv_cache_memory", self.kv_cache_memory)
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ConfigError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")

    def _check_parallel(self) -> None:
        if self.ep_size is not None:
            _positive_int("ep_size", self.ep_size)
        _positive_int("nnodes", self.nnodes)
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, --nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if self.ep_size is None or self.ep_size % self.nnodes:
                raise ConfigError(f"--ep-size must be a multiple of --nnodes {self.nnodes} "
                                  f"(every node runs as many ranks), got {self.ep_size}")
            if self.master_port is None:
                raise ConfigError("--master-port is required with --nnodes > 1 (every node must name the same one)")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ConfigError(f"--master-port must be in [1, 65535], got {self.master_port}")
        if not self.ep_timeout > 0:
            raise ConfigError(f"--ep-timeout must be > 0 seconds, got {self.ep_timeout}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_flag(name)} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None     # None = the model directory's name
    api_key: str | None = None
    max_queue: int | None = None             # waiting requests beyond this get 429
    max_body_bytes: int = 16 << 20
    shutdown_timeout: float = 30.0           # SIGTERM: seconds running requests may take to finish
    log_level: str = "info"
    expert_metrics: Literal["full", "summary", "off"] = "full"

    def __post_init__(self) -> None:
        _choice("expert_metrics", self.expert_metrics, ("full", "summary", "off"))
        _choice("log_level", self.log_level, ("debug", "info", "warning", "error", "critical"))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_queue is not None:
            _positive_int("max_queue", self.max_queue)
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
