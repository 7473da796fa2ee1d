"""Fisher-weighted 1-D k-means per output row (SPEC A.5, H.1, H.2).

Per row, minimise ``sum_j w_j (x_j - c_{a_j})**2`` over 2**bits centroids: greedy weighted
k-means++ seeding (scikit-learn's scheme), then Lloyd on the sorted row with prefix sums, so each
step costs a few searches per row instead of a pass over it (SPEC H.1).

Two implementations of the same algorithm: on the CPU a compiled op, one row at a time per thread,
when ``core.kernels`` picks the compiled CPU kernels (``cuda_ext``'s ``squeeze_cpu`` library, op
``kmeans_1d_cpu``; ``SQUEEZE_KERNELS=torch`` turns it off), see ``backend``; elsewhere the vectorised
torch code of ``core.kmeans_torch`` (the GPU path and the tests' oracle). The two draw their random
numbers differently (the compiled one from a counter-based stream per seed, row and seeding), so
they give different, equally good optima.
"""

from __future__ import annotations

import math

import torch

# Seedings per row, best objective kept. Demo model, 100-window Fisher, summed weighted objective relative
# to 2 seedings: 1 -> 1.049 / 1.040 (3 / 4 bits), 4 -> 0.977 / 0.969, 8 -> 0.971 / 0.952 at 1.5x / 2.7x
# the time of 4; 3-bit dense-only perplexity 45.72 with 2, 42.16 with 4 (bench.accuracy protocol).
DEFAULT_RESTARTS = 4


def sanitize_weights(weights: torch.Tensor) -> torch.Tensor:
    """float32 [rows, n]: |w| with NaN/inf -> 0; a row whose weights sum to 0 becomes all ones
    (unweighted k-means, as the original does)."""
    w = torch.nan_to_num(weights.float().abs(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(w.sum(1, keepdim=True) <= 0, torch.ones_like(w), w)


def weighted_kmeans_1d(values: torch.Tensor, weights: torch.Tensor, n_clusters: int, *,
                       max_iter: int = 50, seed: int = 0, tol: float = 1e-6,
                       restarts: int = DEFAULT_RESTARTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of every row of ``values``.

    values, weights: float [rows, n] on any device (weights go through ``sanitize_weights``;
    non-finite values are clustered as weightless zeros). n_clusters: K in 1..256.
    max_iter: Lloyd steps after each seeding; a row stops once its assignment no longer changes or no
    centroid moves more than ``tol`` times the row's value range. seed: the same seed gives the same
    result on a given path (``backend``): the torch path draws from one CPU generator, so CPU and
    CUDA start from the same draws; the compiled path from a stream per (seed, row, seeding), so its
    result depends on neither the thread count nor the other rows.
    restarts: greedy k-means++ seedings per row; the one with the lowest objective is kept.
    Returns (centroids float32 [rows, K] ascending per row, codes uint8 [rows, n]): codes[r, j] is the
    index of the centroid nearest to values[r, j] for every entry, weightless ones included.
    """
    if values.dim() != 2 or values.shape != weights.shape:
        raise ValueError(f"values and weights must be 2-D of one shape, got {tuple(values.shape)} "
                         f"and {tuple(weights.shape)}")
    if not 1 <= n_clusters <= 256:
        raise ValueError(f"n_clusters must be in 1..256 (codes are uint8), got {n_clusters}")
    if backend(values.device) == "cpu-ext" and weights.device.type == "cpu":
        # sanitises values and weights itself, as below; float32 in, (float32, uint8) out
        return torch.ops.squeeze.kmeans_1d_cpu(values.detach().float(), weights.detach().float(), n_clusters,
                                               max_iter, (seed + 2**63) % 2**64 - 2**63, tol, max(1, restarts))
    from core.kmeans_torch import kmeans_torch

    return kmeans_torch(values, weights, n_clusters, max_iter, seed, tol, restarts)


def backend(device: torch.device) -> str:
    """Which implementation ``weighted_kmeans_1d`` uses for tensors on ``device``: "cpu-ext" (compiled,
    CPU tensors, when ``core.kernels`` picks the compiled CPU kernels; ``SQUEEZE_KERNELS=torch`` or
    a failed build leave it out) or "torch"."""
    from core.kernels import _backend  # the one switch for every compiled kernel

    return "cpu-ext" if device.type == "cpu" and _backend(device) == "cpu-ext" else "torch"


def nearest_codes(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n]: index of the nearest of the ascending ``centroids`` [rows, K] (K <= 256) for
    each of ``values`` [rows, n]; a value exactly midway goes to the lower centroid, NaN to 0.
    Midpoints and comparisons are in float64, where they are exact for float32 inputs."""
    x = values.double()
    c = centroids.double()
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k in range(c.shape[1] - 1):
        codes += x > (c[:, k:k + 1] + c[:, k + 1:k + 2]) / 2
    return codes


def weighted_objective(values: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """float64 [rows]: sum_j w_j * min_k (x_j - c_k)**2, with w sanitised as k-means does.

    values, weights: float [rows, n]; centroids: float [rows, K] in any order.
    """
    x = values.double()
    w = sanitize_weights(weights).double()
    c = centroids.double()
    best = torch.full_like(x, math.inf)
    for k in range(c.shape[1]):
        best = torch.minimum(best, (x - c[:, k:k + 1]).square())
    return (w * best).sum(1)
