"""What refinement adds to the calibration pass: the demo model's block-major pass with and without H.

python -m bench.refine_calibration [--samples 8] [--rounds 2]

Runs the streaming engine (``squeeze quantize demo``, 4-bit dense-and-sparse) with the Fisher cache off, once
with refinement off and once with ``--refine lnq`` (which accumulates H = Σ s_t x_t x_tᵀ for every
projection during the backward sweep), alternating, and reports the forward/backward seconds of each and
their ratio. Writes bench/results/refine_calibration.json (the README's "Refinement" paragraph quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "refine_calibration.json"


def one_run(refine: bool, samples: int) -> dict[str, float]:
    from core.config import CalibrationConfig, QuantConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    os.environ["SQUEEZE_FISHER_CACHE_GB"] = "0"  # the passes run: no Fisher or H is read from the cache
    with tempfile.TemporaryDirectory(prefix="refine-calibration-") as tmp:
        report = run_to_end(run_quantize_job(QuantizeJob(
            model="demo", output=Path(tmp) / "q", config=QuantConfig(bits=4, refine=refine),
            calibration=CalibrationConfig(samples=samples), device="cpu")))
    return {k: v for k, v in report.seconds.items() if k in ("forward", "backward", "refine", "quantize")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--rounds", type=int, default=2, help="alternating off/on pairs")
    args = parser.parse_args()
    runs = []
    for _ in range(args.rounds):
        for refine in (False, True):
            seconds = one_run(refine, args.samples)
            runs.append({**seconds, "with_refinement": refine})
            print(json.dumps(runs[-1]), flush=True)

    def calibration(refine: bool) -> float:
        return min(r["forward"] + r["backward"] for r in runs if r["with_refinement"] == refine)

    result = {"samples": args.samples, "runs": runs, "calibration_ratio": calibration(True) / calibration(False),
              "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"calibration pass with H / without: {result['calibration_ratio']:.2f}x")


if __name__ == "__main__":
    main()
