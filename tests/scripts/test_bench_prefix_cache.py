"""scripts/bench_prefix_cache.py end to end at a tiny size: two real servers (the built-in model),
the three workloads, hit rates read from /metrics, the on/off table."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import bench_prefix_cache  # noqa: E402


def test_tiny_run_reports_hits_only_with_caching(tmp_path, capsys):
    from moeserve.models.builtin import ensure_builtin_model
    model = ensure_builtin_model(cache_dir=tmp_path / "cache")
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    out = tmp_path / "results.json"
    results = bench_prefix_cache.main([
        "--model", str(model), "--system-len", "64", "--user-len", "8", "--reply-len", "4",
        "--output-len", "3", "--turns", "2", "--conversations", "2", "--agent-requests", "3",
        "--unshared-len", "20", "--concurrency", "2", "--think-time", "0.05", "--vocab", str(vocab),
        "--json", str(out)])
    on, off = results["on"], results["off"]
    for name in ("chat", "agent", "unshared"):
        assert on[name]["ok"] == on[name]["n"] and off[name]["ok"] == off[name]["n"]
        assert off[name]["hit_rate"] == 0.0
    assert on["unshared"]["hit_rate"] == 0.0
    assert on["chat"]["hit_rate"] > 0.3 and on["agent"]["hit_rate"] > 0.3   # 64 shared of 72-84
    assert "later_turns_p50" in on["chat"] and "second_turn_p50" in on["chat"]
    printed = capsys.readouterr().out
    assert "| chat | on |" in printed and "second-turn TTFT p50 off/on" in printed
    assert "think time 0.05 s" in printed
    assert json.loads(out.read_text())["on"]["agent"]["hit_rate"] == on["agent"]["hit_rate"]
