import numpy as np
import pytest
import torch

from core.outliers import (OutlierStats, iqr_threshold, outlier_mask, quartiles, sanitize_fisher, sensitive_count,
                           sensitive_mask, solve_range_multiplier, sparse_mask)


def test_quartiles_match_numpy_linear_interpolation():
    w = torch.randn(123, 77, dtype=torch.float32) ** 3
    q1, q3 = quartiles(w)
    expected = np.quantile(w.numpy().astype(np.float64), [0.25, 0.75])
    assert q1 == pytest.approx(expected[0], abs=1e-12)
    assert q3 == pytest.approx(expected[1], abs=1e-12)


def test_iqr_threshold_formula_symmetrised():
    # Q1=-1, Q3=3, IQR=4, r=1.5: T_min=-7, T_max=9 -> T=9
    assert iqr_threshold(-1.0, 3.0, 1.5) == 9.0
    assert iqr_threshold(-3.0, 1.0, 1.5) == 9.0


def test_outlier_mask_is_inclusive_and_matches_threshold():
    w = torch.tensor([[-2.0, -1.0, 0.5, 1.0, 3.0]])
    assert outlier_mask(w, 1.0).tolist() == [[True, True, False, True, True]]
    assert not outlier_mask(w, None).any()


@pytest.mark.parametrize("numel,percent,k", [(192 * 576, 0.05, 55), (10, 0.05, 0), (1000, 0.05, 1), (200, 0.5, 1)])
def test_sensitive_selection_keeps_exactly_k(numel, percent, k):
    fisher = torch.rand(numel).reshape(-1, 1 if numel < 100 else 8)
    mask = sensitive_mask(fisher, percent)
    assert sensitive_count(numel, percent) == k
    assert int(mask.sum()) == k
    if k:  # the chosen ones are the largest
        assert fisher[mask].min() >= fisher[~mask].max()


def test_sensitive_selection_with_ties_still_exact():
    fisher = torch.ones(100, 100)
    assert int(sensitive_mask(fisher, 1.0).sum()) == 100


def test_sanitize_fisher_handles_negative_and_non_finite():
    f = sanitize_fisher(torch.tensor([-2.0, float("nan"), float("inf"), 3.0]))
    assert f.tolist() == [2.0, 0.0, 0.0, 3.0]


def test_sparse_mask_is_union_of_outliers_and_sensitive():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    f = torch.rand(64, 64)
    t = 2.5
    m = sparse_mask(w, f, t, 1.0)
    assert torch.equal(m, outlier_mask(w, t) | sensitive_mask(f, 1.0))
    assert torch.equal(sparse_mask(w, None, None, 1.0), torch.zeros_like(m))  # no Fisher: nothing sensitive
    assert torch.equal(sparse_mask(w, f, None, 1.0), sensitive_mask(f, 1.0))  # sensitive-only mode


def test_stats_counts_match_masks():
    torch.manual_seed(1)
    w = torch.randn(96, 80) * torch.rand(96, 1)
    f = torch.rand(96, 80) ** 4
    stats = OutlierStats.of(w, f)
    for r in (0.5, 1.5, 3.0):
        t = stats.threshold(r)
        outliers, sens, union = stats.sparse_count(t, 0.5)
        assert outliers == int(outlier_mask(w, t).sum())
        assert sens == int(sensitive_mask(f, 0.5).sum())
        assert union == int(sparse_mask(w, f, t, 0.5).sum())


def test_solver_hits_the_target_percentage():
    torch.manual_seed(2)
    mats = [torch.randn(200, 100) ** 3, torch.randn(50, 300) * 0.1]
    stats = [OutlierStats.of(m) for m in mats]
    r = solve_range_multiplier(stats, 0.45)
    total = sum(int(outlier_mask(m, s.threshold(r)).sum()) for m, s in zip(mats, stats))
    assert total / sum(m.numel() for m in mats) * 100 == pytest.approx(0.45, abs=0.01)


def test_counts_include_entries_exactly_at_plus_and_minus_the_threshold():
    w = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 1.0]])
    stats = OutlierStats.of(w)
    for t in (1.0, 0.5, 2.0, 2.5, 0.0):
        assert stats.outlier_count(t) == int(outlier_mask(w, t).sum())
