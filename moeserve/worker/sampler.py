"""Batched sampling: logits [B, V] -> one token per sequence, plus logprobs when asked for.

Legend: B sequences that sample this step, V vocabulary, L longest padded token list,
R rows that asked for logprobs, K largest top-logprobs count among them.

Order (as vLLM): logprobs come from the raw logits. Then min_tokens masks the stop tokens,
penalties apply, greedy rows take the argmax; random rows go through temperature, top-k, top-p,
min-p and an exponential race: argmax(probs / q) with q ~ Exp(1) samples exactly from probs
(it is the Gumbel-max trick in another form), and lets each row draw q from its own generator.
Every per-row value is gathered in Python and moved with one torch.tensor call per field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moeserve.engine.batch import ScheduledSeq, SeqOutput
from moeserve.kernels import native, ops
from moeserve.request import GREEDY_TEMPERATURE     # below it a temperature means argmax

# A top-p nucleus nearly always lies within a row's 1024 most likely tokens. torch.topk of those
# costs ~3 ms for [16, 32000] on this CPU where a full torch.sort costs ~60 ms; a row whose nucleus
# reaches further is caught and the step redone over the whole vocabulary.
TOP_P_CANDIDATES = 1024
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, seed_offset: int, step: int) -> int:
    """Seed of one row's generator: depends only on the request seed, the sequence index within
    the request and the number of tokens generated so far, so a seeded sequence samples the same
    tokens whatever else shares its batch (and after a preemption). Python's hash() of a str is
    salted per process; splitmix64 is the same on every rank and every run."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (seed_offset & _MASK64))
    return _splitmix64(h ^ step) >> 1           # 63 bits: always a valid manual_seed


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> Tensor:
    width = max(map(len, rows), default=0)
    padded = [r + [pad] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=device).view(len(rows), width)  # [B, L]


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """Per-row sampling settings of one step; a field is None when no row needs it."""
    greedy: Tensor                      # [B] bool
    any_greedy: bool
    all_greedy: bool
    temperature: Tensor | None          # [B] float32, 1.0 on greedy rows; None when all greedy
    top_k: Tensor | None                # [B] long, V where off
    candidates: int                     # first guess at how many tokens top-k/top-p can keep
    top_p: Tensor | None                # [B] float32, 1.0 where off
    min_p: Tensor | None                # [B] float32, 0.0 where off
    repetition: Tensor | None           # [B] float32, 1.0 where off
    frequency: Tensor | None            # [B] float32 (set together with presence)
    presence: Tensor | None             # [B] float32
    prompt_ids: Tensor | None           # [B, L] long, padded with V; rows without repetition empty
    output_ids: Tensor | None           # [B, L] long, padded with V; rows without penalties empty
    ban_rows: Tensor | None             # [N] long: (row, token) pairs masked by min_tokens
    ban_cols: Tensor | None             # [N] long
    row_seeds: list[tuple[int, int]]    # (row, generator seed) for seeded random rows
    any_unseeded: bool                  # some random row draws from the shared generator
    logprob_rows: list[int]             # rows that asked for logprobs
    logprob_ks: list[int]               # their top-logprobs counts

    @classmethod
    def from_seqs(cls, seqs: Sequence[ScheduledSeq], vocab_size: int,
                  eos_token_ids: Sequence[int], device: torch.device) -> SamplingTensors:
        params = [s.sampling for s in seqs]
        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        all_greedy = all(greedy)
        fields = _filter_fields(params, greedy, vocab_size, device) if not all_greedy else {}
        return cls(
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            any_greedy=any(greedy),
            all_greedy=all_greedy,
            temperature=fields.get("temperature"),
            top_k=fields.get("top_k"),
            candidates=fields.get("candidates", 0),
            top_p=fields.get("top_p"),
            min_p=fields.get("min_p"),
            **_penalty_fields(seqs, vocab_size, device),
            **_ban_fields(seqs, vocab_size, eos_token_ids, device),
            **_seed_fields(seqs, greedy),
            logprob_rows=[i for i, p in enumerate(params) if p.logprobs is not None],
            logprob_ks=[p.logprobs for p in params if p.logprobs is not None],
        )


def _filter_fields(params: list, greedy: list[bool], vocab_size: int,
                   device: torch.device) -> dict:
    """Temperature and filter settings; a filter no row uses stays None so its work is skipped."""
    f32 = dict(dtype=torch.float32, device=device)
    out: dict = {"temperature": torch.tensor(
        [1.0 if g else p.temperature for p, g in zip(params, greedy)], **f32)}
    ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    bounds = [k for k in ks if k < vocab_size]             # rows whose top-k bounds what they keep
    if bounds:
        out["top_k"] = torch.tensor(ks, dtype=torch.long, device=device)
    if any(p.top_p < 1.0 for p in params):
        out["top_p"] = torch.tensor([p.top_p for p in params], **f32)
        if any(p.top_p < 1.0 and k == vocab_size for p, k in zip(params, ks)):
            bounds.append(TOP_P_CANDIDATES)
    out["candidates"] = min(vocab_size, max(bounds, default=0))
    if any(p.min_p > 0.0 for p in params):
        out["min_p"] = torch.tensor([p.min_p for p in params], **f32)
    return out


