"""moeserve_expert_tokens_total equals an independent recount of the router's choices by transformers.

moeserve counts every token it runs through the model: each prompt token and each generated token
except the last one sampled (never fed back), i.e. positions 0 .. len(prompt) + len(output) - 2.
The recount runs the transformers model over exactly those tokens with output_router_logits=True
and takes the top-k of the softmax per token and MoE layer. Qwen2-MoE with mlp_only_layers=[1]
checks that the `layer` label is the model's layer index, not the row of the MoE-layer table.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.config import EngineConfig, ServerConfig
from moeserve.request import SamplingParams
from tests.checkpoints import write_checkpoint
from tests.metrics.metrics_helpers import render

VOCAB = 320                         # tests/checkpoints.py vocab_size
NEAR_TIE = 1e-4                     # k-th vs (k+1)-th router probability: float noise may swap them
PROMPT_LENS = (7, 23, 40)
# Greedy and seeded sampling; max_tokens=1 counts the prompt only (the one sampled token is never fed back).
SAMPLING = (SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=1.0, seed=3, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3"])
def checkpoint(request, tmp_path_factory):
    return request.param, write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    import transformers as hf
    return hf.AutoModelForCausalLM.from_pretrained(str(checkpoint[1]), dtype=torch.float32).eval()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _serve(model_dir, expert_metrics: str = "full"):
    """Runs the prompts through moeserve's engine (small steps: prefill is chunked and batched with
    decodes); returns the server context and every sequence moeserve ran through the model."""
    from moeserve.server.launch import build_context
    engine_cfg = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=8 << 20,
                              max_num_batched_tokens=16)
    ctx = build_context(engine_cfg, ServerConfig(expert_metrics=expert_metrics))
    engine = ctx.engine.engine
    prompts = _prompts()
    for i, (prompt, sampling) in enumerate(zip(prompts, SAMPLING)):
        engine.add_request(f"r{i}", prompt, sampling)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert engine.scheduler.num_preemptions == 0, "a preempted sequence is recomputed and counted twice"
    fed = []
    for i, (prompt, sampling) in enumerate(zip(prompts, SAMPLING)):
        generated = outputs[f"r{i}"]
        assert len(generated) == sampling.max_tokens
        fed.append(prompt + generated[:-1])
    return ctx, fed


def _moe_layer_ids(model) -> list[int]:
    """Indices of the decoder layers that hold a sparse MoE block, found in transformers' modules."""
    return [i for i, layer in enumerate(model.model.layers)
            if any(type(m).__name__.endswith(("SparseMoeBlock", "V3MoE")) for m in layer.modules())]


