"""Engine: add_request / abort / step, the single loop that drives scheduler, runner and detokenizer.

Not thread-safe: one thread owns an Engine (`moeserve serve` runs its loop in the main thread).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.config import EngineConfig
from moeserve.engine.batch import StepOutput
from moeserve.engine.executor import EPExecutor, LocalExecutor
from moeserve.engine.parallel_setup import rank_specs, resolve_ep_size, threads_per_rank
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.scheduler import Scheduler, SchedulerConfig, SeqUpdate
from moeserve.errors import ConfigError
from moeserve.models.config import MoEModelConfig
from moeserve.models.loader import load_model
from moeserve.parallel.expert_parallel import ExpertPlacement
from moeserve.request import FinishReason, Request, SamplingParams
from moeserve.detokenizer import IncrementalDetokenizer, load_eos_token_ids
from moeserve.worker.device import available_memory, resolve_device, resolve_dtype
from moeserve.worker.host_allocator import tune_host_allocator
from moeserve.worker.model_runner import ModelRunner, kv_bytes_per_block
from moeserve.worker.sampler import Sampler

log = logging.getLogger(__name__)
EXPERT_TOTALS_INTERVAL_S = 0.5


@dataclass
class _RequestState:
    request: Request
    outputs: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer] | None


class Engine:
    def __init__(self, config: EngineConfig, model_dir: str | Path | None = None) -> None:
        self.config = config
        self.model_dir = Path(model_dir or config.model or _builtin_dir())
        self.model_config = MoEModelConfig.from_dir(self.model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config.dtype, self.device)
        if config.quantization is not None and self.device.type != "cpu":
            raise ConfigError(f"--quantization {config.quantization} runs on CPU kernels only (oneDNN / fbgemm); "
                              f"no {self.device.type} kernel is wired in: serve without it, or with --device cpu")
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = self._eos_ids()
        self.max_model_len = self._max_model_len()
        self.ep_size = resolve_ep_size(config, self.device, self.model_config.num_experts)
        self.num_kv_blocks = self._num_kv_blocks()     # per rank
        # The longest sequence a rank's cache holds: the rotary tables need no more positions
        # (Llama-4-Scout declares 10.5M: 10.7 GB of float32 tables if built for all of them).
        self.max_positions = min(self.max_model_len, self.num_kv_blocks * config.block_size)
        self.executor = self._build_executor()
        if self.device.type == "cpu":   # after the weights: they keep their own mappings
            tune_host_allocator()       # step buffers reused, not page-faulted in every step
        self.model, self.runner = self.executor.model, self.executor.runner
        sched_cfg = SchedulerConfig(
            max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, block_size=config.block_size,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching)
        # alltoall: each rank keeps the KV blocks of the sequences whose attention it runs
        partitions = self.ep_size if self.ep_size > 1 and config.ep_dispatch == "alltoall" else 1
        self.scheduler = Scheduler(sched_cfg, self.num_kv_blocks * partitions, self.eos_token_ids, partitions)
        self._states: dict[str, _RequestState] = {}
        self._expert_totals_host = self.executor.expert_totals()
        self._published_at = time.monotonic()

    # ---- public API ----
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams | None = None) -> None:
        """Queues a request. Raises ValueError (a 400 for the server) when it cannot be served."""
        sampling = sampling or SamplingParams()
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        request = Request(request_id, list(prompt_token_ids), sampling)
        self.scheduler.add_request(request)
        detoks = None
        if self.tokenizer is not None:
            detoks = [IncrementalDetokenizer(self.tokenizer, sampling, request.prompt_token_ids)
                      for _ in range(sampling.n)]
        outputs = [CompletionOutput(index=i, logprobs=[] if sampling.logprobs is not None else None)
                   for i in range(sampling.n)]
        self._states[request_id] = _RequestState(request, outputs, detoks)

    def abort(self, request_id: str) -> None:
        """Stops a request at once and frees its KV blocks. Unknown ids are ignored."""
        self.scheduler.abort(request_id)
        self._states.pop(request_id, None)

    def expert_totals_host(self) -> list:
        """[moe_layers][2][experts] routed / dropped totals, as of the last publication (at most
        EXPERT_TOTALS_INTERVAL_S old while busy, exact once idle). Plain Python: safe to read from
        any thread."""
        return self._expert_totals_host

    def _publish_expert_totals(self) -> None:
        """One host copy of the device totals per interval (and when the engine goes idle)."""
        now = time.monotonic()
        if now - self._published_at >= EXPERT_TOTALS_INTERVAL_S or not self.scheduler.has_unfinished_requests():
            self._expert_totals_host = self.executor.expert_totals()
            self._published_at = now

    def expert_placement(self) -> list[range]:
        """The global expert ids each expert-parallel rank owns."""
        placement = ExpertPlacement(self.model_config.num_experts, self.ep_size)
        return [placement.experts_of(rank) for rank in range(self.ep_size)]

    @property
    def failure(self) -> BaseException | None:
        """Set when an expert-parallel worker died: the engine cannot step any more."""
        return self.executor.failure

    def close(self) -> None:
        """Stops the expert-parallel workers (no-op on one rank). The engine is unusable after."""
        self.executor.shutdown()

    def _build_executor(self) -> LocalExecutor | EPExecutor:
        cfg = self.config
        if self.ep_size == 1:
            model = load_model(self.model_dir, self.dtype, self.device, quantization=cfg.quantization,
                               quantize_lm_head=cfg.quantize_lm_head, max_positions=self.max_positions)
            model.set_capacity(cfg.capacity_factor, cfg.min_capacity, cfg.drop_policy)
            sampler = Sampler(self.eos_token_ids, seed=cfg.seed, device=self.device)
            return LocalExecutor(ModelRunner(model, self.num_kv_blocks, cfg.block_size, self.dtype, self.device, sampler))
        specs = rank_specs(cfg, self.ep_size, self.model_dir, self.dtype, self.device, self.model_config.num_experts,
                           self.num_kv_blocks, self.eos_token_ids, self.max_positions)
        threads = threads_per_rank(cfg, self.ep_size, self.device)
        torch.set_num_threads(threads)
        return EPExecutor(specs, local_ranks=self.ep_size // cfg.nnodes, num_threads=threads)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step and one forward pass; returns what changed, per request."""
        batch = self.scheduler.schedule()
        if self.executor.failure is not None:
            raise self.executor.failure
        step_output = self.executor.execute(batch) if not batch.is_empty else StepOutput(outputs=[])
        updates = self.scheduler.update(batch, step_output)
        touched = self._apply(updates)
        self._publish_expert_totals()
        return [self._snapshot(state) for state in touched]

    # ---- internals ----
    def _apply(self, updates: list[SeqUpdate]) -> list[_RequestState]:
        touched: dict[str, _RequestState] = {}
        for update in updates:
            state = self._states.get(update.seq.request_id)
            if state is None:
                continue
            if update.seq.request_id not in touched:
                for out in state.outputs:
                    out.delta_text, out.delta_token_ids, out.delta_logprobs = "", [], []
                touched[update.seq.request_id] = state
            self._apply_one(state, update)
        return list(touched.values())

    def _apply_one(self, state: _RequestState, update: SeqUpdate) -> None:
        seq, out = update.seq, state.outputs[update.seq.index]
        detok = state.detokenizers[seq.index] if state.detokenizers else None
        if update.output is not None:
            token = update.output.token_id
            out.token_ids.append(token)
            out.delta_token_ids.append(token)
            if update.output.logprob is not None:
                entry = {"token_id": token, "logprob": update.output.logprob, "top": update.output.top_logprobs}
                out.delta_logprobs.append(entry)
                if out.logprobs is not None:
                    out.logprobs.append(entry)
            if detok is not None:
                delta = detok.step([token])
                out.delta_text += delta.text
                if delta.stop is not None:
                    if seq.finish_reason is None:
                        self.scheduler.finish_seq(seq.seq_id, FinishReason.STOP)
                    else:
                        # This token also hit max_tokens (or EOS): the text was cut at the stop
                        # string, so report the stop string, as vLLM does.
                        seq.finish_reason = FinishReason.STOP
                    out.stop_reason = delta.stop
        if seq.finish_reason is not None and out.finish_reason is None:
            out.finish_reason = seq.finish_reason
            if out.stop_reason is None and seq.finish_reason is FinishReason.STOP and out.token_ids \
                    and out.token_ids[-1] in seq.sampling.stop_token_ids:
                out.stop_reason = out.token_ids[-1]
            if detok is not None:
                out.delta_text += detok.finish().text
        if detok is not None:
            out.text = detok.output_text

    def _snapshot(self, state: _RequestState) -> RequestOutput:
        finished = all(o.finish_reason is not None for o in state.outputs)
        request = state.request
        if finished:
            self._states.pop(request.request_id, None)
        outputs = [CompletionOutput(
            index=o.index, text=o.text, token_ids=o.token_ids, delta_text=o.delta_text,
            delta_token_ids=o.delta_token_ids, delta_logprobs=o.delta_logprobs, logprobs=o.logprobs,
            finish_reason=o.finish_reason, stop_reason=o.stop_reason) for o in state.outputs]
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished,
                             num_cached_tokens=request.num_cached_tokens,
                             first_scheduled_time=request.first_scheduled_time)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(self.model_config.eos_token_ids)
        try:
            ids = load_eos_token_ids(self.model_dir, self.tokenizer) + ids
        except (OSError, ValueError) as exc:
            log.warning("no EOS ids from generation_config.json or the tokenizer: %s", exc)
        return tuple(dict.fromkeys(ids))

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        requested = self.config.max_model_len
        if requested is not None and requested > limit:
            raise ConfigError(f"--max-model-len {requested} exceeds the model's max_position_embeddings ({limit})")
        return requested or limit

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = kv_bytes_per_block(self.model_config, cfg.block_size, self.dtype)
        budget = cfg.kv_cache_memory or int(available_memory(self.device) * cfg.kv_cache_fraction)
        if cfg.kv_cache_memory is None and self.device.type == "cpu":
            budget //= self.ep_size // cfg.nnodes    # the ranks of this node share its memory
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        needed = blocks_per_seq * cfg.max_num_seqs     # more than this can never be used
        blocks = min(budget // per_block, needed)
        if blocks < 1:
            raise ConfigError(f"--kv-cache-memory {budget} bytes is less than one KV block ({per_block} bytes)")
        if blocks < blocks_per_seq:
            log.warning("the KV cache holds %d tokens, less than --max-model-len %d: sequences are capped there",
                        blocks * cfg.block_size, self.max_model_len)
        kind = "latent (MLA)" if self.model_config.mla else "K and V"
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB), %d bytes per token of %s", blocks, cfg.block_size,
                 blocks * per_block / 2**20, per_block // cfg.block_size, kind)
        return int(blocks)


def _builtin_dir() -> Path:
    from moeserve.models.builtin import ensure_builtin_model
    return ensure_builtin_model()


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: no usable tokenizer (%s); only token-id prompts will work", model_dir, exc)
        return None
