"""Per-layer mixed precision on the demo model: perplexity and size at budgets between 3 and 4 bits.

python -m bench.mixed_precision [--targets 3 3.5 4] [--samples 16] [--no-control]

Dense-only setting (no outliers, no sensitive values), Fisher from the cache (16 windows by
default). Every matrix is clustered once at 3 and once at 4 bits (core.mixed_precision); each
target then places its allocation in the model and is evaluated on the default 40 x 512-token
windows. Target 3 and target 4 are the all-3-bit and all-4-bit models (bit-exact with --bits 3/4,
tests/core/test_mixed_precision.py). The control row spends the same budget the other way round
(4 bits to the smallest error drops first), to show what the Fisher-guided choice is worth.
Writes the "mixed" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.report import machine_line, update_section
from core.config import CalibrationConfig, EvalConfig, OutlierConfig, QuantConfig
from core.progress import run_to_end

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_precision.json"
DENSE_ONLY = dict(outliers=OutlierConfig(percent=None), sensitivity_percent=0.0)


def reversed_allocation(candidates, target: float) -> dict[str, int]:
    """The same budget given to the smallest gains per extra bit first (a control, not a method)."""
    from core.mixed_precision import allocate_bits

    matrices = candidates.matrices
    flipped = {n: {3: c.errors[4], 4: c.errors[3]} for n, c in matrices.items()}  # gain -> -gain
    return allocate_bits({n: c.numel for n, c in matrices.items()}, flipped, target)


def measure(loaded, candidates, allocation: dict[str, int], config: QuantConfig, windows, label: str) -> dict:
    from core.evaluate import perplexity
    from core.mixed_precision import place
    from core.quantize import _report

    layers = run_to_end(place(loaded.model, candidates, allocation))
    report = _report(loaded.model, config, None, layers, {})
    t0 = time.perf_counter()
    ppl = run_to_end(perplexity(loaded.model, windows, batch_size=4)).perplexity
    row = {"name": label, "dense_bits": report.dense_bits, "bits_per_weight": report.bits_per_weight,
           "quantized_bytes": report.quantized_bytes, "matrices_per_bits": report.matrices_per_bits,
           "weighted_error": sum(layer.weighted_error for layer in layers), "perplexity": ppl,
           "eval_seconds": time.perf_counter() - t0}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| setting | matrices at 3 / 4 bits | bits per dense weight | bits per weight (as stored) "
             "| quantized layers MB | Fisher-weighted error (sum) | perplexity |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        split = r["matrices_per_bits"]
        lines.append(f"| {r['name']} | {split.get('3', split.get(3, 0))} / {split.get('4', split.get(4, 0))} "
                     f"| {r['dense_bits']:.3f} | {r['bits_per_weight']:.3f} | {r['quantized_bytes'] / 1e6:.1f} "
                     f"| {r['weighted_error']:.4g} | {r['perplexity']:.2f} |")
    return "\n".join(lines)


def label_for(target: float) -> str:
    if target == 3:
        return "all 3-bit (target 3.0)"
    if target == 4:
        return "all 4-bit (target 4.0)"
    return f"mixed, target {target:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of the Fisher (default 16)")
    parser.add_argument("--no-control", action="store_true", help="leave out the reversed-allocation control")
    args = parser.parse_args()
    from core.data import corpus_tokens, evaluation_windows
    from core.mixed_precision import quantize_candidates
    from core.models import load_model
    from core.sensitivity import load_or_compute_fisher

    eval_cfg, fisher_cfg = EvalConfig(), CalibrationConfig(samples=args.samples)
    loaded = load_model("demo")
    windows = evaluation_windows(corpus_tokens(loaded.tokenizer, eval_cfg.source), eval_cfg.windows, eval_cfg.seqlen)
    fisher = run_to_end(load_or_compute_fisher(loaded.model, loaded.tokenizer, fisher_cfg))
    base = QuantConfig(**DENSE_ONLY)
    t0 = time.perf_counter()
    candidates = run_to_end(quantize_candidates(loaded.model, base, fisher))
    kmeans_seconds = time.perf_counter() - t0
    rows = []
    for target in args.targets:
        config = QuantConfig(target_bits=target, **DENSE_ONLY)
        rows.append(measure(loaded, candidates, candidates.allocate(target), config, windows, label_for(target)))
    middle = [t for t in args.targets if 3 < t < 4]
    if middle and not args.no_control:
        target = middle[0]
        config = QuantConfig(target_bits=target, **DENSE_ONLY)
        rows.append(measure(loaded, candidates, reversed_allocation(candidates, target), config, windows,
                            f"control: target {target:g}, 4 bits to the smallest gains"))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"kmeans_seconds": kmeans_seconds, "rows": rows}, indent=1))
    text = (f"## Mixed precision: 3 or 4 bits per matrix under a budget\n\n{machine_line()}\n\n"
            f"Demo model, dense-only (no outliers, no sensitive values), Fisher from {fisher_cfg.samples} x "
            f"{fisher_cfg.seqlen}-token windows; perplexity on the first {eval_cfg.windows} x {eval_cfg.seqlen} "
            "tokens of the built-in corpus (the accuracy section's windows). `--target-bits B` clusters every "
            "matrix at 3 and at 4 bits and gives 4 bits to the matrices whose Fisher-weighted error drops most "
            "per extra bit while the average code bits per weight stays at or below B; 'bits per weight (as "
            "stored)' also counts the fp16 lookup tables. Both k-means passes over the 210 matrices took "
            f"{kmeans_seconds:.0f} s here (wall clock, 2 threads).\n\n" + table(rows))
    update_section("mixed", text)
    print(table(rows))


if __name__ == "__main__":
    main()
