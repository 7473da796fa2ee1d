"""The vectorised torch implementation of ``core.kmeans.weighted_kmeans_1d`` (any device; the GPU
path and the tests' oracle for the compiled CPU op).

Per row, minimise ``sum_j w_j (x_j - c_{a_j})**2`` over 2**bits centroids. In one dimension the
clusters of sorted centroids are contiguous runs of the sorted row, split at the midpoints of
neighbouring centroids. After one sort per row, prefix sums of w, w*x and w*x**2 give the cost of any
run against any centroid in O(1). So the greedy k-means++ seeding (scikit-learn's scheme: 2 + ln K
candidates per step drawn with probability proportional to w*D**2, the best kept) and every Lloyd step
need only a few searches per row in the sorted values or in the running cost, instead of passes over
all n values.

All rows of a matrix are processed together in torch, on the tensors' device, in chunks that bound
memory. Several seedings of one row, and the rows still moving in Lloyd, are "virtual rows": index
tensors into the sorted rows, never copies. Searches are three rounds of dense comparisons with about
n ** (1/3) entries each (``_count_at_most``): on a CPU this beats ``torch.searchsorted``, which walks
one query at a time, and a vectorised binary search, whose many small gathers dominate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from core.kmeans import nearest_codes, sanitize_weights

CHUNK_ELEMENTS = 1 << 21   # values per chunk: ~100 MB of float64 work arrays


class _Sorted(NamedTuple):
    """Rows sorted once, laid out for three-level searches. Each row is padded to ``fan**3``
    entries (fan = ceil(n ** (1/3))) by repeating its last entry; a search compares a target with
    the ``fan`` entries ending each top group, then the ``fan`` ending each subgroup of that group,
    then the ``fan`` entries of one subgroup: about 3 * n ** (1/3) dense comparisons.

    xs: float64 [R, fan**3] ascending per row, minus the row mean (keeps the sums of x**2 small);
    xs_mid: [R, fan**2] entries fan-1, 2*fan-1, ...; xs_top: [R, fan] entries fan**2-1, ....
    prefix: float64 [R, fan**3 + 1, 3]: at position i the sums over the first i sorted values of
    (w, w*x, w*x**2); prefix_mid: [R, fan**2, 3] positions fan, 2*fan, ...; prefix_top: [R, fan, 3]
    positions fan**2, 2*fan**2, ....
    """

    xs: torch.Tensor
    xs_mid: torch.Tensor
    xs_top: torch.Tensor
    prefix: torch.Tensor
    prefix_mid: torch.Tensor
    prefix_top: torch.Tensor
    n: int
    fan: int

    def value_at(self, row: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """float64 like i: sorted value i (0 <= i < n) of each virtual row (row: int64 [A, 1])."""
        return torch.take(self.xs, row * self.xs.shape[1] + i)

    def sums_at(self, row: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """float64 [*i.shape, 3]: (sum w, sum w*x, sum w*x**2) over the first i (0..n) sorted values."""
        flat = row * self.prefix.shape[1] + i
        return self.prefix.view(-1, 3).index_select(0, flat.reshape(-1)).view(*i.shape, 3)

    def value_group(self, row: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """float64 [*group.shape, fan]: sorted values group*fan ... group*fan + fan - 1 of each row."""
        table = self.xs.view(-1, self.fan)
        flat = row * (self.fan * self.fan) + group
        return table.index_select(0, flat.reshape(-1)).view(*group.shape, self.fan)

    def sums_group(self, row: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """float64 [*group.shape, fan, 3]: entry j is the prefix at position group*fan + j + 1, the
        sums up to and including sorted value group*fan + j."""
        flat = self.prefix.view(-1, 3)
        # overlapping windows of `fan` prefix rows starting anywhere: a view, no copy
        windows = flat.as_strided((flat.shape[0] - self.fan + 1, self.fan, 3), (3, 3, 1))
        start = row * self.prefix.shape[1] + 1 + group * self.fan
        return windows.index_select(0, start.reshape(-1)).view(*group.shape, self.fan, 3)


def kmeans_torch(values: torch.Tensor, weights: torch.Tensor, n_clusters: int, max_iter: int, seed: int,
                  tol: float, restarts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectorised torch implementation of ``weighted_kmeans_1d`` (any device)."""
    x = values.detach().float()
    finite = x.isfinite()
    w = sanitize_weights(torch.where(finite, weights.detach().float(), torch.zeros_like(x)))
    x = torch.where(finite, x, torch.zeros_like(x))
    n_rows, n = x.shape
    centroids = torch.zeros(n_rows, n_clusters, dtype=torch.float32, device=x.device)
    codes = torch.zeros(n_rows, n, dtype=torch.uint8, device=x.device)
    if n_rows == 0 or n == 0:
        return centroids, codes
    draws = _random_draws(n_rows, n_clusters, max(1, restarts), seed)
    step = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n_rows, step):
        part = slice(start, start + step)
        shift = x[part].double().mean(1, keepdim=True)
        data = _sort_rows(x[part], shift, w[part])
        best = _best_of_restarts(data, n_clusters, draws[:, part].to(x.device), max_iter, tol)
        centroids[part] = (best + shift).float()
        codes[part] = nearest_codes(values[part].detach(), centroids[part])
    return centroids, codes


