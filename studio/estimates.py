"""A rough time estimate for a quantization run, shown before it starts.

Constants from the pipeline benchmark (BENCHMARKS.md, demo model: 135 M parameters, 106 M quantizable
weights, 2 CPU cores, load average about 2): the Fisher pass took 454 s for 100 windows of 512 tokens
(forward + backward ~ 6 flops per parameter per token: about 90 GFLOP/s), outlier statistics, split,
compiled k-means and packing about 13 s together at 4 bits (0.12 s per million weights), load and save
6 s. A busier machine is slower, hence "rough". A GPU is counted 10x faster; sensitivity already
cached costs nothing.
"""

from __future__ import annotations

from core.config import CalibrationConfig, QuantConfig

# Fisher: forward + backward ~ 6 flops per parameter per token; effective CPU throughput.
CPU_FLOPS = 90e9
# Outliers, split, k-means and packing at 4 bits, seconds per million quantizable weights.
QUANTIZE_SECONDS_PER_MWEIGHT = 0.12
LOAD_SAVE_SECONDS = 6.0
GPU_SPEEDUP = 10.0
# Refinement (QuantConfig.refine): seconds per million quantizable weights on the demo (2 cores). Its work per
# weight grows with the layer's input width (H is in x in), so wider models take longer per weight (1.1B-shaped
# matrices: about 3.5x the demo's per weight, bench/results/refine_scale.json). H also adds to the calibration pass.
# From bench/results/accuracy.json, its four refined 100-window rows (bench.accuracy at c596774, 2 cores shared
# with other jobs, load average 2-10): refinement added 26.0 / 27.5 / 22.2 / 25.9 s (3-bit dense-only /
# dense-and-sparse, 4-bit the same) to the quantize step's wall time against the same rows without it, for the
# demo's 106.2 M weights: 0.21-0.26 s per million (its 'refine' seconds, 38.5 / 40.7 / 35.4 / 40.1, are summed
# over the two matrix threads).
REFINE_SECONDS_PER_MWEIGHT = 0.24
HESSIAN_PASS_EXTRA = 0.3  # the gradient-weighted H: ~2 x tokens x in^2 flops per layer, ~30% more than the Fisher pass


def estimate_seconds(parameters: int, quantizable: int, config: QuantConfig, calibration: CalibrationConfig,
                     fisher_cached: bool, gpu: bool) -> dict[str, float]:
    """Seconds per stage (load+save, fisher, quantize) for a run with these settings."""
    speed = GPU_SPEEDUP if gpu else 1.0
    fisher = 0.0
    if config.method == "squeezellm" and not fisher_cached:
        fisher = 6.0 * parameters * calibration.samples * calibration.seqlen / CPU_FLOPS / speed
    iterations = config.kmeans_max_iter / 50.0 if config.method == "squeezellm" else 0.05
    # k-means time grows with the centroids; a mixed-precision run clusters every matrix at two widths.
    widths = config.widths
    quantize = QUANTIZE_SECONDS_PER_MWEIGHT * quantizable / 1e6 * iterations * sum(widths) / 4.0 / speed
    seconds = {"load and save": LOAD_SAVE_SECONDS * parameters / 135e6, "sensitivity": fisher, "quantize": quantize}
    if config.refine and config.method == "squeezellm":
        seconds["sensitivity"] *= 1 + HESSIAN_PASS_EXTRA * config.refine_groups  # one H per channel group
        seconds["refine"] = REFINE_SECONDS_PER_MWEIGHT * quantizable / 1e6 * len(widths) / speed
    return seconds
