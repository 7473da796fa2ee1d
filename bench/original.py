"""The original SqueezeLLM quantization, reproduced as the reference for accuracy comparisons.

Follows SPEC.md A.4-A.6 step by step: sensitive values by the original's strict ``F > tau``
rule (k-1 values), outliers with ``|w| >= T``, and one scikit-learn KMeans per output row
(k-means++, n_init=1, max_iter=50, random_state=0, sample weights F * (W != 0), unweighted
fallback for an all-zero row), fp32 lookup tables. The result is written into each
``nn.Linear`` as its dequantized weight (LUT[labels] + exact sparse values), which is what the
original's own CPU verification does. Rows of all matrices run in a process pool, as the
original's nuq.py does (PR #60), with one thread per worker.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import numpy as np
import torch


def _fit_rows(task: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """Worker: dequantized rows float32 [rows, n] from per-row weighted scikit-learn k-means."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x, w, k = task
    out = np.empty_like(x)
    # One thread per worker. The OMP_NUM_THREADS variable comes too late here (importing this module already
    # loaded an OpenMP runtime through torch), and two workers x two OpenMP threads each on two cores made
    # every fit 5x slower (25.6 vs 4.7 ms per 2048-weight row).
    with threadpool_limits(1):
        for r in range(x.shape[0]):
            sw = w[r] if w[r].sum() > 0 else np.ones_like(w[r])
            fit = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=50, random_state=0)
            fit.fit(x[r].reshape(-1, 1), sample_weight=sw)
            out[r] = fit.cluster_centers_.reshape(-1).astype(np.float32)[fit.labels_]
    return out


def original_split(w: torch.Tensor, f: torch.Tensor | None, threshold: float | None,
                   sensitivity_percent: float) -> torch.Tensor:
    """bool [out, in]: the original's sparse entries (strict '>' on the k-th Fisher value)."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    if f is not None and sensitivity_percent > 0:
        k = math.floor(w.numel() * sensitivity_percent / 100)
        if k > 0:
            tau = torch.topk(f.reshape(-1), k).values[-1]
            mask |= f > tau
    if threshold is not None:
        mask |= w.abs() >= threshold
    return mask


def quantize_like_original(model: torch.nn.Module, bits: int, fisher: dict[str, torch.Tensor] | None,
                           thresholds: dict[str, float | None], sensitivity_percent: float,
                           workers: int = 2, chunk_rows: int = 256) -> int:
    """Replace each quantizable weight of ``model`` by the original method's reconstruction, in place;
    returns the number of sparse (exactly kept) entries."""
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    tasks, plan = [], []
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        f = fisher[name].float() if fisher is not None else None
        mask = original_split(w, f, thresholds.get(name), sensitivity_percent)
        dense = w.masked_fill(mask, 0.0)
        sw = (f if f is not None else torch.ones_like(w)) * (dense != 0)
        for start in range(0, w.shape[0], chunk_rows):
            tasks.append((dense[start:start + chunk_rows].numpy(), sw[start:start + chunk_rows].numpy(), 1 << bits))
        plan.append((name, lin, w, mask))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pieces = iter(pool.map(_fit_rows, tasks))
        for name, lin, w, mask in plan:
            rows = [next(pieces) for _ in range(0, w.shape[0], chunk_rows)]
            deq = torch.from_numpy(np.concatenate(rows))
            lin.weight.data.copy_(torch.where(mask, w, deq).to(lin.weight.dtype))
    return sum(int(mask.sum()) for *_, mask in plan)