def _random_draws(n_rows: int, n_clusters: int, restarts: int, seed: int) -> torch.Tensor:
    """float64 [restarts, rows, 1 + (K-1)*T] uniforms in [0, 1), T = 2 + int(ln K) candidates per
    step (scikit-learn's count). Drawn for the whole call, so chunking does not change the result."""
    trials = 2 + int(math.log(n_clusters))
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(restarts, n_rows, 1 + (n_clusters - 1) * trials, generator=generator,
                      dtype=torch.float64)


def _sort_order(x: torch.Tensor) -> torch.Tensor:
    """int64 [R, n]: the stable ascending order of each row of finite float32 ``x`` [R, n].

    On the CPU, NumPy's vectorised sort of packed keys (order-preserving bits of the value in the
    high half, column in the low half) is about 3x faster than torch.sort with indices."""
    if x.device.type != "cpu":
        return torch.sort(x, dim=1, stable=True).indices
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    packed = (key.long() << 32) | torch.arange(x.shape[1])
    return torch.from_numpy(np.sort(packed.numpy(), axis=1)) & 0xFFFFFFFF


def _sort_rows(x: torch.Tensor, shift: torch.Tensor, w: torch.Tensor) -> _Sorted:
    """x: finite float32 [R, n], shift: float64 [R, 1] taken off the values, w: float32 [R, n]
    -> the sorted layout."""
    n_rows, n = x.shape
    fan = 1
    while fan ** 3 < n:
        fan += 1
    stride = fan ** 3
    order = _sort_order(x)
    xs = x.gather(1, order).double() - shift
    ws = w.gather(1, order).double()
    padded = torch.cat([xs, xs[:, -1:].expand(n_rows, stride - n)], 1)
    # built in place: stacking and concatenating [R, n, 3] copies cost more than the sort itself
    prefix = xs.new_empty(n_rows, stride + 1, 3)
    prefix[:, 0] = 0
    body = prefix[:, 1:n + 1]
    body[..., 0] = ws
    torch.mul(ws, xs, out=body[..., 1])
    torch.mul(body[..., 1], xs, out=body[..., 2])
    body.copy_(body.cumsum(1))
    prefix[:, n + 1:] = prefix[:, n:n + 1]
    return _Sorted(padded, padded[:, fan - 1::fan].contiguous(), padded[:, fan * fan - 1::fan * fan].contiguous(),
                   prefix, prefix[:, fan::fan].contiguous(), prefix[:, fan * fan::fan * fan].contiguous(), n, fan)


def _best_of_restarts(data: _Sorted, n_clusters: int, draws: torch.Tensor, max_iter: int,
                      tol: float) -> torch.Tensor:
    """float64 [R, K] ascending: per row, the seeding + Lloyd run with the lowest objective.
    draws: float64 [restarts, R, D]; each restart of each row is one virtual row."""
    restarts, n_rows = draws.shape[:2]
    row = torch.arange(n_rows, device=draws.device).repeat(restarts).unsqueeze(1)
    centers, bounds = _kmeans_plusplus(data, row, n_clusters, draws.reshape(restarts * n_rows, -1))
    centers, bounds = _lloyd(data, row, centers, bounds, max_iter, tol)
    cost = _run_costs(data, row, bounds, centers).sum(1).reshape(restarts, n_rows)
    pick = cost.argmin(0)
    return centers.reshape(restarts, n_rows, -1)[pick, torch.arange(n_rows, device=draws.device)]


