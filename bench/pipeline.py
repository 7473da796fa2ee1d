"""Step times and sizes of quantizing the demo model end to end.

python -m bench.pipeline [--samples 100] [--seqlen 512]

Times each step (load, Fisher, outlier statistics, split, k-means, packing, save) for the
paper's default setting, then quantizes 3/4-bit dense-only and dense-and-sparse with the
same (cached) Fisher to report sizes and bits per weight. Writes the "pipeline" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, update_section
from core.cli import folder_bytes
from core.units import format_bytes
from core.config import CalibrationConfig, OutlierConfig, QuantConfig
from core.progress import run_to_end

SETTINGS = {
    "4-bit dense-only": QuantConfig(bits=4, outliers=OutlierConfig(percent=None), sensitivity_percent=0.0),
    "4-bit dense-and-sparse (0.45% + 0.05%)": QuantConfig(bits=4),
    "3-bit dense-only": QuantConfig(bits=3, outliers=OutlierConfig(percent=None), sensitivity_percent=0.0),
    "3-bit dense-and-sparse (0.45% + 0.05%)": QuantConfig(bits=3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    calibration = CalibrationConfig(samples=args.samples, seqlen=args.seqlen)

    from core.checkpoint import save_quantized
    from core.data import calibration_windows, corpus_tokens
    from core.models import load_model, quantizable_linears
    from core.quantize import quantize_model
    from core.sensitivity import compute_fisher, fisher_cache_path, model_fingerprint, save_fisher, source_identity

    steps: dict[str, float] = {}
    rows = []
    fisher = None
    for i, (label, config) in enumerate(SETTINGS.items()):
        t0 = time.perf_counter()
        loaded = load_model("demo")
        load_s = time.perf_counter() - t0
        if fisher is None:
            steps["load model"] = load_s
            tokens = corpus_tokens(loaded.tokenizer, calibration.source)
            windows = calibration_windows(tokens, calibration.samples, calibration.seqlen, calibration.seed)
            t0 = time.perf_counter()
            linears = quantizable_linears(loaded.model)
            fisher = run_to_end(compute_fisher(loaded.model, windows, linears),
                                lambda e: print(e.message, end="\r", flush=True))
            steps[f"Fisher ({args.samples} x {args.seqlen} tokens)"] = time.perf_counter() - t0
            save_fisher(fisher_cache_path(model_fingerprint(loaded.model, linears), calibration,
                                          source_identity(calibration.source)), fisher, {})
        report = run_to_end(quantize_model(loaded.model, config, fisher))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = run_to_end(save_quantized(loaded.model, loaded.tokenizer, Path(tmp) / "q", {}))
            save_s = time.perf_counter() - t0
            size = folder_bytes(out)
        if label == "4-bit dense-and-sparse (0.45% + 0.05%)":
            for key, name in (("outliers", "outlier statistics + threshold solve"), ("split", "dense/sparse split"),
                              ("kmeans", "weighted k-means (210 matrices; CPU-seconds summed over the worker threads)"), ("packing", "packing")):
                steps[name] = report.seconds.get(key, 0.0)
            steps["save folder"] = save_s
        rows.append((label, report.bits_per_weight, report.sparse_percent, report.quantized_bytes, size,
                     sum(report.seconds.values())))
        print(f"{label}: {report.bits_per_weight:.3f} bpw, {report.sparse_percent:.3f}% sparse")

    total = sum(steps.values())
    not_fisher = sum(v for k, v in steps.items() if not k.startswith("Fisher"))
    load = os.getloadavg()[0]
    lines = [machine_line() + f" (load average {load:.1f} at the end of the run)", "", "Demo model (SmolLM2-135M-Instruct, 210 matrices), default setting (4-bit, "
             "0.45% outliers + 0.05% sensitive), CPU:", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in steps.items()]
    lines += [f"| **total** | **{total:.1f}** |", f"| all steps but the Fisher pass | {not_fisher:.1f} |", "",
              "Sizes (bits per weight count every stored bit of the quantized layers: packed codes, fp16 LUT per "
              "row, 64 bits per sparse entry (fp32 value + int32 column) and the CSR row pointers; the folder "
              "also holds the embeddings (fp16 for a float32 model) and the norms):", "",
              "| setting | bits per weight | sparse % | quantized layers | folder on disk | quantize s |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {format_bytes(r[3])} | {format_bytes(r[4])} | {r[5]:.1f} |"
              for r in rows]
    update_section("pipeline", "## Quantization pipeline: step times and sizes\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
