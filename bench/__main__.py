"""Run every benchmark and rewrite BENCHMARKS.md.

python -m bench [--only NAME ...] [--skip NAME ...] [--quick] [--list]

Each benchmark runs in its own process (its memory, threads and kernel choice stay its own) and
rewrites its section of BENCHMARKS.md; this runner then writes the head of the file: the machine,
the versions, the date, and which benchmarks ran, how long each took and whether it succeeded. A
benchmark that needs hardware this machine lacks (the CUDA kernels without an NVIDIA GPU) says why
and keeps its previous section. ``--quick`` shrinks every benchmark to a smoke run (minutes, not an
hour): its numbers are noisier and the sections say what they measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.report import BENCHMARKS, machine_line

# name -> (module, full arguments, --quick arguments, what it measures)
BENCHMARKS_TO_RUN = {
    "pipeline": ("bench.pipeline", [], ["--samples", "8"], "quantization step times and sizes"),
    "kmeans": ("bench.kmeans", ["--bits", "3", "4"], ["--bits", "3", "--limit-matrices", "14"],
               "k-means against scikit-learn"),
    "fisher": ("bench.fisher", [], ["--windows", "2", "--rounds", "1"], "Fisher pass against a full backward"),
    "cpu": ("bench.cpu_inference", [], ["--new-tokens", "16", "--rounds", "1", "--skip-reference"],
            "decode/prefill tokens/s and peak memory, fp32 vs bf16 vs 4/3-bit"),
    "eval": ("bench.eval_speed", [], ["--windows", "8"], "perplexity evaluation throughput, kernel vs torch path"),
    "bf16-prefill": ("bench.bf16_prefill", [], ["--rows", "16", "64", "--windows", "4", "--samples", "2"],
                     "bf16 prefill on the CPU: float32 kernel path against the bf16 GEMM"),
    "mixed": ("bench.mixed_precision", [], ["--targets", "3.5", "--no-control"], "per-layer mixed precision"),
    "scale": ("bench.memory_scale", [], ["--new-tokens", "4", "--rounds", "1"], "peak memory and decode at 1.1 B parameters"),
    "streaming": ("bench.streaming", [], ["--quick"], "peak memory and stage times quantizing 1.1 B / 3 B / 8 B models"),
    "distributed": ("bench.distributed", [], ["--samples", "4", "--seqlen", "256"],
                    "wall time of 1 against 2 ranks (--workers) on the demo model, bytes exchanged per block"),
    "accuracy": ("bench.accuracy", [], ["--skip-original", "--samples", "8"], "perplexity of every method"),
    "llamacpp": ("bench.llamacpp", [], ["--samples", "8", "--chunks", "8", "--only", "fp32", "Q4_K_M",
                                        "4-bit dense-and-sparse"],
                 "perplexity per byte and decode against llama.cpp's K-quants"),
    "cuda-kernels": ("bench.kernels", [], ["--skip-e2e"], "CUDA kernels against cuBLAS (NVIDIA GPU only)"),
    "gpu-streaming": ("bench.gpu_streaming", [], ["--samples", "2"],
                      "the streaming engine quantizing the 8 B-shaped model on a GPU (NVIDIA GPU only)"),
}


def run_one(name: str, quick: bool) -> tuple[str, float]:
    """Run one benchmark in a subprocess, streaming its output; (status, seconds)."""
    module, full, quick_args, _ = BENCHMARKS_TO_RUN[name]
    command = [sys.executable, "-m", module, *(quick_args if quick else full)]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(command)
    seconds = time.perf_counter() - t0
    if code == 0:
        return "ok", seconds
    if name in ("cuda-kernels", "gpu-streaming") and code == 2:
        return "skipped (no NVIDIA GPU or no CUDA kernels; previous section kept)", seconds
    return f"FAILED (exit {code}; previous section kept)", seconds


HEAD = """# Benchmarks

Every number here is written by a script in `bench/`; `python -m bench` runs them all. Its last run{quick}
wrote this head; a benchmark it left out keeps its row, marked as from an earlier run, and its
section keeps the date line of the run that wrote it.

{machine}

| benchmark | what it measures | status | minutes |
|---|---|---|---:|
{rows}
"""


EARLIER = " (an earlier run)"


def write_head(results: dict[str, tuple[str, float]], quick: bool, path: Path = BENCHMARKS) -> None:
    """Replace everything before the first section marker of BENCHMARKS.md with a fresh head.

    Benchmarks this run left out keep their row from the head they were last listed in, marked as
    from an earlier run, so the head always lists every section's last status."""
    text = path.read_text() if path.exists() else ""
    marker = text.find("<!-- ")
    earlier = _head_rows(text[:marker] if marker >= 0 else text)
    rows = []
    for name in BENCHMARKS_TO_RUN:
        if name in results:
            status, seconds = results[name]
            rows.append(f"| {name} | {BENCHMARKS_TO_RUN[name][3]} | {status} | {seconds / 60:.1f} |")
        elif name in earlier:
            status, minutes = earlier[name]
            rows.append(f"| {name} | {BENCHMARKS_TO_RUN[name][3]} | {status.removesuffix(EARLIER)}{EARLIER} | "
                        f"{minutes} |")
    head = HEAD.format(quick=" (`--quick`: smoke-run sizes)" if quick else "", machine=machine_line(),
                       rows="\n".join(rows))
    path.write_text(head + "\n" + (text[marker:] if marker >= 0 else ""))


def _head_rows(head: str) -> dict[str, tuple[str, str]]:
    """name -> (status, minutes) from the table of an existing head."""
    rows = {}
    for line in head.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in BENCHMARKS_TO_RUN:
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS_TO_RUN), help="run only these")
    parser.add_argument("--skip", nargs="+", choices=list(BENCHMARKS_TO_RUN), default=[], help="leave these out")
    parser.add_argument("--quick", action="store_true", help="smoke-run sizes (noisier numbers)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (module, _, _, what) in BENCHMARKS_TO_RUN.items():
            print(f"{name:14} python -m {module:24} {what}")
        return 0
    names = [n for n in (args.only or BENCHMARKS_TO_RUN) if n not in args.skip]
    results = {name: run_one(name, args.quick) for name in names}
    write_head(results, args.quick)
    print("\n" + "\n".join(f"{name}: {status} ({seconds / 60:.1f} min)" for name, (status, seconds) in results.items()))
    return 0 if all(status.startswith(("ok", "skipped")) for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
