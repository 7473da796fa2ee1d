"""A rough time estimate for a quantization run, shown before it starts.

Constants measured with the demo model (135 M parameters, 106 M quantizable weights) on a shared,
busy 2-core CPU machine: k-means + packing took 16 min (9 s per million weights), sensitivity 42 s per
512-token window (about 10 GFLOP/s for forward + backward). A quieter or bigger machine is faster, so
the summary calls it "rough". A GPU is counted 10x faster; sensitivity already cached costs nothing.
"""

from __future__ import annotations

from core.config import CalibrationConfig, QuantConfig

# Fisher: forward + backward ~ 6 flops per parameter per token; effective CPU throughput.
CPU_FLOPS = 10e9
# Dense-and-sparse k-means and packing, seconds per million quantizable weights at 50 iterations.
KMEANS_SECONDS_PER_MWEIGHT = 9.0
LOAD_SAVE_SECONDS = 15.0
GPU_SPEEDUP = 10.0


def estimate_seconds(parameters: int, quantizable: int, config: QuantConfig, calibration: CalibrationConfig,
                     fisher_cached: bool, gpu: bool) -> dict[str, float]:
    """Seconds per stage (load+save, fisher, quantize) for a run with these settings."""
    speed = GPU_SPEEDUP if gpu else 1.0
    fisher = 0.0
    if config.method == "squeezellm" and not fisher_cached:
        fisher = 6.0 * parameters * calibration.samples * calibration.seqlen / CPU_FLOPS / speed
    iterations = config.kmeans_max_iter / 50.0 if config.method == "squeezellm" else 0.05
    # k-means time grows with the centroids; a mixed-precision run clusters every matrix at 3 and 4 bits.
    widths = (3, 4) if config.target_bits is not None else (config.bits,)
    quantize = KMEANS_SECONDS_PER_MWEIGHT * quantizable / 1e6 * iterations * sum(widths) / 4.0 / speed
    return {"load and save": LOAD_SAVE_SECONDS * parameters / 135e6, "sensitivity": fisher, "quantize": quantize}
