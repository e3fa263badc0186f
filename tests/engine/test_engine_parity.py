"""Batch invariance, end to end: greedy tokens do not depend on what else shares the step.

Twelve prompts of 1..300 tokens submitted together under a 64-token step budget force chunked
prefill (a long prompt spans several steps) and mixed steps (prefill chunks beside decodes). Each
prompt must get exactly the tokens it gets alone (with a budget big enough for no chunking) and
exactly what transformers' own greedy generate() produces. Run with the native CPU kernels
(moeserve/kernels: rotary + cache write, decode attention, RMSNorm) and with the PyTorch ops
they replace.
"""

from __future__ import annotations

import pytest

from tests.checkpoints import ARCHITECTURES
from tests.engine.engine_helpers import hf_greedy, load_hf, make_llm, random_prompts

from moeserve.kernels import native
from moeserve.request import SamplingParams

PROMPT_LENS = (1, 2, 5, 9, 16, 17, 33, 64, 100, 150, 255, 300)
MAX_TOKENS = 16     # enough to cross a block boundary after prompts of 17, 255 and 300
BUDGET = 64


def _record_batches(llm) -> list:
    """Wrap the runner so each executed ScheduledBatch is kept for inspection."""
    batches, execute = [], llm.engine.runner.execute

    def recording(batch):
        batches.append(batch)
        return execute(batch)

    llm.engine.runner.execute = recording
    return batches


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_equals_alone_equals_transformers(arch, kernels, tiny_checkpoints, monkeypatch):
    if kernels == "torch":
        monkeypatch.setattr(native, "supports", lambda *tensors: False)
    elif native.library() is None:
        pytest.skip("no native kernels on this machine")
    model_dir = tiny_checkpoints[arch]
    prompts = random_prompts(PROMPT_LENS, seed=len(arch))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    batched_llm = make_llm(model_dir, max_num_batched_tokens=BUDGET, max_num_seqs=16)
    batches = _record_batches(batched_llm)
    batched = batched_llm.generate(prompts, params)

    # The small budget really did split prompts and mix prefill chunks with decodes.
    assert all(b.num_tokens <= BUDGET for b in batches)
    assert any(s.start_pos > 0 and len(s.token_ids) > 1 for b in batches for s in b.seqs), \
        "no prefill chunk continued a partly computed prompt"
    assert any(any(len(s.token_ids) == 1 and not s.prompt_token_ids[s.start_pos:] for s in b.seqs)
               and any(len(s.token_ids) > 1 for s in b.seqs) for b in batches), \
        "no step mixed decodes with prefill chunks"

    alone_llm = make_llm(model_dir, max_num_batched_tokens=2048, max_num_seqs=1)
    ref = load_hf(model_dir)
    for prompt, out in zip(prompts, batched):
        where = f"{arch}: prompt of {len(prompt)} tokens"
        assert out.prompt_token_ids == prompt
        (choice,) = out.outputs
        assert choice.finish_reason.value == "length"
        assert len(choice.token_ids) == MAX_TOKENS
        (alone,) = alone_llm.generate([prompt], params)
        assert choice.token_ids == alone.outputs[0].token_ids, where
        expected = hf_greedy(ref, prompt, MAX_TOKENS)
        assert choice.token_ids == expected, f"{where}, vs transformers"

    for llm in (batched_llm, alone_llm):
        blocks = llm.engine.scheduler.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
