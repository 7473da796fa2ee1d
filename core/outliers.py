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

import numpy as np
import torch

SKETCH_SIZE = 1 << 20  # matrices larger than this keep an evenly spaced sample of their sorted entries
MAX_SENSITIVE_FRACTION = 0.10  # the Fisher ranking kept for live counts (config allows up to 10%)


def sorted_values(weight: torch.Tensor) -> np.ndarray:
    """float32 [numel] ascending: every entry of ``weight`` (any float tensor, any device).

    NumPy's sort (SIMD on x86) is about 10x faster than torch.sort on a CPU thread here.
    """
    return np.sort(weight.detach().reshape(-1).float().cpu().numpy())


def quartiles(weight: torch.Tensor, ascending: np.ndarray | None = None) -> tuple[float, float]:
    """(Q1, Q3) of all entries with numpy's linear interpolation, computed in float64.

    ascending: ``sorted_values(weight)`` when the caller has it already.
    """
    values = sorted_values(weight) if ascending is None else ascending
    n = values.size

    def at(q: float) -> float:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo, v_hi = float(values[lo]), float(values[hi])
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

    values_sorted:  float32 [m] ascending entries (all, or an even sample of them if numel > SKETCH_SIZE).
    abs_by_fisher:  float32 [k_max] |w| of the entries in descending Fisher order (empty without Fisher).
    """

    numel: int
    q1: float
    q3: float
    values_sorted: torch.Tensor
    abs_by_fisher: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, fisher: torch.Tensor | None = None) -> "OutlierStats":
        """weight: float [out, in]; fisher: float [out, in] or None."""
        ascending = sorted_values(weight)
        q1, q3 = quartiles(weight, ascending)
        if ascending.size > SKETCH_SIZE:
            ascending = ascending[np.linspace(0, ascending.size - 1, SKETCH_SIZE).round().astype(np.int64)]
        abs_by_fisher = torch.empty(0)
        if fisher is not None:
            w = weight.detach().float().reshape(-1).cpu()
            k_max = max(1, sensitive_count(w.numel(), MAX_SENSITIVE_FRACTION * 100))
            order = torch.topk(sanitize_fisher(fisher).reshape(-1).cpu(), k_max).indices
            abs_by_fisher = w.abs()[order]
        return cls(weight.numel(), q1, q3, torch.from_numpy(ascending), abs_by_fisher)

    def threshold(self, multiplier: float) -> float:
        return iqr_threshold(self.q1, self.q3, multiplier)

    def outlier_count(self, threshold: float | None) -> int:
        """Entries with |w| >= threshold, i.e. w >= T or w <= -T (estimated from the sample for huge matrices)."""
        if threshold is None:
            return 0
        if threshold <= 0:
            return self.numel
        m = self.values_sorted.numel()
        bounds = torch.tensor([-threshold, threshold], dtype=self.values_sorted.dtype)
        below = int(torch.searchsorted(self.values_sorted, bounds[:1], right=True))
        above = m - int(torch.searchsorted(self.values_sorted, bounds[1:], right=False))
        return round((below + above) * self.numel / m)

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