def _routes(model, seq: list[int], num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer: (scores the choice ranks [T, E], chosen experts [T, K]) by transformers.
    Softmax routers: from the router logits. DeepSeek-V3: its router's own choice (sigmoid
    scores + correction bias within the best groups), taken from a forward hook."""
    top_k = model.config.num_experts_per_tok
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
    if not routers:
        out = model(torch.tensor([seq]), output_router_logits=True)
        probs = [logits.float().reshape(-1, num_experts).softmax(dim=-1) for logits in out.router_logits]
        return [(p, p.topk(top_k, dim=-1).indices) for p in probs]
    seen = []
    hooks = [r.register_forward_hook(lambda m, i, o: seen.append((o[0].sigmoid() + m.e_score_correction_bias, o[2])))
             for r in routers]
    model(torch.tensor([seq]))
    for hook in hooks:
        hook.remove()
    return seen


@torch.no_grad()
def _hf_recount(model, sequences: list[list[int]]) -> tuple[dict[tuple[str, str], int], int]:
    """{(layer, expert): routes} by transformers, and the number of near-tie routing decisions."""
    cfg = model.config
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    top_k = cfg.num_experts_per_tok
    layer_ids = _moe_layer_ids(model)
    counts = torch.zeros(len(layer_ids), num_experts, dtype=torch.int64)
    near_ties = 0
    for seq in sequences:
        routes = _routes(model, seq, num_experts)
        assert len(routes) == len(layer_ids)
        for row, (scores, chosen) in enumerate(routes):               # [T, E], [T, K] per MoE layer
            assert scores.shape[0] == len(seq)
            ranked = scores.sort(dim=-1, descending=True).values
            near_ties += int((ranked[:, top_k - 1] - ranked[:, top_k] < NEAR_TIE).sum())
            counts[row] += torch.bincount(chosen.flatten(), minlength=num_experts)
    table = {(str(layer), str(e)): int(counts[row, e])
             for row, layer in enumerate(layer_ids) for e in range(num_experts)}
    return table, near_ties


def _assert_counts_match(got: dict, want: dict, near_ties: int) -> None:
    assert set(got) == set(want)
    # Each near tie may move one route from one expert to another: 2 units of difference at most.
    diff = sum(abs(got[key] - want[key]) for key in want)
    assert diff <= 2 * near_ties, {key: (got[key], want[key]) for key in want if got[key] != want[key]}


def test_expert_counts_match_transformers_router(checkpoint, hf_model):
    arch, model_dir = checkpoint
    ctx, fed = _serve(model_dir)
    samples = render(ctx)
    got = {(labels["layer"], labels["expert"]): value
           for labels, value in samples["moeserve_expert_tokens_total"]}
    want, near_ties = _hf_recount(hf_model, fed)
    if arch == "qwen2_moe":      # mlp_only_layers=[1]: layer labels are model layer ids 0 and 2
        assert {layer for layer, _ in got} == {"0", "2"}
    if arch == "deepseek_v3":    # first_k_dense_replace=1: the dense layer 0 exports no expert series
        assert {layer for layer, _ in got} == {"1", "2"}
    top_k = hf_model.config.num_experts_per_tok
    for layer in {layer for layer, _ in want}:
        assert sum(v for (l, _), v in got.items() if l == layer) == top_k * sum(map(len, fed))
    _assert_counts_match(got, want, near_ties)
    assert near_ties <= 2, f"{near_ties} near-tie routing decisions: the comparison is too loose"
    assert all(v == 0 for _, v in samples["moeserve_expert_dropped_tokens_total"])
    ranks = samples["moeserve_rank_expert_tokens_total"]
    assert [(labels["rank"], v) for labels, v in ranks] == [("0", float(sum(want.values())))]
    layers = {labels["layer"] for labels, _ in samples["moeserve_layer_expert_balancedness"]}
    assert layers == {layer for layer, _ in want}
    assert all(0 < v <= 1 for _, v in samples["moeserve_layer_expert_balancedness"])


def test_summary_mode_sums_over_layers(checkpoint, hf_model):
    _, model_dir = checkpoint
    ctx, fed = _serve(model_dir, "summary")
    samples = render(ctx)
    want, near_ties = _hf_recount(hf_model, fed)
    per_expert: dict[tuple[str, str], int] = {}
    for (_, expert), count in want.items():
        per_expert[("all", expert)] = per_expert.get(("all", expert), 0) + count
    got = {(labels["layer"], labels["expert"]): value
           for labels, value in samples["moeserve_expert_tokens_total"]}
    _assert_counts_match(got, per_expert, near_ties)
    dropped = samples["moeserve_expert_dropped_tokens_total"]
    assert {labels["layer"] for labels, _ in dropped} == {"all"} and len(dropped) == len(per_expert)


def test_off_mode_exports_no_expert_series(checkpoint):
    _, model_dir = checkpoint
    ctx, _ = _serve(model_dir, "off")
    samples = render(ctx)
    expert_series = sorted(name for name in samples
                           if "expert" in name and not name.startswith("moeserve_model_info"))
    assert expert_series == []
    assert ctx.engine.engine.model.count_experts is False
    assert int(ctx.engine.engine.model.expert_tokens.sum()) == 0     # not even counted on the device
    assert "moeserve_num_requests_running" in samples and "moeserve_model_info" in samples
