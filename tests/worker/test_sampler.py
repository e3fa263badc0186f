"""Sampler: greedy, filters, seeded determinism, distribution, penalties, logprobs, min_tokens."""

from __future__ import annotations

import pytest
import torch

from moeserve.engine.batch import ScheduledSeq
from moeserve.request import SamplingParams
from moeserve.worker.sampler import Sampler, row_seed


def seq(seq_id: int = 0, output: list[int] | None = None, prompt: list[int] | None = None,
        seed_offset: int = 0, **params) -> ScheduledSeq:
    return ScheduledSeq(seq_id=seq_id, token_ids=[0], start_pos=0, block_table=[0], sample=True,
                        sampling=SamplingParams(**params), output_token_ids=output or [],
                        prompt_token_ids=prompt or [1, 2, 3], seed_offset=seed_offset)


def tokens(sampler: Sampler, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> list[int]:
    return [o.token_id for o in sampler.sample(logits, seqs)]


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(seed=1234)


def test_greedy_is_argmax(sampler):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(logits, [seq(i, temperature=0.0) for i in range(8)])
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()
    assert [o.seq_id for o in out] == list(range(8))
    assert all(o.logprob is None and o.top_logprobs is None for o in out)


def test_top_k_one_is_greedy(sampler):
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    seqs = [seq(i, temperature=1.5, top_k=1) for i in range(16)]
    assert tokens(sampler, logits, seqs) == logits.argmax(-1).tolist()


def test_greedy_and_random_rows_mix(sampler):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    seqs = [seq(i, temperature=0.0 if i % 2 else 1.0, top_p=0.5) for i in range(6)]
    got = tokens(sampler, logits, seqs)
    assert got[1::2] == logits.argmax(-1).tolist()[1::2]


def draws(sampler: Sampler, row: torch.Tensor, n: int = 4000, **params) -> list[int]:
    """n independent draws from one row of logits (the row repeated over the batch)."""
    return tokens(sampler, row.expand(n, -1).clone(), [seq(i, **params) for i in range(n)])


def geometric_logits(V: int = 20) -> torch.Tensor:
    probs = torch.tensor([0.5 ** (i + 1) for i in range(V)])          # clear gaps between tokens
    return probs.log()[torch.randperm(V, generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("k", [1, 2, 5, 19])
def test_top_k_never_samples_filtered(sampler, k):
    row = geometric_logits()
    allowed = set(row.topk(k).indices.tolist())
    got = draws(sampler, row, temperature=3.0, top_k=k)   # a high temperature flattens the tail
    assert set(got) <= allowed
    assert len(set(got)) == len(allowed) or k > 10        # each kept token shows up


def nucleus(row: torch.Tensor, p: float) -> set[int]:
    """The most likely tokens until their probability mass reaches p."""
    probs = row.softmax(-1)
    allowed, mass = set(), 0.0
    for tok in probs.argsort(descending=True).tolist():
        allowed.add(tok)
        mass += probs[tok].item()
        if mass >= p:
            return allowed
    return allowed


@pytest.mark.parametrize("p", [0.3, 0.6, 0.8, 0.95])
def test_top_p_never_samples_filtered(sampler, p):
    row = geometric_logits()
    got = draws(sampler, row, top_p=p)
    assert set(got) == nucleus(row, p)


def test_min_p_never_samples_filtered(sampler):
    row = geometric_logits()
    probs = (row / 2.0).softmax(-1)
    allowed = set((probs >= 0.1 * probs.max()).nonzero().flatten().tolist())
    got = draws(sampler, row, temperature=2.0, min_p=0.1)
    assert set(got) == allowed


def test_filters_combine_per_row(sampler):
    """Rows with different filters in one batch: each keeps to its own allowed set."""
    row = geometric_logits()
    top3 = set(row.topk(3).indices.tolist())
    seqs = [seq(i, temperature=5.0, **({"top_k": 3} if i % 3 == 0 else
                                       {"top_p": 0.4} if i % 3 == 1 else {})) for i in range(3000)]
    got = tokens(sampler, row.expand(3000, -1).clone(), seqs)
    assert set(got[0::3]) == top3
    assert set(got[1::3]) == nucleus(row / 5.0, 0.4)                  # top-p after temperature
    assert len(set(got[2::3])) > 10                                   # unfiltered row: wide


def test_seeded_rows_ignore_batch_company():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(4))
    seeded = [seq(100, seed=7, output=list(range(n))) for n in range(20)]
    alone = [tokens(Sampler(), logits, [s])[0] for s in seeded]
    for trial in range(5):
        others = [seq(i, temperature=0.8, top_p=0.9 if i % 2 else 1.0) for i in range(7)]
        for s, want in zip(seeded, alone):
            batch = others[:] + [s]
            perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(trial))
            batch = [batch[i] for i in perm.tolist()]
            got = tokens(Sampler(seed=trial), logits.expand(len(batch), -1).clone(), batch)
            assert got[batch.index(s)] == want
    assert len(set(alone)) > 5                  # the draw changes with the position


def test_seed_offset_and_seed_change_the_stream():
    assert row_seed(7, 0, 3) != row_seed(7, 1, 3) != row_seed(8, 0, 3)
    assert row_seed(7, 0, 3) == row_seed(7, 0, 3) and 0 <= row_seed(2**70, 5, 9) < 2**63


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("seeded", [False, True])
def test_distribution_matches_softmax(seeded):
    probs = [0.4, 0.25, 0.2, 0.1, 0.05]
    row = torch.tensor(probs).log() * 2.0                  # temperature 2 undoes the doubling
    n = 20000
    seqs = [seq(i, temperature=2.0, seed=i if seeded else None) for i in range(n)]
    got = tokens(Sampler(seed=0), row.expand(n, -1).clone(), seqs)
    counts = [got.count(t) for t in range(5)]
    assert chi_square(counts, probs) < 25.0        # df 4: p ~ 5e-5 at 25; fixed seeds, so stable


def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        rep: float, freq: float, pres: float) -> list[float]:
    out = list(logits)
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / rep if out[tok] > 0 else out[tok] * rep
    for tok in set(output):
        out[tok] -= freq * output.count(tok) + pres
    return out


