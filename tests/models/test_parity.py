"""moeserve's logits match transformers' for every supported architecture, float32.

Each test drives ModelRunner.forward_logits with hand-built ScheduledBatches over the paged KV
cache (prefill batches, chunked prefill, batched decodes, decodes mixed with prefill chunks) and
compares every sampled row with the Hugging Face model run on the whole sequence alone.
Block tables are distinct, shuffled block ids so that paging mistakes show up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers as hf

from checkpoints import ARCHITECTURES
from moeserve.engine.batch import ScheduledBatch, ScheduledSeq
from moeserve.models.loader import load_model
from moeserve.worker.model_runner import ModelRunner

BLOCK_SIZE = 16
NUM_BLOCKS = 96
VOCAB = 320          # tests/checkpoints.py vocab_size
PROMPT_LENS = (1, 5, 17, 64, 130)
ATOL = 1e-4


@dataclass
class Models:
    ours: torch.nn.Module
    ref: torch.nn.Module


@dataclass
class Seq:
    """One sequence's full token list (prompt + teacher-forced decode tokens) and its KV blocks."""
    seq_id: int
    tokens: list[int]
    table: list[int]
    done: int = 0                                   # tokens already run (== cached)
    expected: torch.Tensor = field(default=None)    # [len(tokens), V] HF logits at every position

    def chunk(self, n: int, sample: bool = True) -> ScheduledSeq:
        ids = self.tokens[self.done: self.done + n]
        seq = ScheduledSeq(self.seq_id, ids, self.done, self.table, sample, None, [], [])
        self.done += len(ids)
        return seq


