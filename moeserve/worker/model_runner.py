"""ModelRunner: ScheduledBatch -> flat tensors -> forward -> sampled tokens.

Legend: T tokens in the step, B decode sequences, S sampled sequences, V vocab,
NB KV blocks, BS block size, NKV kv heads, D head dim.

It owns the paged KV cache, one tensor [layers, 2, NB, BS, NKV, D] (GQA) or [layers, NB, BS, R + DR]
(latent attention: MoEModelConfig.kv_cache_layer_shape). The flat batch puts the
decode tokens first and the prefill chunks after them (see layers/attention.py); outputs are
returned in the batch's own order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.batch import ScheduledBatch, ScheduledSeq, StepOutput
from moeserve.layers.attention import AttentionMetadata, PrefillChunk
from moeserve.models.config import MoEModelConfig


@dataclass
class PreparedStep:
    input_ids: torch.Tensor     # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor   # [S] int64 flat row of each sampled sequence's last token (batch order)
    sample_seqs: list[ScheduledSeq]


def kv_bytes_per_block(cfg: MoEModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * block_size * cfg.kv_values_per_token * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, sampler=None) -> None:
        cfg: MoEModelConfig = model.cfg
        self.model, self.cfg, self.device = model, cfg, device
        self.block_size = block_size
        self.sampler = sampler
        self.num_blocks = num_blocks
        self.kv_caches = torch.zeros(cfg.num_layers, *cfg.kv_cache_layer_shape(num_blocks, block_size),
                                     dtype=dtype, device=device)
        self._block_offsets = torch.arange(block_size, device=device)   # [BS]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        step = self.prepare(batch)
        logits = self._logits(step)
        outputs = self.sampler.sample(logits, step.sample_seqs) if step.sample_seqs else []
        return StepOutput(outputs=outputs)

    @torch.inference_mode()
    def forward_only(self, batch: ScheduledBatch) -> None:
        """Fills the KV cache and runs the MoE layers, no logits (expert-parallel allreduce ranks > 0)."""
        step = self.prepare(batch)
        self.model(step.input_ids, step.meta, self.kv_caches)

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """[S, V] float32 logits of the sampled sequences, in batch order (tests and benchmarks)."""
        return self._logits(self.prepare(batch))

    def _logits(self, step: PreparedStep) -> torch.Tensor:
        hidden = self.model(step.input_ids, step.meta, self.kv_caches)    # [T, H]
        return self.model.compute_logits(hidden[step.sample_rows])         # [S, V]

    def prepare(self, batch: ScheduledBatch) -> PreparedStep:
        decodes = [s for s in batch.seqs if len(s.token_ids) == 1]
        prefills = [s for s in batch.seqs if len(s.token_ids) > 1]
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        for seq in decodes + prefills:
            n, start = len(seq.token_ids), seq.start_pos
            tokens.extend(seq.token_ids)
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            last_row[id(seq)] = len(tokens) - 1
        meta = AttentionMetadata(
            positions=self._tensor(positions), slot_mapping=self._tensor(slots), num_decodes=len(decodes))
        if decodes:
            meta.decode_slots, meta.decode_lens = self._decode_context(decodes)
        row = len(decodes)
        for seq in prefills:
            n = len(seq.token_ids)
            ctx_slots = self._context_slots([seq.block_table], seq.start_pos + n)[0] if seq.start_pos else None
            meta.prefills.append(PrefillChunk(row, row + n, seq.start_pos, ctx_slots))
            row += n
        sample_seqs = [s for s in batch.seqs if s.sample]
        sample_rows = self._tensor([last_row[id(s)] for s in sample_seqs])
        return PreparedStep(self._tensor(tokens), meta, sample_rows, sample_seqs)

    def _decode_context(self, decodes: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [s.start_pos + 1 for s in decodes]
        slots = self._context_slots([s.block_table for s in decodes], max(lens))   # [B, Lmax]
        return slots.contiguous(), self._tensor(lens)

    def _context_slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """[len(tables), length] cache slots of positions 0..length-1 (padding rows point at block 0)."""
        blocks = -(-length // self.block_size)
        padded = [t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in tables]
        table = self._tensor(padded)                                                # [N, blocks]
        slots = table[:, :, None] * self.block_size + self._block_offsets           # [N, blocks, BS]
        return slots.view(len(tables), -1)[:, :length]

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
