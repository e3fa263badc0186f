"""scripts/bench_mla.py end to end on a tiny DeepSeek-V2 checkpoint: both decode forms run on the
same sequences and the KV sizes are reported."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import bench_mla  # noqa: E402
from checkpoints import write_checkpoint  # noqa: E402


def test_tiny_run_times_both_decode_forms(tmp_path, capsys):
    model = write_checkpoint(tmp_path / "dsv2", "deepseek_v2")
    results = bench_mla.main([str(model), "--dtype", "float32", "--threads", "1", "--batches", "1,3",
                              "--context", "20", "--steps", "2", "--rounds", "2"])
    assert set(results) == {1, 3}
    assert all(speed > 0 for forms in results.values() for speed in forms.values())
    printed = capsys.readouterr().out
    # 3 layers x (24 + 8) float32 values; expanded: 3 x 4 heads x (24 + 12)
    assert "latent 384  expanded K+V 1,728  (4.5x)" in printed
    assert "absorbed/expanded" in printed
