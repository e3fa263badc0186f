"""The rotary tables hold the served context (--max-model-len), and a sequence reaching it still
generates the same tokens as one with the model's whole length available."""

from tests.engine.engine_helpers import make_llm, random_prompts

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
