"""Our Fisher-weighted 1-D k-means against the original's per-row scikit-learn, on the demo model.

python -m bench.kmeans [--bits 3 4] [--limit-matrices N] [--sklearn-rows R] [--samples 16] [--workers 2]

Every quantizable matrix of the demo model with its real Fisher diagonal (computed once on
``--samples`` calibration windows and cached by core.sensitivity). Ours: ``weighted_kmeans_1d`` on
each whole matrix, as quantize_matrix calls it, ``--workers`` matrices at a time in threads with one
torch thread each; the table names the path that ran (``core.kmeans.backend``: "cpu-ext", the
compiled op, or "torch"; ``SQUEEZE_KERNELS=torch`` measures the torch path). The original:
``KMeans(K, init="k-means++", n_init=1, max_iter=50, random_state=0).fit(row, sample_weight=F_row)``
per row with OMP_NUM_THREADS=1 in a pool of ``--workers`` processes (SPEC A.5, PR #60), on an even subsample of ``--sklearn-rows`` rows per
matrix; its times are scaled up to all rows. Objective ratios are ours / scikit-learn's on the rows
both solved. Writes the "kmeans" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from bench.report import machine_line, update_section
from core.kmeans import DEFAULT_RESTARTS

SETTINGS = dict(init="k-means++", n_init=1, max_iter=50, random_state=0)


def _sklearn_rows(task: tuple[np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, float]:
    """Worker: centroids float32 [rows, K] of per-row scikit-learn fits, and their CPU seconds."""
    from sklearn.cluster import KMeans

    x, w, k = task
    t0 = time.process_time()
    centers = np.empty((x.shape[0], k), dtype=np.float32)
    for r in range(x.shape[0]):
        fit = KMeans(n_clusters=k, **SETTINGS).fit(x[r].reshape(-1, 1), sample_weight=w[r])
        centers[r] = fit.cluster_centers_.reshape(-1)
    return centers, time.process_time() - t0


def _warm_up(pool, workers: int) -> None:
    """Start every worker and import scikit-learn there, outside the timed runs."""
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, -1)
    list(pool.map(_sklearn_rows, [(x, np.ones_like(x), 4)] * (2 * workers)))


def load_demo(samples: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """name -> float32 weight [out, in] and name -> Fisher [out, in] for every quantizable linear."""
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


def time_ours(weights: dict, fisher: dict, names: list[str], k: int, workers: int) -> tuple[dict, float, float]:
    """Centroids per matrix, wall seconds and CPU seconds of our k-means over ``names``."""
    from core.kmeans import weighted_kmeans_1d

    def solve(name: str) -> torch.Tensor:
        return weighted_kmeans_1d(weights[name], fisher[name], k)[0]

    solve(names[0])  # warm-up: first-call allocations and lazy imports
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        centroids = dict(zip(names, pool.map(solve, names)))
    return centroids, time.perf_counter() - wall, time.process_time() - cpu


def time_sklearn(weights: dict, fisher: dict, picks: dict, k: int, pool) -> tuple[dict, float, float]:
    """scikit-learn centroids of the picked rows, wall seconds and summed worker CPU seconds."""
    from core.kmeans import sanitize_weights

    names = list(picks)
    tasks = [(weights[n][picks[n]].numpy(), sanitize_weights(fisher[n][picks[n]]).numpy(), k) for n in names]
    wall = time.perf_counter()
    results = list(pool.map(_sklearn_rows, tasks))
    return ({n: torch.from_numpy(c) for n, (c, _) in zip(names, results)}, time.perf_counter() - wall,
            sum(s for _, s in results))


def run(bits: int, weights: dict, fisher: dict, names: list[str], sklearn_rows: int | None, pool,
        workers: int) -> dict:
    """Both solvers on ``names`` at ``bits``; the numbers of one table line."""
    from core.kmeans import backend, weighted_objective

    k = 1 << bits
    load_before = os.getloadavg()[0]
    ours, ours_wall, ours_cpu = time_ours(weights, fisher, names, k, workers)
    picks = {n: _row_sample(weights[n].shape[0], sklearn_rows) for n in names}
    sk, sk_wall, sk_cpu = time_sklearn(weights, fisher, picks, k, pool)
    rows = sum(weights[n].shape[0] for n in names)
    sk_rows = sum(len(p) for p in picks.values())
    ours_obj = torch.cat([weighted_objective(weights[n][picks[n]], fisher[n][picks[n]], ours[n][picks[n]])
                          for n in names])
    sk_obj = torch.cat([weighted_objective(weights[n][picks[n]], fisher[n][picks[n]], sk[n]) for n in names])
    ratio = ours_obj / sk_obj.clamp_min(1e-300)
    scale = rows / sk_rows
    print(f"{bits}-bit: ours {ours_wall:.1f} s wall, {ours_cpu:.1f} s CPU for {rows} rows; scikit-learn "
          f"{sk_wall:.1f} s wall, {sk_cpu:.1f} s CPU for {sk_rows} rows", flush=True)
    return dict(bits=bits, path=backend(torch.device("cpu")), matrices=len(names), rows=rows, sk_rows=sk_rows, ours_wall=ours_wall, ours_cpu=ours_cpu,
                sk_wall=sk_wall * scale, sk_cpu=sk_cpu * scale, mean_ratio=float(ratio.mean()),
                total_ratio=float(ours_obj.sum() / sk_obj.sum()), better=float((ratio < 1 - 1e-9).double().mean()),
                worse=float((ratio > 1 + 1e-9).double().mean()), p95=float(ratio.quantile(0.95)),
                worst=float(ratio.max()), load=(load_before, os.getloadavg()[0]))


def table(results: list[dict], samples: int, workers: int) -> str:
    head = ("| bits | ours: path | matrices | rows (scikit-learn on) | ours s | scikit-learn s | **speed-up** | CPU-time speed-up "
            "| **mean objective ratio** | total objective ratio | rows better / worse | p95 / worst row ratio |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['bits']} | {r['path']} | {r['matrices']} | {r['rows']} ({r['sk_rows']}) | {r['ours_wall']:.1f} | "
             f"{r['sk_wall']:.0f} | **{r['sk_wall'] / r['ours_wall']:.0f}x** | {r['sk_cpu'] / r['ours_cpu']:.0f}x | "
             f"**{r['mean_ratio']:.4f}** | {r['total_ratio']:.4f} | {100 * r['better']:.0f}% / "
             f"{100 * r['worse']:.0f}% | {r['p95']:.3f} / {r['worst']:.3f} |" for r in results]
    loads = ", ".join(f"{r['bits']}-bit {r['load'][0]:.1f} -> {r['load'][1]:.1f}" for r in results)
    return "\n".join([
        "## Weighted k-means: ours vs the original's per-row scikit-learn", "", machine_line(), "",
        f"Demo model (SmolLM2-135M-Instruct): every quantizable matrix, with the Fisher diagonal of {samples} "
        "calibration windows of 512 tokens. Objective per row: sum_j F_j (W_j - c(W_j))^2; ratio = ours / "
        "scikit-learn's on the same rows (below 1 = better than the original). scikit-learn: "
        "`KMeans(K, init='k-means++', n_init=1, max_iter=50, random_state=0)` per row, OMP_NUM_THREADS=1, "
        f"{workers} worker processes, on an even subsample of each matrix's rows, its times scaled to all rows. "
        f"Ours: `weighted_kmeans_1d(W, F, K)` per matrix with its defaults (greedy k-means++ with "
        f"{DEFAULT_RESTARTS} seedings per row, the best kept; Lloyd to convergence or 50 steps), {workers} matrices at a time in threads with one torch thread each; "
        "path cpu-ext = the compiled C++ op (cuda_ext/csrc/cpu_kmeans.cpp, rows one after another within a "
        "matrix), torch = the vectorised torch code (`SQUEEZE_KERNELS=torch`). "
        f"Seconds are wall-clock; CPU-time speed-up compares summed CPU seconds. Load average (1 min) over the "
        f"runs: {loads} (the two scikit-learn workers alone load 2 cores). On a busy machine torch's own two "
        "threads made the torch path many times slower (its small parallel regions wait for a descheduled "
        "thread), hence one torch thread per worker.", "", head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3])
    parser.add_argument("--limit-matrices", type=int, default=None, help="only the first N matrices")
    parser.add_argument("--sklearn-rows", type=int, default=128,
                        help="scikit-learn on N evenly spaced rows per matrix (0: all rows)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows for the Fisher")
    parser.add_argument("--workers", type=int, default=2, help="processes for scikit-learn, threads for ours")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    weights, fisher = load_demo(args.samples)
    names = list(weights)[:args.limit_matrices]
    torch.set_num_threads(1)  # parallel over matrices instead; torch's own threads stall on a busy machine
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the scikit-learn workers, as the original set it
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        _warm_up(pool, args.workers)
        results = [run(b, weights, fisher, names, args.sklearn_rows or None, pool, args.workers) for b in args.bits]
    text = table(results, args.samples, args.workers)
    print("\n" + text)
    if not args.no_write:
        update_section("kmeans", text)


if __name__ == "__main__":
    main()
