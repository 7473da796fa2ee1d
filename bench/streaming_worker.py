"""One measured quantization run, in its own process: ``python -m bench.streaming --worker MODE MODEL OUT``.

MODE ``stream``: the engine's public job (core.pipeline.run_quantize_job), whatever path it takes.
MODE ``whole``: today's whole-model path written out with core's public functions: load the whole
model in float32, Fisher over every window, quantize every matrix, save.
A sampler thread reads /proc/self/status every 0.2 s and keeps the peaks of RssAnon (memory the
process allocated) and VmRSS (plus file pages it has mapped, such as memory-mapped weights); VmHWM
(the kernel's own peak of VmRSS) is read at the end. Prints one JSON line: peaks in MiB, seconds per
stage, seconds per calibration window and the window count (and the perplexity with --eval-windows).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

# report.seconds keys that are the calibration pass (forward/backward over the windows); every other
# key is a stage whose cost should grow linearly with the parameters.
CALIBRATION_STAGES = ("forward", "fisher", "backward")
# keys that are sums of other keys or wall totals, not stages of their own
NOT_STAGES = ("total",)

# the embedding and head in float16, as the whole-model path and every earlier row (the default is 6-bit codes)
HALF = {"embed_bits": 16, "head_bits": 16}


def calibration_seconds(seconds: dict[str, float]) -> float:
    """Seconds of the calibration pass in a report.seconds dict (adjust CALIBRATION_STAGES as the engine's keys change)."""
    return sum(v for k, v in seconds.items() if k in CALIBRATION_STAGES)


def read_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


class MemorySampler:
    """Peaks of RssAnon and VmRSS sampled every ``interval`` seconds on a daemon thread."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        status = read_status()
        for key in self.peaks:
            self.peaks[key] = max(self.peaks[key], status.get(key, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def result(self) -> dict[str, float]:
        """Peaks in MiB, with VmHWM read now."""
        mib = 2 ** 20
        return {"peak_rss_anon_mib": self.peaks["RssAnon"] / mib, "peak_vm_rss_mib": self.peaks["VmRSS"] / mib,
                "vm_hwm_mib": read_status().get("VmHWM", 0) / mib}


def _progress(event) -> None:
    if event.total and (event.done == event.total or event.done % max(1, event.total // 10) == 0):
        print(f"  [{event.stage}] {event.message}", file=sys.stderr, flush=True)


def run_stream(model: str, out: Path, samples: int, seqlen: int, bits: int) -> dict[str, float]:
    """The engine's public job; seconds per stage as its report gives them, plus the wall total."""
    from core.config import CalibrationConfig, QuantConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    t0 = time.perf_counter()
    job = QuantizeJob(model=model, output=out, config=QuantConfig(bits=bits, **HALF),
                      calibration=CalibrationConfig(samples=samples, seqlen=seqlen), device="cpu", overwrite=True)
    report = run_to_end(run_quantize_job(job), _progress)
    return {**{k: float(v) for k, v in report.seconds.items()}, "total": time.perf_counter() - t0}


def run_whole(model: str, out: Path, samples: int, seqlen: int, bits: int) -> dict[str, float]:
    """Today's whole-model path, stage by stage: load (float32), fisher, quantize, save."""
    from core.checkpoint import save_quantized
    from core.config import CalibrationConfig, QuantConfig, to_dict
    from core.data import calibration_windows, corpus_tokens
    from core.models import load_model, quantizable_linears
    from core.progress import run_to_end
    from core.quantize import quantize_model
    from core.sensitivity import compute_fisher

    seconds: dict[str, float] = {}
    start = t0 = time.perf_counter()
    loaded = load_model(model)
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    windows = calibration_windows(corpus_tokens(loaded.tokenizer, "builtin"), samples, seqlen, 0)
    linears = quantizable_linears(loaded.model)
    fisher = run_to_end(compute_fisher(loaded.model, windows, linears), _progress)
    seconds["fisher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = QuantConfig(bits=bits, **HALF)
    report = run_to_end(quantize_model(loaded.model, config, fisher), _progress)
    seconds.update({k: float(v) for k, v in report.seconds.items()})  # outliers, split, kmeans, packing
    seconds["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    settings = {"config": to_dict(config), "range_multiplier": report.range_multiplier,
                "calibration": to_dict(CalibrationConfig(samples=samples, seqlen=seqlen)), "source_model": model,
                "bits_per_weight": report.bits_per_weight, "sparse_percent": report.sparse_percent}
    run_to_end(save_quantized(loaded.model, loaded.tokenizer, out, settings, overwrite=True))
    seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    return seconds


def evaluate_folder(out: Path, windows: int) -> float:
    """Perplexity of the saved quantized folder on ``windows`` evaluation windows of 512 tokens."""
    from core.checkpoint import load_quantized
    from core.config import EvalConfig
    from core.evaluate import evaluate_model
    from core.progress import run_to_end

    return run_to_end(evaluate_model(load_quantized(out), EvalConfig(windows=windows))).perplexity


def worker(mode: str, model: str, out: Path, samples: int, seqlen: int, bits: int = 3, eval_windows: int = 0) -> dict:
    """Run one mode under the memory sampler; the result the parent reads (peaks before any evaluation)."""
    run = {"stream": run_stream, "whole": run_whole}[mode]
    with MemorySampler() as sampler:
        seconds = run(model, Path(out), samples, seqlen, bits)
    result = {"mode": mode, "model": model, "samples": samples, "seqlen": seqlen, "bits": bits, **sampler.result(),
              "seconds": seconds, "seconds_per_window": calibration_seconds(seconds) / samples}
    if eval_windows:
        result["perplexity"] = evaluate_folder(Path(out), eval_windows)
        result["eval_windows"] = eval_windows
    return result


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.streaming --worker")
    parser.add_argument("mode", choices=("stream", "whole"))
    parser.add_argument("model", help="a model folder or 'demo'")
    parser.add_argument("out", type=Path, help="where the quantized folder goes")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3, choices=(3, 4))
    parser.add_argument("--eval-windows", type=int, default=0, help="perplexity of the result on this many windows")
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.mode, args.model, args.out, args.samples, args.seqlen, args.bits,
                            args.eval_windows)),
          flush=True)