def _count_at_most(data: _Sorted, row: torch.Tensor, target: torch.Tensor, top: torch.Tensor,
                   mid: torch.Tensor, fetch_group, key) -> torch.Tensor:
    """int64 like target [A, Q]: how many of a row's n entries have key(entry) <= target, for entries
    whose keys ascend along the row. top: [R, fan, ...] and mid: [R, fan**2, ...] the entries ending
    each group of fan**2 and of fan; fetch_group(row, g) gives the entries of groups g [A, Q] as
    [A, Q, fan, ...]; key maps entries [A, Q|1, fan, ...] to values [A, Q, fan]. Padding repeats
    the last entry: a target above all entries descends into the last groups, hence the clamps."""
    fan, bound = data.fan, target.unsqueeze(2)
    group = (key(top.index_select(0, row.squeeze(1)).unsqueeze(1)) <= bound).sum(2).clamp_max(fan - 1)
    table = mid.view(-1, fan, *mid.shape[2:])
    entries = table.index_select(0, (row * fan + group).reshape(-1)).view(*group.shape, fan, *mid.shape[2:])
    group = group * fan + (key(entries) <= bound).sum(2).clamp_max(fan - 1)
    return (group * fan + (key(fetch_group(row, group)) <= bound).sum(2)).clamp_max(data.n)