class Harness:
    def __init__(self, models: Models, seed: int = 0) -> None:
        self.models = models
        self.runner = ModelRunner(models.ours, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
        self.gen = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(NUM_BLOCKS, generator=self.gen).tolist()
        self.next_id = 0

    def new_seq(self, length: int) -> Seq:
        tokens = torch.randint(0, VOCAB, (length,), generator=self.gen).tolist()
        nblocks = -(-length // BLOCK_SIZE)
        table, self.free_blocks = self.free_blocks[:nblocks], self.free_blocks[nblocks:]
        assert len(table) == nblocks, "test uses more blocks than NUM_BLOCKS"
        with torch.no_grad():
            expected = self.models.ref(torch.tensor([tokens])).logits[0].float()
        self.next_id += 1
        return Seq(self.next_id, tokens, table, expected=expected)

    def step(self, chunks: list[tuple[Seq, ScheduledSeq]]) -> None:
        """Runs one batch and checks every sampled row against HF at that chunk's last position."""
        batch = ScheduledBatch([c for _, c in chunks], sum(len(c.token_ids) for _, c in chunks), BLOCK_SIZE)
        logits = self.runner.forward_logits(batch)
        sampled = [(s, c) for s, c in chunks if c.sample]
        assert logits.shape == (len(sampled), VOCAB)
        for row, (seq, chunk) in zip(logits, sampled):
            pos = chunk.start_pos + len(chunk.token_ids) - 1
            diff = (row - seq.expected[pos]).abs().max().item()
            assert diff <= ATOL, f"seq {seq.seq_id} position {pos}: max abs diff {diff:.3g}"


def _load(directory, **hf_kwargs) -> Models:
    ours = load_model(directory, torch.float32, progress=False)
    ref = hf.AutoModelForCausalLM.from_pretrained(directory, **hf_kwargs).eval()
    return Models(ours, ref)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, make_checkpoint) -> Models:
    return _load(make_checkpoint(request.param, request.param))


def test_prefill_batch_last_token(models: Models) -> None:
    h = Harness(models)
    seqs = [h.new_seq(n) for n in PROMPT_LENS]
    h.step([(s, s.chunk(len(s.tokens))) for s in seqs])


def test_chunked_prefill_then_decode(models: Models) -> None:
    """Chunks of 7 read earlier chunks from the paged cache; then the decode path, token by token."""
    h = Harness(models, seed=1)
    seq = h.new_seq(45 + 6)
    while seq.done < 45:
        h.step([(seq, seq.chunk(min(7, 45 - seq.done)))])
    while seq.done < len(seq.tokens):
        h.step([(seq, seq.chunk(1))])


def test_decodes_batched_with_prefill_chunks(models: Models) -> None:
    """Decodes of different context lengths share a step with other sequences' prefill chunks.

    Batch order puts prefill chunks before decodes (the runner reorders internally), and the
    middle chunks of a prompt are not sampled, as the scheduler would send them.
    """
    h = Harness(models, seed=2)
    running = [h.new_seq(n + 4) for n in PROMPT_LENS]
    h.step([(s, s.chunk(len(s.tokens) - 4)) for s in running])
    late_a, late_b = h.new_seq(30), h.new_seq(12)
    for step in range(4):
        chunks = []
        if late_a.done < len(late_a.tokens):
            n = min(9, len(late_a.tokens) - late_a.done)
            chunks.append((late_a, late_a.chunk(n, sample=late_a.done + n == len(late_a.tokens))))
        if step == 1:
            chunks.append((late_b, late_b.chunk(len(late_b.tokens))))
        chunks += [(s, s.chunk(1)) for s in running]
        h.step(chunks)


def test_decode_only_batch_after_prefill(models: Models) -> None:
    h = Harness(models, seed=3)
    seqs = [h.new_seq(n + 3) for n in PROMPT_LENS]
    h.step([(s, s.chunk(len(s.tokens) - 3)) for s in seqs])
    for _ in range(3):
        h.step([(s, s.chunk(1)) for s in reversed(seqs)])


SLIDING_CASES = {
    # name: (arch, checkpoint overrides, expected per-layer windows, HF kwargs that disable the window)
    "mixtral": ("mixtral", dict(sliding_window=8), (8, 8, 8), dict(sliding_window=None)),
    "qwen2_moe": ("qwen2_moe",
                  dict(use_sliding_window=True, sliding_window=8,
                       layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
                  (None, 8, 8), dict(layer_types=["full_attention"] * 3)),
    # tests/checkpoints.py's gpt_oss already alternates sliding (window 8) and full layers
    "gpt_oss": ("gpt_oss", {}, (8, None, 8), dict(layer_types=["full_attention"] * 3)),
}


@pytest.mark.parametrize("case", sorted(SLIDING_CASES))
def test_sliding_window(case: str, make_checkpoint) -> None:
    """A 40-token prompt with window 8: chunked prefill over the cache, then decodes past the window.

    HF's default (sdpa) path applies the window through its mask; it agrees with eager to ~2e-6.
    """
    arch, overrides, windows, no_window = SLIDING_CASES[case]
    directory = make_checkpoint(f"sliding_{case}", arch, **overrides)
    models = _load(directory)
    assert models.ours.cfg.sliding_windows == windows
    h = Harness(models, seed=4)
    seq = h.new_seq(40 + 5)
    while seq.done < 40:
        h.step([(seq, seq.chunk(min(7, 40 - seq.done)))])
    whole = h.new_seq(40)                      # the same window applied within one prefill chunk
    h.step([(whole, whole.chunk(40))] + [(seq, seq.chunk(1))])
    while seq.done < len(seq.tokens):
        h.step([(seq, seq.chunk(1))])
    # The window must matter here, or this test would pass with full attention too.
    full = hf.AutoModelForCausalLM.from_pretrained(directory, **no_window).eval()
    with torch.no_grad():
        full_logits = full(torch.tensor([seq.tokens])).logits[0]
    assert (full_logits[-1] - seq.expected[-1]).abs().max() > 1e-2


def test_gpt_oss_sinks_matter(make_checkpoint) -> None:
    """The parity above would catch sinks ignored: without them transformers' logits move."""
    directory = make_checkpoint("gpt_oss", "gpt_oss")
    ref = hf.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokens = torch.tensor([list(range(40))])
    with torch.no_grad():
        with_sinks = ref(tokens).logits
        for layer in ref.model.layers:
            layer.self_attn.sinks.fill_(-1e4)      # exp(-1e4) = 0: no sink
        without = ref(tokens).logits
    assert (with_sinks - without).abs().max() > 1e-2
