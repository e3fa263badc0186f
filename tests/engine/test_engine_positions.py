"""The rotary tables hold the served context (--max-model-len), and a sequence reaching it still
generates the same tokens as one with the model's whole length available."""

from tests.engine.engine_helpers import kv_bytes_for_blocks, make_llm, random_prompts

from moeserve.request import SamplingParams


def test_rotary_tables_follow_max_model_len(tiny_checkpoints):
    model_dir = tiny_checkpoints["llama4"]                # chunked and NoPE layers: positions matter
    short = make_llm(model_dir, max_model_len=100)
    rotary = short.engine.model.layers[0].attn.rotary
    assert rotary.cos.shape[0] == 100 < short.engine.model_config.max_position_embeddings
    prompt = random_prompts([90], seed=9)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    (out,) = short.generate([prompt], params)
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason.value == "length"
    (full,) = make_llm(model_dir).generate([prompt], params)
    assert out.outputs[0].token_ids == full.outputs[0].token_ids[:10]


def test_rotary_tables_follow_the_kv_cache_when_it_holds_less(tiny_checkpoints):
    """No --max-model-len: the tables stop where the cache does (a sequence can go no further)."""
    model_dir = tiny_checkpoints["llama4"]
    llm = make_llm(model_dir, kv_cache_memory=kv_bytes_for_blocks(model_dir, 5))
    assert llm.engine.max_model_len == llm.engine.model_config.max_position_embeddings
    assert llm.engine.model.layers[0].attn.rotary.cos.shape[0] == 5 * 16
