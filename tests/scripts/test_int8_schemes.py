"""scripts/int8_schemes.py: the simulated int8 yardsticks quant_quality.py --schemes reports."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import quant_quality  # noqa: E402
from checkpoints import write_checkpoint  # noqa: E402
from int8_schemes import SimulatedInt8Weight, load_simulated, per_channel_fake_quant, q8_0_fake_quant  # noqa: E402
from moeserve.layers.linear import quantize_per_channel  # noqa: E402


def test_q8_0_blocks_of_32_with_fp16_scales() -> None:
    x = torch.randn(3, 72) * torch.logspace(-3, 2, 72)     # blocks of very different ranges, a ragged tail
    got = q8_0_fake_quant(x)
    assert got.shape == x.shape
    for start in range(0, 72, 32):
        block, qblock = x[:, start:start + 32], got[:, start:start + 32]
        scale = (block.abs().amax(-1, keepdim=True) / 127).half().float()     # [3, 1]
        steps = qblock / scale
        assert torch.equal(steps, steps.round()) and steps.abs().max() <= 127
        assert ((qblock - block).abs() <= 0.51 * scale).all()
    assert not torch.equal(got, x)


def test_weight_only_is_the_per_channel_int8_weights_on_full_precision_inputs() -> None:
    w, x = torch.randn(48, 64), torch.randn(5, 64, dtype=torch.bfloat16)
    q, scale = quantize_per_channel(w)
    sim = SimulatedInt8Weight(w, "weight-only")
    assert torch.equal(per_channel_fake_quant(w), q.float() * scale[:, None])
    assert torch.equal(sim(x), F.linear(x.float(), q.float() * scale[:, None]).to(torch.bfloat16))
    q8 = SimulatedInt8Weight(w, "q8_0")
    assert torch.equal(q8(x.float()), F.linear(q8_0_fake_quant(x.float()), q8_0_fake_quant(w)))
    with pytest.raises(ValueError, match="unknown int8 scheme"):
        SimulatedInt8Weight(w, "q4_0")


def test_simulated_model_replaces_exactly_the_int8_weights(tmp_path) -> None:
    model = load_simulated(write_checkpoint(tmp_path / "mixtral", "mixtral"), torch.float32, "q8_0")
    layer = model.layers[0]
    assert isinstance(layer.attn.qkv.packed, SimulatedInt8Weight)
    assert all(isinstance(w, SimulatedInt8Weight) for w in layer.moe.experts.packed["w13"])
    assert not isinstance(layer.moe.router.packed, SimulatedInt8Weight)    # routers stay as they are
    assert not isinstance(model.lm_head.packed, SimulatedInt8Weight)


def test_report_lists_each_scheme(tmp_path, capsys) -> None:
    model = write_checkpoint(tmp_path / "mixtral", "mixtral")
    out = tmp_path / "q.json"
    quant_quality.main([str(model), "--dtype", "float32", "--prompts", "2", "--prompt-len", "8", "--gen-len", "4",
                        "--schemes", "weight-only,q8_0", "--json", str(out)])
    variants = quant_quality.json.loads(out.read_text())[str(model)]
    for scheme in ("weight-only", "q8_0"):
        stats = variants[f"{scheme} int8, simulated, vs float32"]
        assert 0 < stats["mean_kl"] < 1 and 0 <= stats["top1"] <= 100
    with pytest.raises(SystemExit):
        quant_quality.parse_args([str(model), "--schemes", "q4_k"])
    assert "--schemes: unknown q4_k" in capsys.readouterr().err
