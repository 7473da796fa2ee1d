"""Per-weight cost of the per-block stages at two model widths, measured in one process.

python -m bench.streaming --probe

Whole runs at 1.1 B and 8 B parameters take minutes to an hour each, so on a shared machine their
stage times carry whatever else ran meanwhile. This probe does the per-block work of the streaming
engine on block 0 of the 1.1 B- and 8 B-shaped folders, alternating between them (``ROUNDS`` times) so
both see the same machine: outlier statistics (``core.outliers.OutlierStats.of`` of each stored bf16
matrix, as the forward sweep does), then the split and the k-means of ``core.quantize`` on every
projection with a seeded stand-in Fisher (their cost does not depend on the Fisher's values), with
the engine's own thread pool (``core.quantize.per_matrix``). Reported: seconds per million weights
of each stage at each width, the median over rounds, and their ratio (8 B over 1.1 B).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

ROUNDS = 3
OUTLIER_PERCENT, SENSITIVE_PERCENT, BITS = 0.45, 0.05, 3


def block_stage_seconds(folder: Path) -> tuple[int, dict[str, float]]:
    """(weights of block 0's projections, stage -> seconds) for one pass over block 0."""
    from core.block_pass import block_linears
    from core.lazy_model import LazyModel
    from core.outliers import OutlierStats, solve_range_multiplier
    from core.quantize import per_matrix, quantize_matrix_widths

    lazy = LazyModel.open(folder)
    stored = lazy.stored_dtypes()
    block = lazy.load_block(0, torch.device("cpu"))
    try:
        linears = block_linears(lazy, 0)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        stats = {name: OutlierStats.of(lin.weight.to(stored[f"{name}.weight"])) for name, lin in linears.items()}
        seconds["outliers"] = time.perf_counter() - t0
        multiplier = solve_range_multiplier(list(stats.values()), OUTLIER_PERCENT)
        generator = torch.Generator().manual_seed(0)
        fishers = {name: torch.rand(lin.weight.shape, generator=generator) for name, lin in linears.items()}

        def job(name, lin, device):
            return quantize_matrix_widths(lin.weight, fishers[name], (BITS,),
                                          threshold=stats[name].threshold(multiplier),
                                          sensitivity_percent=SENSITIVE_PERCENT, timings=seconds)

        for _ in per_matrix(linears, "cpu", job):
            pass
        return sum(lin.weight.numel() for lin in linears.values()), seconds
    finally:
        lazy.release(block)


def probe(folders: dict[str, Path], rounds: int = ROUNDS, log=print) -> dict:
    """label -> {"weights": n, "per_million": {stage: median seconds per million weights}}."""
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in folders}
    weights: dict[str, int] = {}
    for r in range(rounds):
        for label, folder in folders.items():
            n, seconds = block_stage_seconds(folder)
            weights[label] = n
            runs[label].append({k: v / (n / 1e6) for k, v in seconds.items()})
            log(f"  probe round {r + 1}/{rounds}, {label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return {label: {"weights": weights[label],
                    "per_million": {k: statistics.median(run[k] for run in rows) for k in rows[0]}}
            for label, rows in runs.items()}


def by_size(result: dict) -> list[tuple[str, dict]]:
    """The probed widths, fewest weights first (the results file sorts keys by name)."""
    return sorted(result["widths"].items(), key=lambda item: item[1]["weights"])[:2]


def probe_lines(result: dict) -> list[str]:
    """The probe's table for BENCHMARKS.md (empty without a probe)."""
    if not result or len(result.get("widths", {})) < 2:
        return []
    (small_label, small), (large_label, large) = by_size(result)
    stages = [s for s in ("outliers", "split", "kmeans") if s in small["per_million"]]
    lines = [f"Per-block stages at two widths in one process (bench.streaming --probe, {result['run']}, "
             f"{result['commit']}, load {result['load']}): block 0 of each folder, alternating, median of "
             f"{result['rounds']} rounds, seconds per million weights (split and k-means: CPU-seconds summed "
             "over the engine's threads):", "",
             "| block of | weights | " + " | ".join(stages) + " |", "|---|---:|" + "---:|" * len(stages)]
    for label, row in ((small_label, small), (large_label, large)):
        lines.append(f"| {label} | {row['weights'] / 1e6:.1f} M | "
                     + " | ".join(f"{row['per_million'][s]:.3f}" for s in stages) + " |")
    lines.append(f"| ratio | {large['weights'] / small['weights']:.1f}x | "
                 + " | ".join(f"{large['per_million'][s] / small['per_million'][s]:.2f}x" for s in stages) + " |")
    return lines + [""]
