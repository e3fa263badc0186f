"""scripts/bench_vs_peer.py's pure parts: server specs, commands, the ratio table, process-tree RSS."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import bench_vs_peer  # noqa: E402


def test_specs_keep_command_line_order_and_baseline_defaults_to_first_peer():
    args = bench_vs_peer.parse_args(["--moeserve", "default=", "--peer", "llama=srv -m x.gguf --port {port}",
                                     "--moeserve", "int8=--quantization int8", "--concurrency", "1,4"])
    assert [(s["kind"], s["name"], s["args"]) for s in args.servers] == [
        ("moeserve", "default", ""), ("peer", "llama", "srv -m x.gguf --port {port}"),
        ("moeserve", "int8", "--quantization int8")]
    assert args.baseline == "llama" and args.levels == [1, 4]
    assert bench_vs_peer.parse_args(["--moeserve", "a=", "--moeserve", "b="]).baseline == "a"


@pytest.mark.parametrize("argv", [
    ["--moeserve", "noequals"],
    ["--peer", "p=srv --port 8000"],              # no {port}
    ["--moeserve", "a=", "--moeserve", "a=--x"],  # duplicate name
    ["--moeserve", "a=", "--baseline", "b"],
    [],
])
def test_bad_command_lines_are_refused(argv):
    with pytest.raises(SystemExit):
        bench_vs_peer.parse_args(argv)


def test_server_commands():
    peer = bench_vs_peer.parse_spec("peer", "p=/bin/srv -m 'a b.gguf' --port {port}")
    assert bench_vs_peer.server_command(peer, "/m", 1234) == ["/bin/srv", "-m", "a b.gguf", "--port", "1234"]
    ms = bench_vs_peer.parse_spec("moeserve", "q=--quantization int8")
    cmd = bench_vs_peer.server_command(ms, "/m", 1234)
    assert cmd[cmd.index("serve"):] == ["serve", "/m", "--host", "127.0.0.1", "--port", "1234",
                                        "--quantization", "int8"]


def summary(tps: float, ttft: float) -> dict:
    return {"completed": 8, "failed": 0, "short_requests": 0, "output_token_throughput": tps, "ttft_p50_ms": ttft,
            "ttft_p99_ms": ttft, "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "e2e_p50_ms": 1500.0, "peak_rss_mib": 512.0}


def test_table_has_ratios_against_the_baseline():
    results = {"ms": {"levels": {4: summary(150.0, 50.0)}}, "llama": {"levels": {4: summary(100.0, 100.0)}}}
    table = bench_vs_peer.level_table(results, "llama", 4).splitlines()
    assert table[0] == "### concurrency 4" and table[2].endswith("| vs llama |")
    assert table[4] == ("| ms | 8/8 | 150.0 | 50 ms | 50 ms | 10.0 ms | 20.0 ms | 1.50 s | 512 | "
                        "1.50x tok/s, 0.50x TTFT |")
    assert table[5].endswith("| baseline |")


def test_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while bench_vs_peer.tree_rss_kib(child.pid) < 200 << 10 and time.time() < deadline:
            time.sleep(0.1)    # until the child has touched its 200 MiB
        own = bench_vs_peer.tree_rss_kib(child.pid)
        assert own > 200 << 10
        assert bench_vs_peer.tree_rss_kib(os.getpid()) > own    # this process plus the child
    finally:
        child.kill()
        child.wait()
    assert bench_vs_peer.tree_rss_kib(child.pid) == 0


def test_sampler_peak_is_never_empty():
    sampler = bench_vs_peer.RssSampler(os.getpid())    # not started: take_peak samples once itself
    assert sampler.take_peak() > 10


def test_rounds_alternate_the_order_and_merge_to_medians_with_paired_ratios():
    servers = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert [s["name"] for s in bench_vs_peer.round_order(servers, 0)] == ["a", "b", "c"]
    assert [s["name"] for s in bench_vs_peer.round_order(servers, 1)] == ["c", "b", "a"]
    rounds = [{"ms": {"peak_rss_mib": 600.0, "levels": {4: summary(150.0, 50.0)}},
               "llama": {"peak_rss_mib": 400.0, "levels": {4: summary(100.0, 100.0)}}},
              {"ms": {"peak_rss_mib": 700.0, "levels": {4: summary(120.0, 70.0)}},
               "llama": {"peak_rss_mib": 500.0, "levels": {4: summary(60.0, 90.0)}}},
              {"ms": {"peak_rss_mib": 650.0, "levels": {4: summary(130.0, 60.0)}},
               "llama": {"peak_rss_mib": 450.0, "levels": {4: summary(65.0, 80.0)}}}]
    merged = bench_vs_peer.merge_rounds(rounds, "llama")
    ms = merged["ms"]["levels"][4]
    assert ms["output_token_throughput"] == 130.0 and ms["ttft_p50_ms"] == 60.0 and ms["completed"] == 24
    assert ms["tok_s"] == [150.0, 120.0, 130.0] and ms["ratio"] == [1.5, 2.0, 2.0]
    assert merged["ms"]["peak_rss_mib"] == 700.0
    assert bench_vs_peer.rounds_line(merged, "llama", 4) == "tok/s over llama in each round: ms 1.50x, 2.00x, 2.00x"
    with pytest.raises(SystemExit):
        bench_vs_peer.parse_args(["--moeserve", "a=", "--rounds", "0"])


def test_a_round_whose_baseline_served_nothing_gives_a_nan_ratio():
    rounds = [{"ms": {"peak_rss_mib": 1.0, "levels": {1: summary(50.0, 10.0)}},
               "llama": {"peak_rss_mib": 1.0, "levels": {1: summary(0.0, 10.0)}}},
              {"ms": {"peak_rss_mib": 1.0, "levels": {1: summary(60.0, 10.0)}},
               "llama": {"peak_rss_mib": 1.0, "levels": {1: summary(30.0, 10.0)}}}]
    ratios = bench_vs_peer.merge_rounds(rounds, "llama")["ms"]["levels"][1]["ratio"]
    assert ratios[0] != ratios[0] and ratios[1] == 2.0     # nan, then 60 / 30
