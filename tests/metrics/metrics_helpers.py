"""Helpers shared by the metrics tests: parsing the exposition text, free ports."""

from __future__ import annotations

import socket
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def parse_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name (with its _total / _bucket suffix) -> [(labels, value)], from exposition text."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return dict(samples)


def render(ctx) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The parsed /metrics of an in-process server context."""
    body, _content_type = ctx.engine.metrics.render()
    return parse_samples(body.decode())


def sample_value(samples: dict, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels include `labels`; None if there is none."""
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def label_values(samples: dict, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} over the samples of `name`."""
    return {got[label]: v for got, v in samples.get(name, [])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
