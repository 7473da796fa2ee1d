"""core.outliers.OutlierStats of 16-bit weights: their distinct values counted, exact at any size."""

from __future__ import annotations

import pytest
import torch

from core.outliers import SKETCH_SIZE, OutlierStats, quartiles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 40), (1100, 1000)])  # the second is over SKETCH_SIZE
def test_counted_stats_are_exact(dtype, shape):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    weight[0, :5] = 0.0
    weight[1, :3] = -0.0
    weight[2, 0] = 3.5  # an outlier far out
    stats = OutlierStats.of(weight)
    assert (stats.numel, (stats.q1, stats.q3)) == (weight.numel(), quartiles(weight))
    assert stats.values.numel() < 1 << 16  # distinct values only, whatever the size
    assert int(stats.ends[-1]) == weight.numel()
    for multiplier in (0.5, 2.0, 8.0):
        threshold = stats.threshold(multiplier)
        assert stats.outlier_count(threshold) == int((weight.float().abs() >= threshold).sum())
    assert stats.outlier_count(float(weight[2, 0])) == 1


def test_a_large_sixteen_bit_matrix_is_kept_in_kilobytes_not_a_megabyte_sketch():
    weight = (torch.randn(2048, 2048) * 0.02).to(torch.bfloat16)
    counted, sampled = OutlierStats.of(weight), OutlierStats.of(weight.float())
    kept = counted.values.nbytes + counted.ends.nbytes
    assert sampled.values.numel() == SKETCH_SIZE and kept < sampled.values.nbytes / 50
    threshold = counted.threshold(1.5)
    exact = int((weight.float().abs() >= threshold).sum())
    assert counted.outlier_count(threshold) == exact
    assert abs(sampled.outlier_count(threshold) - exact) <= 0.01 * exact + 8  # the float32 sample's estimate


def test_float32_weights_keep_their_sorted_entries():
    weight = torch.randn(30, 20)
    stats = OutlierStats.of(weight)
    assert stats.ends is None and (stats.q1, stats.q3) == quartiles(weight)
    assert torch.equal(stats.values, weight.reshape(-1).sort().values)
