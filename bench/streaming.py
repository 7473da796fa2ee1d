"""Quantizing 1.1 B, 3 B and 8 B-parameter models on a 24 GB machine: peak memory and time per stage.

python -m bench.streaming [--sizes 1.1b 3b 8b] [--modes whole stream] [--samples 4] [--seqlen 512] [--no-demo]
                          [--probe] [--quick] [--workdir DIR] [--output FILE]
python -m bench.streaming --sizes --no-demo --probe      (only the one-process per-block stage probe)
python -m bench.streaming --worker {stream,whole} MODEL OUT [--samples N] [--seqlen L] [--bits B] [--eval-windows N]

Random-weight bf16 LLaMA folders with the shapes of TinyLlama-1.1B, Llama-3.2-3B and Llama-3.1-8B
(bench.big_models, the demo tokenizer; built once in the workdir, 22 GB) are each quantized 3-bit
dense-and-sparse on ``--samples`` windows of ``--seqlen`` tokens, every run in its own process with
an empty Fisher cache (bench.streaming_worker): ``stream`` is the engine's public job
(core.pipeline.run_quantize_job), ``whole`` today's whole-model path (float32 model, Fisher over it,
quantize, save), run only where its ~12 bytes per parameter fit. Peaks: RssAnon sampled every 0.2 s
and VmHWM. The demo model's default run (4-bit, 100 windows) is quantized both ways and the
perplexities compared (``--no-demo`` skips it). A run is stopped if its RssAnon comes within 3 GiB of
what the machine has available (the row says so). Results are kept in bench/results/streaming.json
so a run of some sizes keeps the others' rows; writes the "streaming" section of BENCHMARKS.md.
``--quick``: a tiny random LLaMA and a 2-window demo run, a smoke test (nothing kept).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.big_models import LABELS, default_workdir, folder_parameters, random_folder
from bench.report import current_commit
from bench.streaming_report import RESULTS, ROOT, SHAPES, WHOLE_BYTES_PER_PARAMETER, load_results, markdown

GUARD_BYTES = 3 * 2**30  # a worker is stopped when its RssAnon gets this close to MemAvailable
SHARED_CACHE = ("kernels", "corpus", "tokens", "models")  # everything but the Fisher cache is shared


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def whole_fits(parameters: int) -> bool:
    return WHOLE_BYTES_PER_PARAMETER * parameters < 0.75 * meminfo("MemTotal")


def _child_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_worker(mode: str, model: str, workdir: Path, *, samples: int, seqlen: int, bits: int = 3,
               eval_windows: int = 0, cap: int | None = None) -> dict:
    """One worker process with its own empty Fisher cache; its JSON, or {"stopped": why} if it passed ``cap``."""
    from core.paths import cache_dir

    shared = cache_dir()
    tmp = Path(tempfile.mkdtemp(prefix="streaming-run-", dir=workdir))
    try:
        cache = tmp / "cache"
        cache.mkdir()
        for name in SHARED_CACHE:  # the kernels are not rebuilt, the corpus not re-tokenized
            (shared / name).mkdir(exist_ok=True)
            (cache / name).symlink_to(shared / name)
        cap = cap if cap is not None else meminfo("MemAvailable") - GUARD_BYTES
        command = [sys.executable, "-m", "bench.streaming", "--worker", mode, model, str(tmp / "out"),
                   "--samples", str(samples), "--seqlen", str(seqlen), "--bits", str(bits),
                   "--eval-windows", str(eval_windows)]
        print(f"--- {mode} {model} ({samples} x {seqlen}, {bits}-bit; stopped above {cap / 2**30:.1f} GiB RssAnon)",
              flush=True)
        before = os.getloadavg()[0]
        with open(tmp / "stdout", "w+") as stdout:
            proc = subprocess.Popen(command, stdout=stdout, cwd=ROOT, env={**os.environ, "SQUEEZE_CACHE_DIR": str(cache)})
            stopped = None
            while proc.poll() is None:
                if stopped is None and _child_anon(proc.pid) > cap:
                    stopped = f"stopped: RssAnon passed {cap / 2**30:.1f} GiB"
                    proc.kill()
                time.sleep(0.2)
            stdout.seek(0)
            lines = stdout.read().strip().splitlines()
        load = f"{before:.1f} / {os.getloadavg()[0]:.1f}"
        if stopped:
            return {"mode": mode, "model": model, "stopped": stopped, "load": load}
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"worker {mode} {model} failed (exit {proc.returncode})")
        return {**json.loads(lines[-1]), "load": load}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def block_parameters(folder: Path) -> int:
    """Parameters of one decoder block (block 0) from the folder's index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    total = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), "pt") as f:
            total += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.layers.0."))
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def measure_sizes(sizes: list[str], modes: list[str], workdir: Path, args, results: dict, stamp: dict) -> None:
    for size in sizes:
        folder = random_folder(size, workdir, log=lambda m: print(m, flush=True))
        parameters, block = folder_parameters(folder), block_parameters(folder)
        for mode in modes:
            if mode == "whole" and not whole_fits(parameters):
                print(f"--- whole {size}: skipped ({WHOLE_BYTES_PER_PARAMETER} bytes per parameter do not fit)")
                continue
            row = run_worker(mode, str(folder), workdir, samples=args.samples, seqlen=args.seqlen)
            row.update(stamp, size=size, label=LABELS[size], parameters=parameters, block_parameters=block)
            if "stopped" not in row:
                row["bytes_per_parameter"] = row["peak_rss_anon_mib"] * 2**20 / parameters
            print(json.dumps(row), flush=True)
            results[f"{size}/{mode}"] = row
            if not args.quick:
                _save(results)