def _penalty_fields(seqs: Sequence[ScheduledSeq], vocab_size: int, device: torch.device) -> dict:
    params = [s.sampling for s in seqs]
    rep = [p.repetition_penalty != 1.0 for p in params]
    freq = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    out = dict.fromkeys(("repetition", "frequency", "presence", "prompt_ids", "output_ids"))
    if not any(rep) and not any(freq):
        return out
    f32 = dict(dtype=torch.float32, device=device)
    # Only rows with a penalty contribute token ids: the others would just widen the padding.
    out["output_ids"] = _pad([list(s.output_token_ids) if r or f else []
                              for s, r, f in zip(seqs, rep, freq)], vocab_size, device)
    if any(rep):
        out["repetition"] = torch.tensor([p.repetition_penalty for p in params], **f32)
        out["prompt_ids"] = _pad([list(s.prompt_token_ids) if r else []
                                  for s, r in zip(seqs, rep)], vocab_size, device)
    if any(freq):
        out["frequency"] = torch.tensor([p.frequency_penalty for p in params], **f32)
        out["presence"] = torch.tensor([p.presence_penalty for p in params], **f32)
    return out


def _ban_fields(seqs: Sequence[ScheduledSeq], vocab_size: int, eos_token_ids: Sequence[int],
                device: torch.device) -> dict:
    """min_tokens: until a sequence has that many tokens, its stop tokens cannot be sampled."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(seqs):
        p = s.sampling
        if len(s.output_token_ids) >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids))
        banned = [t for t in banned if 0 <= t < vocab_size]
        rows += [i] * len(banned)
        cols += banned
    if not rows:
        return {"ban_rows": None, "ban_cols": None}
    return {"ban_rows": torch.tensor(rows, dtype=torch.long, device=device),
            "ban_cols": torch.tensor(cols, dtype=torch.long, device=device)}


def _seed_fields(seqs: Sequence[ScheduledSeq], greedy: list[bool]) -> dict:
    row_seeds = [(i, row_seed(s.sampling.seed, s.seed_offset, len(s.output_token_ids)))
                 for i, s in enumerate(seqs) if not greedy[i] and s.sampling.seed is not None]
    any_unseeded = any(not g and s.sampling.seed is None for s, g in zip(seqs, greedy))
    return {"row_seeds": row_seeds, "any_unseeded": any_unseeded}


def _token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    """[B, L] ids padded with V -> [B, V] float32 occurrence counts (the pad lands in column V)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Repetition penalty over prompt + output tokens (CTRL, Keskar et al. 2019, as vLLM/HF:
    divide positive logits, multiply negative ones); frequency and presence penalties over
    output tokens only (OpenAI: logit -= freq * count + presence * (count > 0))."""
    if t.output_ids is None:
        return logits
    V = logits.shape[1]
    out_counts = _token_counts(t.output_ids, V)                                # [B, V]
    if t.repetition is not None:
        seen = (_token_counts(t.prompt_ids, V) + out_counts) > 0               # [B, V]
        rep = t.repetition.unsqueeze(1)                                        # [B, 1]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if t.frequency is not None:
        logits = (logits - t.frequency.unsqueeze(1) * out_counts
                  - t.presence.unsqueeze(1) * (out_counts > 0).float())
    return logits


def apply_top_k_top_p(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Mask to -inf every token outside the row's top-k and top-p (nucleus, Holtzman et al. 2019)
    sets. Both are found among the row's `candidates` most likely tokens (torch.topk, no sort)."""
    if t.top_k is None and t.top_p is None:
        return logits
    K, V = t.candidates, logits.shape[1]
    floor, complete = _top_k_top_p_floor(logits, t, K)
    if not complete:                     # one host sync, only when a nucleus outgrew K tokens
        floor, _ = _top_k_top_p_floor(logits, t, V)
    return logits.masked_fill(logits < floor, float("-inf"))


def _top_k_top_p_floor(logits: Tensor, t: SamplingTensors, K: int) -> tuple[Tensor, bool]:
    """Per-row lowest logit to keep [B, 1], and whether each nucleus ended within K tokens."""
    V = logits.shape[1]
    top = logits.topk(K, dim=-1).values                        # [B, K] descending
    floor = torch.full_like(top[:, :1], float("-inf"))         # [B, 1]
    bounded = torch.zeros_like(floor, dtype=torch.bool)        # rows whose top-k is within K
    if t.top_k is not None:
        bounded = (t.top_k <= K).unsqueeze(1)
        kth = top.gather(1, (t.top_k.clamp(max=K) - 1).unsqueeze(1))            # [B, 1]
        floor = torch.where(bounded, kth, floor)
        top = top.masked_fill(top < floor, float("-inf"))
    if t.top_p is None:
        return floor, True
    # Candidate probabilities under the (top-k filtered) row: a row that top-k bounds normalises
    # over its candidates, any other row over its whole vocabulary.
    norm = torch.where(bounded, top.logsumexp(-1, keepdim=True),
                       logits.logsumexp(-1, keepdim=True))                     # [B, 1]
    probs = (top - norm).exp()                                                  # [B, K]
    mass = probs.cumsum(dim=-1)                                                 # [B, K]
    p = t.top_p.unsqueeze(1)                                                    # [B, 1]
    # Keep a token while the mass of the more likely ones is below p (so at least one).
    kept = ((mass - probs) < p).sum(dim=-1, keepdim=True)                       # [B, 1]
    nucleus = torch.where(p < 1.0, top.gather(1, kept - 1), float("-inf"))
    floor = torch.maximum(floor, nucleus)
    if K == V:
        return floor, True
    outgrown = (p < 1.0) & ~bounded & (mass[:, -1:] < p)
    return floor, not bool(outgrown.any())


