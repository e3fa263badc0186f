"""`moeserve serve [MODEL_DIR]`: argument parsing only; builds the configs and calls in.

Precedence: built-in defaults < --config FILE.yaml < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import yaml

from moeserve.config import EngineConfig, ServerConfig, parse_bytes
from moeserve.errors import MoEServeError

# flag -> (type, help); every flag is also a YAML key (dashes or underscores)
_FLAGS: dict[str, tuple[object, str]] = {
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port to bind (default 8000)"),
    "served-model-name": (str, "model name clients send (default: the model directory's name)"),
    "api-key": (str, "require 'Authorization: Bearer KEY' on /v1 routes (also MOESERVE_API_KEY)"),
    "dtype": (str, "auto | float32 | bfloat16 | float16 (auto: checkpoint dtype, float32 on CPUs without bf16)"),
    "device": (str, "auto | cpu | cuda"),
    "max-model-len": (int, "context length limit (default: the model's)"),
    "max-num-seqs": (int, "most sequences in one step (default 256)"),
    "max-num-batched-tokens": (int, "most tokens in one step, prefill chunks and decodes (default 2048)"),
    "kv-cache-memory": (str, "KV cache size, e.g. 2GiB (default: a fraction of available memory)"),
    "block-size": (int, "tokens per KV block (default 16)"),
    "max-queue": (int, "waiting requests beyond this are refused with 429 (default: no limit)"),
    "seed": (int, "seed of the unseeded sampling generator (default 0)"),
    "shutdown-timeout": (float, "on SIGTERM, seconds running requests may take to finish (default 30)"),
    "log-level": (str, "debug | info | warning | error"),
    "capacity-factor": (float, "cap each expert at ceil(T/E * factor * k) routes per MoE layer and step (default: dropless)"),
    "min-capacity": (int, "lower bound of that cap (default 4)"),
    "quantization": (str, "int8: store expert, shared-expert, dense, attention and lm_head weights as "
                           "int8 (per-channel scales; CPU kernels: moeserve's with AVX512-VNNI, "
                           "oneDNN with AMX, else fbgemm)"),
    "quantize-lm-head": (argparse.BooleanOptionalAction,
                         "with --quantization: the lm_head too (default on, as llama.cpp's Q8_0; "
                         "--no-quantize-lm-head keeps it in the serving dtype)"),
    "enable-prefix-caching": (argparse.BooleanOptionalAction,
                              "reuse the KV blocks of prompts' shared prefixes (default on; --no-enable-prefix-caching turns it off)"),
    "drop-policy": (str, "which routes a full expert drops: position (latest tokens) | probs (lowest scores)"),
    "expert-metrics": (str, "full (per layer and expert) | summary (per expert, for huge models) | off"),
    "ep-size": (int, "expert-parallel ranks: one process per device, each holding 1/N of the experts (default: visible GPUs, else 1)"),
    "ep-dispatch": (str, "alltoall (default: attention and KV split across ranks, tokens sent to their experts) | allreduce (every rank runs attention on the whole batch)"),
    "ep-timeout": (float, "seconds a MoE collective waits for a peer before the server gives up (default 120)"),
    "nnodes": (int, "nodes taking part in expert parallelism (torchrun-style; default 1)"),
    "node-rank": (int, "this node's index in [0, nnodes); node 0 serves HTTP"),
    "master-addr": (str, "address of node 0 for the rendezvous (default 127.0.0.1)"),
    "master-port": (int, "rendezvous port on node 0 (default: a free port; required with --nnodes > 1)"),
    "max-body-bytes": (int, "largest request body accepted; larger ones get 413 (default 16 MiB)"),
}
_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}
_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description="Serve Mixture-of-Experts LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the built-in model)")
    serve.add_argument("--config", type=Path, help="YAML file with the same keys as the flags")
    for flag, (kind, help_text) in _FLAGS.items():
        if kind is bool:
            serve.add_argument(f"--{flag}", action="store_true", default=None, help=help_text)
        elif kind is argparse.BooleanOptionalAction:
            serve.add_argument(f"--{flag}", action=kind, default=None, help=help_text)
        else:
            serve.add_argument(f"--{flag}", type=kind, default=None, help=help_text)
    return parser


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MoEServeError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise MoEServeError(f"--config {path}: expected a mapping of option: value")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = _ENGINE_KEYS | _SERVER_KEYS | {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MoEServeError(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    return options


def resolve_options(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    options = load_yaml(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")}
    options.update(given)
    if "api_key" not in options and os.environ.get("MOESERVE_API_KEY"):
        options["api_key"] = os.environ["MOESERVE_API_KEY"]
    for key, env in (("master_addr", "MASTER_ADDR"), ("master_port", "MASTER_PORT")):   # as torchrun sets
        if key not in options and os.environ.get(env):
            options[key] = os.environ[env] if key == "master_addr" else _env_int(env)
    if "kv_cache_memory" in options:
        options["kv_cache_memory"] = parse_bytes(options["kv_cache_memory"])
    engine = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_KEYS})
    server = ServerConfig(**{k: v for k, v in options.items() if k in _SERVER_KEYS})
    return engine, server


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise MoEServeError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine_cfg, server_cfg = resolve_options(args)
        from moeserve.server.launch import serve   # heavy imports only once the flags are valid
        return serve(engine_cfg, server_cfg)
    except MoEServeError as exc:
        print(f"moeserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
