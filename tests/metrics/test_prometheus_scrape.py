"""A real Prometheus scrapes a live `moeserve serve`; every PromQL expression of the Grafana
dashboard returns data, and promtool accepts /metrics and the shipped prometheus.yml.

Prometheus comes from the Debian package `prometheus` (with promtool). When it is missing and we
run as root, set-up installs it with apt-get; if that fails the test skips, or fails when $CI is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.metrics.metrics_helpers import free_port, label_values, parse_samples, sample_value

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "configs" / "grafana" / "moeserve.json"
PROM_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"
STARTUP_TIMEOUT_S = 90.0


# ---------------------------------------------------------------- Prometheus binaries

def _find_binaries() -> dict[str, str] | None:
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    return found if all(found.values()) else None


def _apt_install() -> str:
    """Installs the Debian package; returns what went wrong, or "" on success."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so cannot apt-get install prometheus"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if proc.returncode != 0:
            return f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}"
    return ""


@pytest.fixture(scope="module")
def prometheus_bins() -> dict[str, str]:
    found = _find_binaries()
    if found is None:
        problem = _apt_install()
        found = _find_binaries()
        if found is None:
            reason = f"prometheus / promtool not found and not installable ({problem or 'installed, yet not on PATH'})"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
    return found


# ---------------------------------------------------------------- processes

class Process:
    """A subprocess with its output in a log file, quoted on failure; stopped by terminate, then kill."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None) -> None:
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_http(self, url: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: {url} not ready after {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _prometheus_config(target: str, path: Path) -> Path:
    """The shipped prometheus.yml, scraping `target` every second."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "moeserve"]
    job["static_configs"] = [{"targets": [target]}]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(prometheus_bins, builtin_model_dir, metrics_cache_dir, tmp_path_factory):
    """(moeserve URL, Prometheus URL): both started at once, both ready."""
    work = tmp_path_factory.mktemp("prometheus_scrape")
    serve_port, prom_port = free_port(), free_port()
    env = {**os.environ, "MOESERVE_CACHE": str(metrics_cache_dir), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MOESERVE_API_KEY", None)
    server = Process("moeserve", [sys.executable, "-m", "moeserve.cli", "serve", str(builtin_model_dir),
                                  "--host", "127.0.0.1", "--port", str(serve_port), "--kv-cache-memory", "64MiB",
                                  "--max-model-len", "512", "--log-level", "warning"],
                     work / "moeserve.log", env)
    config = _prometheus_config(f"127.0.0.1:{serve_port}", work / "prometheus.yml")
    prometheus = Process("prometheus", [prometheus_bins["prometheus"], f"--config.file={config}",
                                        f"--storage.tsdb.path={work / 'tsdb'}",
                                        f"--web.listen-address=127.0.0.1:{prom_port}"],
                         work / "prometheus.log")
    try:
        serve_url, prom_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{prom_port}"
        prometheus.wait_http(prom_url + "/-/ready")
        server.wait_http(serve_url + "/health")
        yield serve_url, prom_url
    finally:
        server.stop()
        prometheus.stop()


# ---------------------------------------------------------------- helpers

def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    data = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(data["panels"]) for t in p.get("targets", [])]


