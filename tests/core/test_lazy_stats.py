"""core.lazy_stats.condense: the counting path for 16-bit weights equals OutlierStats.of value for value."""

from __future__ import annotations

import pytest
import torch

from core.lazy_stats import condense
from core.outliers import SKETCH_SIZE, OutlierStats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 40), (1100, 1000)])  # the second is over SKETCH_SIZE: a sample is kept
def test_counting_equals_sorting(dtype, shape):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    weight[0, :5] = 0.0
    weight[1, :3] = -0.0
    weight[2, 0] = 3.5  # an outlier far out
    counted, sorted_ = condense(weight), OutlierStats.of(weight)
    assert (counted.numel, counted.q1, counted.q3) == (sorted_.numel, sorted_.q1, sorted_.q3)
    assert counted.values_sorted.dtype == torch.float32
    assert torch.equal(counted.values_sorted, sorted_.values_sorted)
    assert counted.values_sorted.numel() == min(weight.numel(), SKETCH_SIZE)
    for multiplier in (0.5, 2.0, 8.0):
        threshold = counted.threshold(multiplier)
        assert counted.outlier_count(threshold) == sorted_.outlier_count(threshold)


def test_float32_weights_take_the_sorting_path():
    weight = torch.randn(30, 20)
    counted, sorted_ = condense(weight), OutlierStats.of(weight)
    assert (counted.q1, counted.q3) == (sorted_.q1, sorted_.q3)
    assert torch.equal(counted.values_sorted, sorted_.values_sorted)
