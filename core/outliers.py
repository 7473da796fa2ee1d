"""Dense-and-sparse selection: IQR outlier thresholds and exact-k sensitive values.

Per matrix (SPEC A.3, A.4, H.2, H.3):
* the outlier threshold is ``T = max(|Q1 - r*IQR|, |Q3 + r*IQR|)`` over all entries of
  the original matrix, and an entry is an outlier when ``|w| >= T``;
* the sensitive values are exactly ``k = round(numel * s / 100)`` entries with the
  largest Fisher value (the original's strict ``>`` lost one, and crashed for k = 0);
* the sparse part is their union. Order does not matter: it is a union of masks.

``OutlierStats`` condenses a matrix once (sorted magnitudes, Fisher ranking) so that
counts for any setting are answered in microseconds: the studio's live readouts and
the target-percentage solver use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SKETCH_SIZE = 1 << 20  # matrices larger than this keep an evenly spaced sample of |w|
MAX_SENSITIVE_FRACTION = 0.10  # the Fisher ranking kept for live counts (config allows up to 10%)


def quartiles(weight: torch.Tensor) -> tuple[float, float]:
    """(Q1, Q3) of all entries with numpy's linear interpolation, computed in float64.

    weight: any float tensor. ``torch.quantile`` refuses > 16M elements, so use kthvalue.
    """
    flat = weight.detach().reshape(-1).double()
    n = flat.numel()

    def at(q: float) -> float:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo = flat.kthvalue(lo + 1).values.item()
        v_hi = v_lo if hi == lo else flat.kthvalue(hi + 1).values.item()
        return v_lo + (v_hi - v_lo) * (pos - lo)

    return at(0.25), at(0.75)


def iqr_threshold(q1: float, q3: float, multiplier: float) -> float:
    """The symmetrised IQR threshold T of SPEC A.3 for quartiles q1, q3 and multiplier r."""
    iqr = q3 - q1
    return max(abs(q1 - multiplier * iqr), abs(q3 + multiplier * iqr))


def sensitive_count(numel: int, percent: float) -> int:
    """Exactly how many entries ``percent`` % of a matrix keeps (round half up, at least 0)."""
    return int(math.floor(numel * percent / 100.0 + 0.5))


def sensitive_mask(fisher: torch.Tensor, percent: float) -> torch.Tensor:
    """bool [out, in]: the k = sensitive_count(numel, percent) entries of largest Fisher value.

    fisher: float [out, in], already sanitised (finite, non-negative).
    """
    mask = torch.zeros(fisher.numel(), dtype=torch.bool, device=fisher.device)
    k = sensitive_count(fisher.numel(), percent)
    if k > 0:
        mask[torch.topk(fisher.reshape(-1).float(), k, sorted=False).indices] = True
    return mask.view_as(fisher)


def outlier_mask(weight: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """bool [out, in]: entries with ``|w| >= threshold`` (none when threshold is None)."""
    if threshold is None:
        return torch.zeros_like(weight, dtype=torch.bool)
    return weight.abs() >= threshold


def sanitize_fisher(fisher: torch.Tensor) -> torch.Tensor:
    """float32: |F| with NaN/inf replaced by 0 (a corrupt Fisher must not poison k-means, SPEC E.2)."""
    return torch.nan_to_num(fisher.float().abs(), nan=0.0, posinf=0.0, neginf=0.0)


def sparse_mask(weight: torch.Tensor, fisher: torch.Tensor | None, threshold: float | None,
                sensitivity_percent: float) -> torch.Tensor:
    """bool [out, in]: the entries that leave the dense matrix (outliers ∪ sensitive)."""
    mask = outlier_mask(weight, threshold)
    if fisher is not None and sensitivity_percent > 0:
        mask |= sensitive_mask(sanitize_fisher(fisher), sensitivity_percent)
    return mask


@dataclass(frozen=True)
class OutlierStats:
    """A matrix condensed for instant what-if counts.

    abs_sorted:     float32 [m] ascending |w| (all entries, or an even sample of them if numel > SKETCH_SIZE).
    abs_by_fisher:  float32 [k_max] |w| of the entries in descending Fisher order (empty without Fisher).
    """

    numel: int
    q1: float
    q3: float
    abs_sorted: torch.Tensor
    abs_by_fisher: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, fisher: torch.Tensor | None = None) -> "OutlierStats":
        """weight: float [out, in]; fisher: float [out, in] or None."""
        w = weight.detach().float().reshape(-1).cpu()
        q1, q3 = quartiles(w)
        abs_sorted = w.abs().sort().values
        if abs_sorted.numel() > SKETCH_SIZE:
            idx = torch.linspace(0, abs_sorted.numel() - 1, SKETCH_SIZE).round().long()
            abs_sorted = abs_sorted[idx]
        abs_by_fisher = torch.empty(0)
        if fisher is not None:
            k_max = max(1, sensitive_count(w.numel(), MAX_SENSITIVE_FRACTION * 100))
            order = torch.topk(sanitize_fisher(fisher).reshape(-1).cpu(), k_max).indices
            abs_by_fisher = w.abs()[order]
        return cls(w.numel(), q1, q3, abs_sorted, abs_by_fisher)

    def threshold(self, multiplier: float) -> float:
        return iqr_threshold(self.q1, self.q3, multiplier)

    def outlier_count(self, threshold: float | None) -> int:
        """Entries with |w| >= threshold (estimated from the sample for huge matrices)."""
        if threshold is None:
            return 0
        m = self.abs_sorted.numel()
        above = m - int(torch.searchsorted(self.abs_sorted, torch.tensor([threshold]), right=False))
        return round(above * self.numel / m)

    def sparse_count(self, threshold: float | None, sensitivity_percent: float) -> tuple[int, int, int]:
        """(outliers, sensitive, union) counts for one setting."""
        outliers = self.outlier_count(threshold)
        k = sensitive_count(self.numel, sensitivity_percent) if self.abs_by_fisher.numel() else 0
        k = min(k, self.abs_by_fisher.numel())
        overlap = 0
        if k and threshold is not None:
            overlap = int((self.abs_by_fisher[:k] >= threshold).sum())
        return outliers, k, outliers + k - overlap


def solve_range_multiplier(stats: list[OutlierStats], target_percent: float,
                           lo: float = 0.0, hi: float = 1000.0, iters: int = 60) -> float:
    """The IQR multiplier r whose thresholds make ``target_percent`` % of all entries outliers.

    Bisection: the outlier share falls monotonically as r grows.
    """
    total = sum(s.numel for s in stats)

    def percent(r: float) -> float:
        return 100.0 * sum(s.outlier_count(s.threshold(r)) for s in stats) / total

    if target_percent <= 0:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if percent(mid) > target_percent:
            lo = mid
        else:
            hi = mid
    return hi