def measure_demo(workdir: Path, args, results: dict, stamp: dict) -> None:
    for mode in ("whole", "stream"):
        row = run_worker(mode, "demo", workdir, samples=args.demo_samples, seqlen=args.demo_seqlen, bits=4,
                         eval_windows=args.eval_windows)
        row.update(stamp)
        print(json.dumps(row), flush=True)
        results[f"demo/{mode}"] = row
        if not args.quick:
            _save(results)


def measure_probe(workdir: Path, results: dict, stamp: dict) -> None:
    from bench.streaming_probe import ROUNDS, probe

    folders = {LABELS[size]: random_folder(size, workdir, log=lambda m: print(m, flush=True)) for size in ("1.1b", "8b")}
    before = os.getloadavg()[0]
    widths = probe(folders, log=lambda m: print(m, flush=True))
    results["probe"] = {"widths": widths, "rounds": ROUNDS, **stamp,
                        "load": f"{before:.1f} / {os.getloadavg()[0]:.1f}"}
    _save(results)


def main(argv: list[str] | None = None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        from bench.streaming_worker import main as worker_main

        worker_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", choices=SHAPES, default=list(SHAPES),
                        help="none: only the demo comparison")
    parser.add_argument("--modes", nargs="+", choices=("whole", "stream"), default=["whole", "stream"],
                        help="whole runs only where it fits")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--no-demo", action="store_true", help="skip the demo perplexity comparison")
    parser.add_argument("--demo-samples", type=int, default=100, help="the default run's calibration windows")
    parser.add_argument("--demo-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--probe", action="store_true", help="per-block stage costs at the 1.1b and 8b widths, "
                        "in one process (bench.streaming_probe)")
    parser.add_argument("--quick", action="store_true", help="a tiny random LLaMA and a 2-window demo run")
    parser.add_argument("--output", type=Path, default=None, help="the markdown file (default BENCHMARKS.md)")
    parser.add_argument("--workdir", type=Path, default=None, help="model folders (default $SQUEEZE_BENCH_DIR "
                        "or ~/.cache/squeeze-studio/bench)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.seqlen, args.demo_samples, args.demo_seqlen, args.eval_windows = 2, 128, 2, 128, 4
    workdir = args.workdir or default_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = {"run": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": current_commit()}
    results = {} if args.quick else load_results()
    measure_sizes(["tiny"] if args.quick else args.sizes, args.modes, workdir, args, results, stamp)
    if not args.no_demo:
        measure_demo(workdir, args, results, stamp)
    if args.probe:
        measure_probe(workdir, results, stamp)
    from bench.report import machine_line, update_section

    text = markdown(results, machine=machine_line(), latest=stamp["run"], mem_total=meminfo("MemTotal"),
                    quick=args.quick)
    update_section("streaming", text, **({"path": args.output} if args.output else {}))
    print(text)


if __name__ == "__main__":
    main()
