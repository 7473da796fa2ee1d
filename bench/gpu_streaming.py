"""The streaming engine on a GPU: an 8 B-parameter model quantized one block at a time on the device.

python -m bench.gpu_streaming [--samples 8] [--seqlen 512] [--bits 3] [--workdir DIR] [--tokenizer DIR]
                              [--jobs 8] [--json FILE]
python -m bench.gpu_streaming --from-json FILE      (writes the section from a run's saved numbers)
python -m bench.gpu_streaming --build-only [--workdir DIR] [--tokenizer DIR]   (only the 8B folder)

The random bf16 folder with Llama-3.1-8B's shapes (bench.big_models "8b", built once in the workdir;
``--tokenizer`` gives the tokenizer whose vocabulary and files it gets, where the demo model is not
installed) is quantized 3-bit dense-and-sparse by the engine's public job (core.pipeline) with
``device="cuda"``: each block goes to the GPU in the model's dtype for the calibration passes and the
k-means, and only the packed result comes back. Embedding and head stay float16, as in bench.streaming's
CPU rows. Measured: seconds per stage and per calibration window, the GPU memory torch allocated and
reserved at its peak (the issue's target: under 8 GB), and the process's RssAnon. Needs an NVIDIA GPU;
without one it says so and exits with status 2. Writes the "gpu-streaming" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import current_commit, machine_line, update_section

GPU_MEMORY_TARGET_GB = 8.0


def _progress(event) -> None:
    if event.total and (event.done == event.total or event.done % max(1, event.total // 8) == 0):
        print(f"  [{event.stage}] {event.message}", flush=True)


def build_folder(workdir: Path, tokenizer_dir: Path | None, jobs: int) -> Path:
    from bench.big_models import random_folder

    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    folder = random_folder("8b", workdir, log=lambda m: print(m, flush=True), tokenizer=tokenizer, jobs=jobs)
    print(f"8B folder ready in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return folder


def quantize_on_gpu(folder: Path, out: Path, samples: int, seqlen: int, bits: int) -> dict:
    """One run of the public job on the GPU; its seconds and memory peaks."""
    from bench.streaming_worker import HALF, MemorySampler, calibration_seconds
    from core.config import CalibrationConfig, QuantConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    torch.cuda.reset_peak_memory_stats()
    job = QuantizeJob(model=str(folder), output=out, config=QuantConfig(bits=bits, **HALF),
                      calibration=CalibrationConfig(samples=samples, seqlen=seqlen), device="cuda", overwrite=True)
    t0 = time.perf_counter()
    with MemorySampler() as sampler:
        report = run_to_end(run_quantize_job(job), _progress)
    seconds = {k: float(v) for k, v in report.seconds.items()}
    return dict(samples=samples, seqlen=seqlen, bits=bits, seconds=seconds, total_s=time.perf_counter() - t0,
                seconds_per_window=calibration_seconds(seconds) / samples,
                gpu_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                gpu_reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                bits_per_weight=float(report.bits_per_weight), **sampler.result())


def markdown(run: dict) -> str:
    r = run["result"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
    met = "met" if r["gpu_reserved_gb"] < GPU_MEMORY_TARGET_GB else "NOT met"
    return "\n".join([
        "## The streaming engine on a GPU (8 B-shaped model)", "", run["machine"], "",
        f"GPU: {run['gpu']}, CUDA {run['cuda']}, torch {run['torch']}; commit {run['commit']}. "
        "`python -m bench.gpu_streaming`: the random bf16 folder with Llama-3.1-8B's shapes "
        f"({run['parameters'] / 1e9:.2f} B parameters, the demo tokenizer's vocabulary) quantized "
        f"{r['bits']}-bit dense-and-sparse by the public job with device cuda, {r['samples']} x {r['seqlen']} "
        "calibration windows, embedding and head float16 (as bench.streaming's CPU rows).", "",
        "| what | value |", "|---|---:|",
        f"| seconds per calibration window (forward + backward over the 32 blocks) | {r['seconds_per_window']:.2f} |",
        f"| whole run, wall seconds | {r['total_s']:.0f} |",
        f"| peak GPU memory reserved by torch (target < {GPU_MEMORY_TARGET_GB:.0f} GB) | "
        f"{r['gpu_reserved_gb']:.2f} GB: {met} |",
        f"| peak GPU memory allocated | {r['gpu_allocated_gb']:.2f} GB |",
        f"| peak RssAnon of the process | {r['peak_rss_anon_mib'] / 1024:.2f} GiB |",
        f"| bits per weight of the result | {r['bits_per_weight']:.3f} |", "",
        f"Seconds per stage (the engine's report): {seconds}.",
    ] + (["", run["note"]] if run.get("note") else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3, choices=(3, 4))
    parser.add_argument("--workdir", type=Path, default=None, help="where the 8B folder is built (default as bench.big_models)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for the random model")
    parser.add_argument("--jobs", type=int, default=5, help="shards of the folder written at once")
    parser.add_argument("--json", type=Path, default=None, help="also keep the numbers in this file")
    parser.add_argument("--from-json", type=Path, default=None, help="write the section from a kept file")
    parser.add_argument("--build-only", action="store_true", help="build the 8B folder and stop (needs no GPU)")
    args = parser.parse_args(argv)
    if args.build_only:
        from bench.big_models import default_workdir

        build_folder(args.workdir or default_workdir(), args.tokenizer, args.jobs)
        return 0
    if args.from_json is not None:
        run = json.loads(args.from_json.read_text())
    else:
        if not torch.cuda.is_available():
            print("bench.gpu_streaming needs an NVIDIA GPU (torch.cuda.is_available() is False): nothing was "
                  "measured and BENCHMARKS.md is unchanged.")
            return 2
        from bench.big_models import folder_parameters

        from bench.big_models import default_workdir

        folder = build_folder(args.workdir or default_workdir(), args.tokenizer, args.jobs)
        run = dict(machine=machine_line(), gpu=torch.cuda.get_device_properties(0).name, cuda=torch.version.cuda,
                   torch=torch.__version__, commit=current_commit(), parameters=folder_parameters(folder))
        with tempfile.TemporaryDirectory(prefix="gpu-streaming-") as tmp:
            run["result"] = quantize_on_gpu(folder, Path(tmp) / "out", args.samples, args.seqlen, args.bits)
        if args.json is not None:
            args.json.write_text(json.dumps(run, indent=1))
    text = markdown(run)
    update_section("gpu-streaming", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
