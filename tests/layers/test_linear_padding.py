"""oneDNN GEMMs run at bucketed row counts (layers/linear.py: padded_rows), and give the rows an
unpadded GEMM gives."""

import pytest
import torch
import torch.nn.functional as F

from moeserve.cpu_features import cpu_has_amx_int8, cpu_has_fast_bf16
from moeserve.layers.linear import Int8Weight, OneDNNBF16Weight, WeightFormat, linear, padded_rows


def test_buckets_are_few_exact_for_decode_and_waste_under_an_eighth():
    assert [padded_rows(n) for n in range(1, 17)] == list(range(1, 17))
    counts = {padded_rows(n) for n in range(1, 2049)}
    assert len(counts) <= 16 + 8 * 7
    for n in range(17, 8193):
        padded = padded_rows(n)
        assert n <= padded < n * 9 / 8 and padded_rows(padded) == padded


@pytest.mark.parametrize("rows", [1, 17, 100, 300])
def test_padded_float32_linear_equals_unpadded(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(2, rows, 64, generator=gen)                    # [..., in]: leading dims kept
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="oneDNN bf16 weights only on CPUs with bf16 instructions")
@pytest.mark.parametrize("rows", [3, 37, 300])
def test_padded_bf16_weight_gives_each_row_alone(rows):
    gen = torch.Generator().manual_seed(rows)
    packed = OneDNNBF16Weight(torch.randn(40, 64, generator=gen))
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    y = packed(x)
    assert y.shape == (rows, 40)
    torch.testing.assert_close(y[-1:], packed(x[-1:]), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not cpu_has_amx_int8(), reason="the AMX int8 path needs AMX-INT8")
def test_padded_amx_int8_rows_are_the_unpadded_ones():
    gen = torch.Generator().manual_seed(0)
    packed = Int8Weight(torch.randn(40, 64, generator=gen) * 0.05, WeightFormat.INT8_FBGEMM_AMX)
    x = torch.randn(37, 64, generator=gen)                          # 37 -> 40 rows, AMX path
    assert padded_rows(37) == 40
    y = packed(x)
    # the zero padding rows widen no quantization range (it already holds 0): same as 40 real rows
    torch.testing.assert_close(y, packed(torch.cat([x, torch.zeros(3, 64)]))[:37])
