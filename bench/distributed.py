"""Calibration across processes: wall time of 1 against N ranks on the demo model, and what they exchange.

python -m bench.distributed [--model demo] [--workers 1 2] [--samples 8] [--seqlen 512] [--rounds 1]

Runs ``squeeze quantize MODEL --bits 3`` once per worker count and round (alternating, so a drift in the
machine's load hits every count alike), with the Fisher cache off so every run does the calibration
passes. Records the wall time, the per-stage seconds the command prints, the machine's load average
before each run, the traffic line rank 0 prints (all_reduce payload per rank, bytes gathered to rank 0)
and the perplexity of every folder on the same evaluation windows. Writes bench/results/distributed.json
and the "distributed" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "distributed.json"
UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def _bytes(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def parse_traffic(stderr: str) -> dict | None:
    """The numbers of rank 0's line '2 ranks exchanged X (Y per block): kind A, kind B, ...'."""
    match = re.search(r"(\d+) ranks exchanged ([\d.]+ [KMGT]?B)(?: \(([\d.]+ [KMGT]?B) per block\))?: (.*)", stderr)
    if match is None:
        return None
    kinds = {}
    for part in match.group(4).split(", "):  # "Fisher sums 40.0 MB"
        head, _, unit = part.rpartition(" ")
        kind, _, number = head.rpartition(" ")
        kinds[kind] = _bytes(f"{number} {unit}")
    return {"ranks": int(match.group(1)), "total": _bytes(match.group(2)),
            "per_block": _bytes(match.group(3)) if match.group(3) else None, "by_kind": kinds}


def run_once(workers: int, args, out: Path) -> dict:
    env = {**os.environ, "SQUEEZE_FISHER_CACHE_GB": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "core.cli", "-q", "quantize", args.model, "--bits", str(args.bits), "--samples",
           str(args.samples), "--seqlen", str(args.seqlen), "--output", str(out), "--workers", str(workers)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    steps = re.search(r"\((load .*)\)\s*$", done.stdout.strip())
    seconds = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", steps.group(1))} if steps else {}
    return {"workers": workers, "wall_s": round(wall, 1), "load_before": round(load, 2), "stages_rank0_s": seconds,
            "traffic": parse_traffic(done.stderr)}


def perplexity_of(folder: Path, windows) -> float:
    from core.checkpoint import load_quantized
    from core.evaluate import perplexity
    from core.progress import run_to_end

    return run_to_end(perplexity(load_quantized(folder).model, windows)).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a model folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    from core.data import corpus_tokens, evaluation_windows
    from core.lazy_model import LazyModel, resolve_folder
    from core.pipeline import load_tokenizer
    from core.progress import run_to_end

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        folder = run_to_end(resolve_folder(args.model))
        n_blocks = len(LazyModel.open(folder).blocks)
        windows = evaluation_windows(corpus_tokens(load_tokenizer(folder), "builtin"), args.eval_windows,
                                     min(512, args.seqlen))
        for r in range(args.rounds):
            for workers in args.workers:
                out = Path(tmp) / f"w{workers}-r{r}"
                run = run_once(workers, args, out)
                run["perplexity"] = round(perplexity_of(out, windows), 4)
                print(json.dumps(run), flush=True)
                runs.append(run)
    best = {w: min(r["wall_s"] for r in runs if r["workers"] == w) for w in args.workers}
    result = {"model": f"{args.model} ({n_blocks} blocks)", "n_blocks": n_blocks, "bits": args.bits, "samples": args.samples,
              "seqlen": args.seqlen, "cores": os.cpu_count(), "runs": runs, "best_wall_s": best}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    write_section(result)


def write_section(result: dict) -> None:
    from bench.report import machine_line, update_section
    from core.units import format_bytes

    base = result["best_wall_s"][min(result["best_wall_s"])]
    lines = ["## Calibration across processes (`--workers`, torchrun)", "", machine_line(), "",
             f"`squeeze quantize MODEL --bits {result['bits']} --samples {result['samples']} --seqlen "
             f"{result['seqlen']} --workers N` on {result['model']}, the Fisher cache off, gloo on {result['cores']} "
             "CPU cores; wall time of the whole command, stage seconds as rank 0 reports them "
             "(`python -m bench.distributed`; bench/results/distributed.json).", "",
             "| ranks | wall s | vs 1 rank | load before | forward s | backward s | quantize s | perplexity |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        s = run["stages_rank0_s"]
        lines.append(f"| {run['workers']} | {run['wall_s']:.1f} | {run['wall_s'] / base:.2f}x | {run['load_before']} | "
                     f"{s.get('forward', 0):.1f} | {s.get('backward', 0):.1f} | {s.get('quantize', 0):.1f} | "
                     f"{run['perplexity']:.4f} |")
    traffic = next((r["traffic"] for r in result["runs"] if r["traffic"]), None)
    if traffic:
        lines += ["", f"Exchanged by {traffic['ranks']} ranks over the {result['n_blocks']} blocks: {format_bytes(traffic['total'])} "
                  f"({format_bytes(traffic['per_block'])} per block): "
                  + ", ".join(f"{k} {format_bytes(v)}" for k, v in traffic["by_kind"].items())
                  + ". All_reduce counts the payload each rank contributes (a block's float32 Fisher, 4 bytes per "
                    "weight); gathers count what rank 0 received from the others (packed codes, tables and sparse "
                    "parts of their matrices; the gradients their windows hand down, for the resume file)."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    update_section("distributed", "\n".join(lines))


if __name__ == "__main__":
    main()