def query(prom_url: str, expr: str) -> list[dict]:
    response = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_until(check, what: str, timeout: float = 30.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def nonzero(samples: dict, name: str, label: str) -> dict[str, float]:
    return {k: v for k, v in label_values(samples, name, label).items() if v}


def scrape(serve_url: str) -> str:
    response = httpx.get(serve_url + "/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def send_traffic(serve_url: str, model: str) -> None:
    """Non-streaming and streaming completions, one stream closed mid-way, one 400."""
    base = {"model": model, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        for prompt in ("Hello there", "Mixture of experts"):
            assert client.post("/v1/completions", json={**base, "prompt": prompt}).status_code == 200
        chat = {**base, "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
        for url, body in (("/v1/completions", {**base, "prompt": "Once upon a time", "stream": True}),
                          ("/v1/chat/completions", chat)):
            with client.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
        long = {**base, "prompt": "A long story", "max_tokens": 400, "stream": True}
        with client.stream("POST", "/v1/completions", json=long) as response:   # closed after one event
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data:"))
        bad = client.post("/v1/completions", json={**base, "prompt": "hi", "top_p": 5})
        assert bad.status_code == 400


# ---------------------------------------------------------------- tests

def test_shipped_prometheus_config_is_valid(prometheus_bins):
    proc = subprocess.run([prometheus_bins["promtool"], "check", "config", str(PROM_CONFIG)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_importable_json():
    data = json.loads(DASHBOARD.read_text())
    assert 36 <= data["schemaVersion"] <= 41
    (var,) = [v for v in data["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    text = DASHBOARD.read_text()
    for panel in data["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    assert '"uid": "${datasource}"' in text and "model_name=" not in text
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])
    assert all("$__" not in expr and "$" not in expr for _, expr in dashboard_exprs())


def test_prometheus_scrapes_and_every_dashboard_query_returns_data(stack, prometheus_bins, builtin_model_dir):
    serve_url, prom_url = stack
    # A first scrape before any traffic, so that rate() sees the counters move.
    wait_until(lambda: any(r["value"][1] == "1" for r in query(prom_url, 'up{job="moeserve"}')),
               "Prometheus' first successful scrape of moeserve")
    send_traffic(serve_url, builtin_model_dir.name)
    samples = wait_until(lambda: (s := parse_samples(scrape(serve_url)))
                         and label_values(s, "moeserve_request_success_total", "finished_reason").get("abort")
                         and s, "the closed stream to be counted as aborted")
    assert nonzero(samples, "moeserve_request_success_total", "finished_reason") == {"length": 4, "abort": 1}
    assert nonzero(samples, "moeserve_request_errors_total", "status") == {"400": 1}
    generated = sample_value(samples, "moeserve_generation_tokens_total")
    wait_until(lambda: [r for r in query(prom_url, "moeserve_generation_tokens_total")
                        if float(r["value"][1]) == generated], "Prometheus to scrape the traffic")

    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    results: dict[str, list] = {}

    def all_have_data() -> bool:
        for _, expr in exprs:
            if not results.get(expr):
                results[expr] = query(prom_url, expr)
        return all(results.values())

    try:
        wait_until(all_have_data, "every dashboard expression to return data", timeout=20)
    finally:
        report = {expr: [(r["metric"], r["value"][1]) for r in results.get(expr, [])][:3] for _, expr in exprs}
        print(json.dumps(report, indent=1))
    for title, expr in exprs:
        values = [float(r["value"][1]) for r in results[expr]]
        assert all(math.isfinite(v) for v in values), (title, expr, values)   # NaN: a histogram saw nothing
    # The first abort and the first 400 show in the rates: their series existed (at 0) before.
    reasons = {r["metric"]["finished_reason"]: float(r["value"][1]) for r in
               results["sum by (finished_reason) (rate(moeserve_request_success_total[1m]))"]}
    statuses = {r["metric"]["status"]: float(r["value"][1]) for r in
                results["sum by (status) (rate(moeserve_request_errors_total[1m]))"]}
    assert reasons["abort"] > 0 and reasons["length"] > 0 and statuses["400"] > 0, (reasons, statuses)
    # The traffic is visible through PromQL too.
    (success,) = query(prom_url, 'sum(moeserve_request_success_total{finished_reason="abort"})')
    assert float(success["value"][1]) == 1
    (routes,) = query(prom_url, "sum(moeserve_rank_expert_tokens_total)")
    assert float(routes["value"][1]) > 0


def test_promtool_accepts_the_metrics_output(stack, prometheus_bins):
    serve_url, _ = stack
    text = scrape(serve_url)
    proc = subprocess.run([prometheus_bins["promtool"], "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