def _count_below(data: _Sorted, row: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """int64 [A, Q]: how many sorted values of each row are <= each of ``limits`` [A, Q]."""
    return _count_at_most(data, row, limits, data.xs_top, data.xs_mid, data.value_group, lambda v: v)


def _cost(sums: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float64: sum w (x - c)**2 of runs given their (sum w, sum w*x, sum w*x**2) [..., 3]."""
    return torch.addcmul(torch.addcmul(sums[..., 2], c * c, sums[..., 0]), -2 * c, sums[..., 1])


def _run_costs(data: _Sorted, row: torch.Tensor, bounds: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """float64 [A, m]: cost (>= 0) of each run [bounds[k], bounds[k+1]) against centers[k]."""
    return _cost(data.sums_at(row, bounds).diff(dim=1), centers).clamp_min(0)


def _boundaries(data: _Sorted, row: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """int64 [A, m+1]: where the runs of the ascending ``centers`` [A, m] start in the sorted rows,
    plus n at the end. A value exactly midway belongs to the lower centroid."""
    inner = _count_below(data, row, (centers[:, 1:] + centers[:, :-1]) / 2)
    edge = torch.zeros_like(row)
    return torch.cat([edge, inner, edge + data.n], 1)


def _kmeans_plusplus(data: _Sorted, row: torch.Tensor, n_clusters: int,
                     draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy weighted k-means++ seeds: float64 [A, K] ascending and their int64 [A, K+1] run bounds.

    First seed: a point drawn with probability proportional to w. Each next seed: T candidates drawn
    with probability proportional to w * D**2 (D: distance to the nearest seed so far); the one that
    lowers the potential most is kept. draws: float64 [A, 1 + (K-1)*T] uniforms in [0, 1).
    """
    n = data.n
    total = data.sums_at(row, torch.full_like(row, n))[..., 0]
    first = _count_at_most(data, row, draws[:, :1] * total, data.prefix_top, data.prefix_mid,
                           data.sums_group, lambda sums: sums[..., 0])
    centers = data.value_at(row, first.clamp_max(n - 1))
    bounds = torch.cat([torch.zeros_like(row), torch.full_like(row, n)], 1)
    trials = (draws.shape[1] - 1) // max(1, n_clusters - 1)
    for step in range(1, n_clusters):
        u = draws[:, 1 + (step - 1) * trials: 1 + step * trials]
        candidates = _sample_by_potential(data, row, centers, bounds, u)
        delta, slot, lo, hi = _insertion(data, row, centers, bounds, candidates)
        best = delta.argmin(1, keepdim=True)
        centers, bounds = _insert(centers, bounds, candidates.gather(1, best), slot.gather(1, best),
                                  lo.gather(1, best), hi.gather(1, best))
    return centers, bounds


def _sample_by_potential(data: _Sorted, row: torch.Tensor, centers: torch.Tensor, bounds: torch.Tensor,
                         u: torch.Tensor) -> torch.Tensor:
    """float64 [A, T]: sorted values drawn with probability proportional to w * D**2 given ``centers``
    [A, m] and their ``bounds``. The run is picked from the run potentials, then the point inside it
    by a binary search on the running potential against that run's centre. u: [A, T] in [0, 1)."""
    m, n = centers.shape[1], data.n
    cumulative = _run_costs(data, row, bounds, centers).cumsum(1)
    target = u * cumulative[:, -1:]
    run = (cumulative.unsqueeze(1) <= target.unsqueeze(2)).sum(2).clamp_max(m - 1)
    before = torch.where(run > 0, cumulative.gather(1, (run - 1).clamp_min(0)), 0.0)
    c, start, stop = centers.gather(1, run), bounds.gather(1, run), bounds.gather(1, run + 1)
    # sum_{j<i} w_j (x_j - c)**2 is ascending in i over the whole row: search where the run's share is spent
    threshold = _cost(data.sums_at(row, start), c) + (target - before)
    count = _count_at_most(data, row, threshold, data.prefix_top, data.prefix_mid, data.sums_group,
                           lambda sums: _cost(sums, c.unsqueeze(2)))
    return data.value_at(row, torch.minimum(torch.maximum(count, start), stop - 1).clamp(0, n - 1))


def _insertion(data: _Sorted, row: torch.Tensor, centers: torch.Tensor, bounds: torch.Tensor,
               candidates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Change of the potential if each candidate [A, T] joined ``centers`` [A, m] (float64 [A, T]),
    with its slot among the centres and the bounds [lo, hi) of its new run (int64 [A, T] each).
    Only the span between the candidate's two neighbouring centres changes."""
    m = centers.shape[1]
    slot = (centers.unsqueeze(1) < candidates.unsqueeze(2)).sum(2)
    has_left, has_right = slot > 0, slot < m
    left = torch.where(has_left, centers.gather(1, (slot - 1).clamp_min(0)), candidates)
    right = torch.where(has_right, centers.gather(1, slot.clamp_max(m - 1)), candidates)
    mids = torch.cat([(left + candidates) / 2, (candidates + right) / 2], 1)
    lo, hi = _count_below(data, row, mids).chunk(2, dim=1)
    lo, hi = torch.where(has_left, lo, 0), torch.where(has_right, hi, data.n)
    split = bounds.gather(1, slot)
    sums = data.sums_at(row.unsqueeze(2), torch.stack([lo, split, hi], 2))
    old = _cost(sums[:, :, 1] - sums[:, :, 0], left) + _cost(sums[:, :, 2] - sums[:, :, 1], right)
    return _cost(sums[:, :, 2] - sums[:, :, 0], candidates) - old, slot, lo, hi


def _insert(centers: torch.Tensor, bounds: torch.Tensor, new: torch.Tensor, slot: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put one centre [A, 1] at ``slot`` [A, 1]: centers [A, m] -> [A, m+1]; bounds [A, m+1] -> [A, m+2],
    where the old split at ``slot`` becomes the new run [lo, hi)."""
    m = centers.shape[1]
    j = torch.arange(m + 2, device=centers.device).unsqueeze(0)
    shifted = bounds.gather(1, (j - (j > slot).long()).clamp_max(m))
    new_bounds = torch.where(j == slot, lo, torch.where(j == slot + 1, hi, shifted))
    k = j[:, :m + 1]
    moved = centers.gather(1, (k - (k > slot).long()).clamp_max(m - 1))
    return torch.where(k == slot, new, moved), new_bounds


def _lloyd(data: _Sorted, row: torch.Tensor, centers: torch.Tensor, bounds: torch.Tensor, max_iter: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd steps on ascending ``centers`` [A, K] with their run ``bounds`` [A, K+1]; returns both,
    updated. Each centroid moves to its run's weighted mean (an empty run keeps its centroid); rows
    whose assignment stops changing leave the active set, so late steps touch only the few still moving."""
    n, k = data.n, centers.shape[1]
    centers, bounds = centers.clone(), bounds.clone()
    span = (data.value_at(row, torch.full_like(row, n - 1)) - data.value_at(row, torch.zeros_like(row))).squeeze(1)
    active = torch.arange(row.shape[0], device=row.device)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        r, c, b = row[active], centers[active], bounds[active]
        sums = data.sums_at(r, b).diff(dim=1)
        # clamped into the run: after huge weights, a run of tiny ones loses digits in the differences
        ends = data.value_at(r, torch.cat([b[:, :-1], b[:, 1:] - 1], 1).clamp(0, n - 1))
        mean = torch.clamp(sums[..., 1] / sums[..., 0], ends[:, :k], ends[:, k:])
        moved = torch.where(sums[..., 0] > 0, mean, c).sort(1).values
        new_bounds = _boundaries(data, r, moved)
        centers[active], bounds[active] = moved, new_bounds
        still = (new_bounds != b).any(1) & ((moved - c).abs().amax(1) > tol * span[active])
        active = active[still]
    return centers, bounds