def apply_min_p(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Keep tokens with prob >= min_p * max prob, i.e. logit >= max logit + log(min_p); the ratio
    of two probabilities survives renormalisation, so this may run after top-k / top-p."""
    if t.min_p is None:
        return logits
    floor = logits.max(dim=-1, keepdim=True).values + t.min_p.log().unsqueeze(1)   # [B, 1]
    return logits.masked_fill(logits < floor, float("-inf"))


def _argmax(x: Tensor) -> Tensor:
    """x [B, V] -> x.argmax(-1) [B]; on the CPU the native kernel (torch's argmax took ~30 us per
    32k-entry row, 0.3-0.5 ms of a batch-16 step)."""
    if x.stride(-1) == 1 and native.supports(x):
        return ops.argmax(x)
    return x.argmax(dim=-1)


class Sampler:
    """Samples one token per row. Unseeded rows share one generator; seeded rows get their own."""

    def __init__(self, eos_token_ids: Sequence[int] = (), seed: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def sample(self, logits: Tensor, seqs: Sequence[ScheduledSeq]) -> list[SeqOutput]:
        """logits [B, V]: one row per seq in seqs (the ones sampling this step), in order."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(seqs)} sequences")
        logits = logits.float()
        t = SamplingTensors.from_seqs(seqs, logits.shape[1], self.eos_token_ids, logits.device)
        sampled = self._choose(logits, t)                                       # [B]
        return self._outputs(logits, sampled, t, seqs)

    def _choose(self, raw: Tensor, t: SamplingTensors) -> Tensor:
        logits = raw
        if t.ban_rows is not None:
            logits = logits.index_put((t.ban_rows, t.ban_cols),
                                      torch.tensor(float("-inf"), device=raw.device))
        logits = apply_penalties(logits, t)                                     # [B, V]
        if t.all_greedy:
            return _argmax(logits)
        greedy_ids = _argmax(logits) if t.any_greedy else None                  # [B]
        logits = logits / t.temperature.unsqueeze(1)
        logits = apply_min_p(apply_top_k_top_p(logits, t), t)
        probs = logits.softmax(dim=-1)                                          # [B, V]
        sampled = _argmax(probs / self._exponentials(t, probs.shape))           # [B]
        if greedy_ids is not None:
            sampled = torch.where(t.greedy, greedy_ids, sampled)
        return sampled

    def _exponentials(self, t: SamplingTensors, shape: torch.Size) -> Tensor:
        """q ~ Exp(1) as -log(U), U ~ U[0, 1): 4x cheaper than exponential_ on this CPU, and
        q > 0 always (U < 1), so a filtered token's 0 / q stays 0 rather than NaN."""
        if t.any_unseeded:                                                      # [B, V]
            u = torch.rand(shape, generator=self._generator, device=self.device)
        else:                              # greedy rows ignore q, but keep it free of garbage
            u = torch.full(shape, 0.5, device=self.device)
        for row, seed in t.row_seeds:      # one small generator per seeded row: batch-independent
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            u[row].uniform_(generator=gen)
        return u.log_().neg_()

    def _outputs(self, raw: Tensor, sampled: Tensor, t: SamplingTensors,
                 seqs: Sequence[ScheduledSeq]) -> list[SeqOutput]:
        ids = sampled.tolist()                                  # the one host copy of the tokens
        outputs = [SeqOutput(seq_id=s.seq_id, token_id=tok) for s, tok in zip(seqs, ids)]
        if not t.logprob_rows:
            return outputs
        rows = torch.tensor(t.logprob_rows, dtype=torch.long, device=raw.device)   # [R]
        logprobs = raw.index_select(0, rows).log_softmax(dim=-1)                # [R, V]
        chosen = logprobs.gather(1, sampled.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = [[]] * len(t.logprob_rows), [[]] * len(t.logprob_rows)
        if max(t.logprob_ks) > 0:
            top = logprobs.topk(min(max(t.logprob_ks), logprobs.shape[1]), dim=-1)   # [R, K]
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        for j, (row, k) in enumerate(zip(t.logprob_rows, t.logprob_ks)):
            outputs[row].logprob = chosen[j]
            outputs[row].top_logprobs = list(zip(top_ids[j][:k], top_vals[j][:k]))
        return outputs