def test_penalties_match_reference(sampler):
    V = 8
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, 2.9],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                           [0.3, -0.3, 4.0, 3.9, 0.1, 0.2, -5.0, 3.95]])
    cases = [dict(prompt=[3, 1], output=[0, 0, 7], rep=1.3, freq=0.5, pres=0.25),
             dict(prompt=[5], output=[2, 2, 2, 4], rep=1.0, freq=0.1, pres=0.0),
             dict(prompt=[2, 6], output=[3, 3], rep=2.0, freq=0.0, pres=0.0)]
    seqs = [seq(i, temperature=0.0, prompt=c["prompt"], output=c["output"],
                repetition_penalty=c["rep"], frequency_penalty=c["freq"],
                presence_penalty=c["pres"]) for i, c in enumerate(cases)]
    want = torch.tensor([reference_penalties(logits[i].tolist(), **c)
                         for i, c in enumerate(cases)])
    from moeserve.worker.sampler import SamplingTensors, apply_penalties
    t = SamplingTensors.from_seqs(seqs, V, (), torch.device("cpu"))
    torch.testing.assert_close(apply_penalties(logits, t), want)
    assert tokens(sampler, logits, seqs) == want.argmax(-1).tolist()


def test_no_penalty_rows_untouched_next_to_penalised_rows():
    from moeserve.worker.sampler import SamplingTensors, apply_penalties
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    seqs = [seq(0, output=[1, 2, 3]), seq(1, output=[1, 2, 3], repetition_penalty=1.5)]
    t = SamplingTensors.from_seqs(seqs, 10, (), torch.device("cpu"))
    assert torch.equal(apply_penalties(logits, t)[0], logits[0])
    assert SamplingTensors.from_seqs(seqs[:1], 10, (), torch.device("cpu")).output_ids is None


