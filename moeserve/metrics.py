"""Prometheus metrics. The only module that imports prometheus_client.

Engine-side values (expert loads, queue lengths, KV usage, preemptions) are read by a collector
at scrape time; nothing on the per-token path touches Prometheus. The collector runs no torch op:
expert totals come from the host copy the engine publishes (Engine.expert_totals_host), because
torch work in the HTTP thread measurably slowed the engine's steps (bench_http.py).
Request latencies are observed
on the asyncio side: TTFT once per request, inter-token latencies in one batch when it ends.
Names follow vLLM's (with the moeserve_ prefix) so existing dashboards translate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moeserve import __version__
from moeserve.request import FinishReason

ExpertMetrics = Literal["full", "summary", "off"]
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_ERROR_STATUSES = (400, 401, 404, 413, 429, 500)   # the statuses the API answers with


class ExpertLoadCollector:
    """Reads the engine's device-side expert totals at scrape time; balancedness over a window."""

    def __init__(self, engine, mode: ExpertMetrics, window_s: float = 60.0) -> None:
        self.engine, self.mode, self.window_s = engine, mode, window_s
        self._history: deque[tuple[float, list[list[int]]]] = deque()
        self._lock = threading.Lock()

    def collect(self):
        engine = self.engine
        sched = engine.scheduler
        yield _gauge("moeserve_num_requests_running", "Sequences in the running batch.", sched.num_running)
        yield _gauge("moeserve_num_requests_waiting", "Sequences waiting to be scheduled.", sched.num_waiting)
        yield _gauge("moeserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", sched.kv_usage)
        yield _counter("moeserve_num_preemptions", "Sequences preempted (recomputed later).", sched.num_preemptions)
        yield _counter("moeserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                       sched.prefix_cache_queries)
        yield _counter("moeserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                       sched.prefix_cache_hits)
        if self.mode == "off" or engine.model_config.num_moe_layers == 0:
            return
        totals = engine.expert_totals_host()          # [L][2][E] Python ints, published by the engine
        tokens = [row[0] for row in totals]
        dropped = [row[1] for row in totals]
        yield from self._expert_families(tokens, dropped)
        yield self._balancedness(tokens)
        yield self._rank_tokens(tokens)

    def _expert_families(self, tokens: list[list[int]], dropped: list[list[int]]):
        for name, doc, values in (
                ("moeserve_expert_tokens", "Tokens routed to each expert (before any capacity drop).", tokens),
                ("moeserve_expert_dropped_tokens", "Routes dropped by a capacity limit.", dropped)):
            family = CounterMetricFamily(name, doc, labels=["layer", "expert"])
            if self.mode == "full":
                for layer, row in zip(self._layer_ids(), values):
                    for expert, count in enumerate(row):
                        family.add_metric([str(layer), str(expert)], count)
            else:   # summary: per expert, summed over layers
                for expert, count in enumerate(_column_sums(values)):
                    family.add_metric(["all", str(expert)], count)
            yield family

    def _balancedness(self, tokens: list[list[int]]) -> GaugeMetricFamily:
        """mean / max expert load per layer over the last window_s seconds (1.0 = perfectly even)."""
        now = time.monotonic()
        with self._lock:
            self._history.append((now, tokens))
            while len(self._history) > 1 and now - self._history[1][0] >= self.window_s:
                self._history.popleft()
            base = self._history[0][1] if len(self._history) > 1 else [[0] * len(r) for r in tokens]
        family = GaugeMetricFamily("moeserve_layer_expert_balancedness",
                                   "Mean / max expert load per MoE layer over a sliding window.", labels=["layer"])
        for layer, now_row, base_row in zip(self._layer_ids(), tokens, base):
            window = [a - b for a, b in zip(now_row, base_row)]
            top = max(window)
            if top > 0:
                family.add_metric([str(layer)], sum(window) / len(window) / top)
        return family

    def _rank_tokens(self, tokens: list[list[int]]) -> CounterMetricFamily:
        family = CounterMetricFamily("moeserve_rank_expert_tokens", "Tokens processed by each expert-parallel rank's experts.",
                                     labels=["rank"])
        per_expert = _column_sums(tokens)
        for rank, experts in enumerate(self.engine.expert_placement()):
            family.add_metric([str(rank)], sum(per_expert[e] for e in experts))
        return family

    def _layer_ids(self) -> list[int]:
        """Model layer index of each MoE row (dense layers have no row)."""
        return [i for i, is_moe in enumerate(self.engine.model_config.moe_layers) if is_moe]


def _column_sums(rows: list[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*rows)]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Metrics:
    """One registry per server (no module-level metric objects)."""

    def __init__(self, engine, model_name: str, expert_metrics: ExpertMetrics = "full") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ExpertLoadCollector(engine, expert_metrics))
        r = self.registry
        self.ttft = Histogram("moeserve_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moeserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moeserve_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("moeserve_request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("moeserve_generation_tokens", "Generated tokens.", registry=r)
        self.success = Counter("moeserve_request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.errors = Counter("moeserve_request_errors", "Requests answered with an HTTP error.", ["status"], registry=r)
        # Every known label value is exported from the start at 0: a series that first appears at 1
        # hides that increment from rate() / increase(), so a first abort or error would never show.
        for reason in FinishReason:
            self.success.labels(finished_reason=reason.value)
        for status in _ERROR_STATUSES:
            self.errors.labels(status=str(status))
        info = Info("moeserve_model", "Model being served.", registry=r)
        cfg = engine.model_config
        info.info({"model_name": model_name, "architecture": cfg.architecture, "num_experts": str(cfg.num_experts),
                   "top_k": str(cfg.top_k), "dtype": str(engine.dtype).replace("torch.", "")})
        Info("moeserve_version", "moeserve version.", registry=r).info({"version": __version__})

    def observe_request(self, timeline: "RequestTimeline", finish_reason: str | None) -> None:
        """Called once when a request ends (finished or aborted), off the token path."""
        if timeline.first_token is not None:
            self.ttft.observe(timeline.first_token - timeline.arrival)
        for gap in timeline.token_gaps():
            self.itl.observe(gap)
        if timeline.last_token is not None:
            self.e2e.observe(timeline.last_token - timeline.arrival)
        if timeline.first_scheduled is not None:
            self.queue_time.observe(max(0.0, timeline.first_scheduled - timeline.arrival))
        self.prompt_tokens.inc(timeline.prompt_tokens)
        self.generation_tokens.inc(timeline.generated_tokens)
        if finish_reason is not None:
            self.success.labels(finished_reason=finish_reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimeline:
    """Timestamps of one request (time.monotonic), kept in plain floats while it runs."""

    __slots__ = ("arrival", "first_scheduled", "first_token", "last_token", "token_times",
                 "prompt_tokens", "generated_tokens")

    def __init__(self, prompt_tokens: int, arrival: float | None = None) -> None:
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.token_times: list[float] = []
        self.prompt_tokens = prompt_tokens
        self.generated_tokens = 0

    def record(self, new_tokens: int, now: float) -> None:
        if new_tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        self.token_times.append(now)
        self.last_token = now
        self.generated_tokens += new_tokens

    def token_gaps(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]
