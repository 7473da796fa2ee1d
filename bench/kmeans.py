"""Our Fisher-weighted 1-D k-means against the original's per-row scikit-learn, on the demo model.

python -m bench.kmeans [--bits 3] [--limit-matrices N] [--sklearn-rows R] [--samples 16] [--workers 2]

Every quantizable matrix of the demo model with its real Fisher diagonal (cached by
core.sensitivity). Ours: ``weighted_kmeans_1d`` on each whole matrix, as quantize_matrix calls it.
The original: ``KMeans(K, init="k-means++", n_init=1, max_iter=50, random_state=0).fit(row,
sample_weight=F_row)`` per row with OMP_NUM_THREADS=1 in a pool of worker processes (SPEC A.5, PR #60).
scikit-learn may run on an even subsample of each matrix's rows; its time is then scaled up to all
rows. Objective ratios are ours / scikit-learn's on the rows both solved. Writes the
"kmeans" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from bench.report import machine_line, update_section

SETTINGS = dict(init="k-means++", n_init=1, max_iter=50, random_state=0)


def _sklearn_rows(task: tuple[np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, float]:
    """Worker: centroids float32 [rows, K] of per-row scikit-learn fits, and the seconds they took."""
    from sklearn.cluster import KMeans

    x, w, k = task
    t0 = time.perf_counter()
    centers = np.empty((x.shape[0], k), dtype=np.float32)
    for r in range(x.shape[0]):
        fit = KMeans(n_clusters=k, **SETTINGS).fit(x[r].reshape(-1, 1), sample_weight=w[r])
        centers[r] = fit.cluster_centers_.reshape(-1)
    return centers, time.perf_counter() - t0


def _load(samples: int):
    from core.config import CalibrationConfig
    from core.models import load_model, quantizable_linears
    from core.progress import run_to_end
    from core.sensitivity import load_or_compute_fisher

    loaded = load_model("demo")
    fisher = run_to_end(load_or_compute_fisher(loaded.model, loaded.tokenizer, CalibrationConfig(samples=samples)),
                        lambda e: print(e.message, end="\r", flush=True))
    weights = {name: lin.weight.detach().float().clone() for name, lin in quantizable_linears(loaded.model).items()}
    return weights, fisher


def _row_sample(n_rows: int, keep: int | None) -> torch.Tensor:
    """Evenly spaced row indices (all rows when keep is None or >= n_rows)."""
    if keep is None or keep >= n_rows:
        return torch.arange(n_rows)
    return torch.linspace(0, n_rows - 1, keep).round().long().unique()


def run(bits: int, weights: dict, fisher: dict, limit: int | None, sklearn_rows: int | None, workers: int) -> dict:
    """Time both on the first ``limit`` matrices at ``bits``; returns the numbers of one table line."""
    from core.kmeans import sanitize_weights, weighted_kmeans_1d, weighted_objective

    k = 1 << bits
    names = list(weights)[:limit]
    ours_s, ours_obj, sk_obj, sk_rows, all_rows = 0.0, [], [], 0, 0
    tasks, picks = [], []
    for name in names:
        w, f = weights[name], sanitize_weights(fisher[name])
        t0 = time.perf_counter()
        centroids, _ = weighted_kmeans_1d(w, f, k)
        ours_s += time.perf_counter() - t0
        pick = _row_sample(w.shape[0], sklearn_rows)
        picks.append((name, pick, centroids[pick]))
        tasks.append((w[pick].numpy(), f[pick].numpy(), k))
        sk_rows += len(pick)
        all_rows += w.shape[0]
    print(f"ours: {ours_s:.1f} s for {all_rows} rows; scikit-learn on {sk_rows} rows ...", flush=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers, as the original set it (PR #60)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_sklearn_rows, tasks))
    sk_wall = time.perf_counter() - t0
    for (name, pick, ours_c), (sk_c, _) in zip(picks, results):
        w, f = weights[name][pick], fisher[name][pick]
        ours_obj.append(weighted_objective(w, f, ours_c))
        sk_obj.append(weighted_objective(w, f, torch.from_numpy(sk_c)))
    ours_obj, sk_obj = torch.cat(ours_obj), torch.cat(sk_obj)
    ratio = ours_obj / sk_obj.clamp_min(1e-300)
    sk_work = sum(s for _, s in results)
    return dict(bits=bits, matrices=len(names), rows=all_rows, sk_rows=sk_rows, ours_s=ours_s,
                sk_s=sk_wall * all_rows / sk_rows, sk_cpu_s=sk_work * all_rows / sk_rows, workers=workers,
                mean_ratio=float(ratio.mean()), total_ratio=float(ours_obj.sum() / sk_obj.sum()),
                better=float((ratio < 1 - 1e-9).double().mean()), worse=float((ratio > 1 + 1e-9).double().mean()),
                p95=float(ratio.quantile(0.95)), worst=float(ratio.max()))


def table(results: list[dict], samples: int) -> str:
    head = ("| bits | matrices | rows (sklearn rows) | ours s | sklearn s | speed-up | mean objective ratio | "
            "total objective ratio | rows better / worse | p95 / worst row ratio |\n|---:|---:|---:|---:|---:|---:|---:|"
            "---:|---:|---:|")
    lines = [f"| {r['bits']} | {r['matrices']} | {r['rows']} ({r['sk_rows']}) | {r['ours_s']:.2f} | "
             f"{r['sk_s']:.1f} | **{r['sk_s'] / r['ours_s']:.0f}x** | **{r['mean_ratio']:.4f}** | "
             f"{r['total_ratio']:.4f} | {100 * r['better']:.0f}% / {100 * r['worse']:.0f}% | "
             f"{r['p95']:.3f} / {r['worst']:.3f} |" for r in results]
    return "\n".join([
        "## Weighted k-means: ours vs the original's per-row scikit-learn", "", machine_line(), "",
        f"Demo model (SmolLM2-135M-Instruct), every row of the quantizable matrices, Fisher diagonal from "
        f"{samples} calibration windows of 512 tokens. Objective: sum_j F_j (W_j - c(W_j))^2 per row; ratio = "
        "ours / scikit-learn on the same rows (1.0 = the original's quality, lower is better). scikit-learn: "
        f"`KMeans(K, init='k-means++', n_init=1, max_iter=50, random_state=0)` per row, OMP_NUM_THREADS=1, "
        f"{results[0]['workers']} worker processes; when it ran on a subsample of rows its wall time is scaled "
        "to all rows. Ours: `weighted_kmeans_1d` per matrix (torch, CPU, default settings: greedy k-means++ "
        "with 2 seedings per row, Lloyd to convergence).", "", head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3])
    parser.add_argument("--limit-matrices", type=int, default=None, help="only the first N matrices")
    parser.add_argument("--sklearn-rows", type=int, default=None, help="scikit-learn on N evenly spaced rows per matrix")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows for the Fisher")
    parser.add_argument("--workers", type=int, default=2, help="scikit-learn worker processes")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights, fisher = _load(args.samples)
    results = [run(b, weights, fisher, args.limit_matrices, args.sklearn_rows, args.workers) for b in args.bits]
    text = table(results, args.samples)
    print(text)
    if not args.no_write:
        update_section("kmeans", text)


if __name__ == "__main__":
    main()