def test_logprobs_match_log_softmax_of_raw_logits(sampler):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(6))
    seqs = [seq(0, logprobs=3, repetition_penalty=1.5, output=[1]), seq(1),
            seq(2, logprobs=0, temperature=0.0), seq(3, logprobs=5, top_k=2)]
    out = sampler.sample(logits, seqs)
    ref = logits.log_softmax(-1)
    assert out[1].logprob is None and out[1].top_logprobs is None
    for i, k in ((0, 3), (2, 0), (3, 5)):
        assert out[i].logprob == pytest.approx(ref[i, out[i].token_id].item(), abs=1e-5)
        top = ref[i].topk(k) if k else None
        assert [t for t, _ in out[i].top_logprobs] == (top.indices.tolist() if k else [])
        for (_, lp), want in zip(out[i].top_logprobs, top.values.tolist() if k else []):
            assert lp == pytest.approx(want, abs=1e-5)
    assert all(isinstance(lp, float) for o in out if o.top_logprobs for _, lp in o.top_logprobs)


def test_min_tokens_bans_eos_and_stop_tokens():
    logits = torch.zeros(3, 10)
    logits[:, 9] = 10.0                  # EOS would win
    logits[:, 8] = 9.0                   # then a stop token
    sampler = Sampler(eos_token_ids=[9])
    seqs = [seq(0, temperature=0.0, min_tokens=2, output=[1], stop_token_ids=[8]),
            seq(1, temperature=0.0, min_tokens=2, output=[1, 1], stop_token_ids=[8]),
            seq(2, temperature=0.0, min_tokens=5, ignore_eos=True)]
    assert tokens(sampler, logits, seqs) == [int(logits[0, :8].argmax()), 9, 9]


def test_no_item_calls_on_the_hot_path(monkeypatch, sampler):
    def forbidden(self):
        raise AssertionError("Tensor.item() called while sampling")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    seqs = [seq(0, temperature=0.0), seq(1, top_k=5, top_p=0.8, min_p=0.05, logprobs=2),
            seq(2, seed=3, repetition_penalty=1.2, presence_penalty=0.5, output=[4, 4]),
            seq(3, top_k=7), seq(4, min_tokens=3, stop_token_ids=[1]), seq(5, logprobs=0)]
    assert len(sampler.sample(logits, seqs)) == 6


def test_shape_mismatch_is_an_error(sampler):
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(2, 5), [seq(0)])


def test_bf16_logits_and_huge_top_k(sampler):
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(8)).bfloat16()
    out = tokens(sampler, logits, [seq(i, top_k=1000, temperature=0.0 if i == 0 else 1.0)
                                   for i in range(3)])
    assert out[0] == int(logits[0].float().argmax()) and all(0 <= t < 17 for t in out)


def reference_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Tokens kept by top-k then top-p, the textbook way: sort the row, renormalise, cut."""
    order = row.argsort(descending=True)[: k if k > 0 else None]
    probs = row[order].double().softmax(-1)
    excl = probs.cumsum(-1) - probs
    return set(order[excl < p].tolist())


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])     # flat (nucleus > candidates) .. sharp
def test_top_k_top_p_mask_matches_sorting_reference(scale):
    from moeserve.worker.sampler import SamplingTensors, apply_top_k_top_p
    V = 5000
    settings = [(-1, 0.9), (50, 0.9), (3000, 0.5), (-1, 1.0), (10, 1.0), (-1, 0.2), (2000, 0.99)]
    logits = torch.randn(len(settings), V, generator=torch.Generator().manual_seed(9)) * scale
    seqs = [seq(i, top_k=k, top_p=p) for i, (k, p) in enumerate(settings)]
    t = SamplingTensors.from_seqs(seqs, V, (), torch.device("cpu"))
    kept = apply_top_k_top_p(logits, t) > float("-inf")
    for i, (k, p) in enumerate(settings):
        assert set(kept[i].nonzero().flatten().tolist()) == reference_keep(logits[i], k, p)
