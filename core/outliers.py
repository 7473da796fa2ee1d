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

    values: float32 [m] ascending.
    ends:   int64 [m], entries <= values[i] (16-bit weights: their distinct values, counted exactly, at
            most 65,536 whatever the matrix's size), or None: each value stands for numel / m entries
            (float32 weights: all entries, or an even sample of SKETCH_SIZE of them).
    abs_by_fisher: float32 [k_max] |w| of the entries in descending Fisher order (empty without Fisher).
    """

    numel: int
    q1: float
    q3: float
    values: torch.Tensor
    ends: torch.Tensor | None
    abs_by_fisher: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, fisher: torch.Tensor | None = None) -> "OutlierStats":
        """weight: float [out, in]; fisher: float [out, in] or None."""
        if weight.dtype in (torch.bfloat16, torch.float16):
            q1, q3, values, ends = _counted(weight)
        else:
            q1, q3, values, ends = _sampled(weight)
        abs_by_fisher = torch.empty(0)
        if fisher is not None:
            w = weight.detach().float().reshape(-1).cpu()
            k_max = max(1, sensitive_count(w.numel(), MAX_SENSITIVE_FRACTION * 100))
            order = torch.topk(sanitize_fisher(fisher).reshape(-1).cpu(), k_max).indices
            abs_by_fisher = w.abs()[order]
        return cls(weight.numel(), q1, q3, values, ends, abs_by_fisher)

    def threshold(self, multiplier: float) -> float:
        return iqr_threshold(self.q1, self.q3, multiplier)

    def outlier_count(self, threshold: float | None) -> int:
        """Entries with |w| >= threshold, i.e. w >= T or w <= -T (estimated from the sample for huge float32
        matrices, exact otherwise)."""
        if threshold is None:
            return 0
        if threshold <= 0:
            return self.numel
        bounds = torch.tensor([-threshold, threshold], dtype=self.values.dtype)
        at_most = int(torch.searchsorted(self.values, bounds[:1], right=True))  # values <= -T
        below = int(torch.searchsorted(self.values, bounds[1:], right=False))  # values < T
        m = self.values.numel()
        if self.ends is None:
            return round((at_most + m - below) * self.numel / m)
        entries = (lambda i: int(self.ends[i - 1]) if i else 0)
        return entries(at_most) + self.numel - entries(below)

    def sparse_count(self, threshold: float | None, sensitivity_percent: float) -> tuple[int, int, int]:
        """(outliers, sensitive, union) counts for one setting."""
        outliers = self.outlier_count(threshold)
        k = sensitive_count(self.numel, sensitivity_percent) if self.abs_by_fisher.numel() else 0
        k = min(k, self.abs_by_fisher.numel())
        overlap = 0
        if k and threshold is not None:
            overlap = int((self.abs_by_fisher[:k] >= threshold).sum())
        return outliers, k, outliers + k - overlap


def _sampled(weight: torch.Tensor) -> tuple[float, float, torch.Tensor, None]:
    """Quartiles and the ascending entries of any float matrix (an even sample beyond SKETCH_SIZE)."""
    ascending = sorted_values(weight)
    q1, q3 = quartiles(weight, ascending)
    if ascending.size > SKETCH_SIZE:
        ascending = ascending[np.linspace(0, ascending.size - 1, SKETCH_SIZE).round().astype(np.int64)]
    return q1, q3, torch.from_numpy(ascending), None


def _counted(weight: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Quartiles, distinct values and their cumulative counts of a bf16/fp16 matrix, in linear time.

    Such a matrix has at most 65,536 distinct values, so counting each bit pattern sorts it without a
    sort (an 8 B model's 58.7 M-entry matrix: a count instead of a sort) and keeps it exactly in a few
    kilobytes. Quartiles equal ``quartiles`` of the sorted entries.
    """
    codes = weight.detach().reshape(-1).cpu().view(torch.int16).to(torch.int32) & 0xFFFF  # the bit patterns
    counts = torch.bincount(codes, minlength=1 << 16).numpy()
    value_of = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(weight.dtype).float().numpy()
    order = np.argsort(value_of, kind="stable")  # NaN patterns last, as np.sort puts them
    present = order[counts[order] > 0]
    values, ends = value_of[present], np.cumsum(counts[present])  # ends[i]: entries up to values[i]

    def at(position: float) -> float:
        """numpy's linear interpolation between the sorted entries around ``position``."""
        lo, hi = math.floor(position), math.ceil(position)
        v_lo, v_hi = (float(values[np.searchsorted(ends, p, side="right")]) for p in (lo, hi))
        return v_lo + (v_hi - v_lo) * (position - lo)

    n = codes.numel()
    return (at(0.25 * (n - 1)), at(0.75 * (n - 1)), torch.from_numpy(np.ascontiguousarray(values)),
            torch.from_numpy(ends.astype(np.int64)))


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
