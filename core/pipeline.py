"""The end-to-end quantization job shared by the command line and the studio.

load model -> sensitivity (cached) -> split + k-means + pack -> save folder atomically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import CalibrationConfig, QuantConfig, to_dict
from core.errors import UserError
from core.progress import ProgressEvent
from core.quantize import QuantReport


@dataclass(frozen=True)
class QuantizeJob:
    """Everything one quantization run needs."""

    model: str
    output: Path
    config: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    device: str = "auto"
    overwrite: bool = False


def resolve_device(device: str) -> torch.device:
    """'auto' -> the GPU when torch sees one, else the CPU; 'cuda' without a GPU is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def _check_text_source(source: str) -> None:
    """A missing calibration file is reported before the model is loaded, not minutes later."""
    from core.data import KEYWORDS, load_text

    if source not in KEYWORDS and not source.startswith("hf:") and not Path(source).expanduser().is_file():
        load_text(source)  # raises the UserError that names the problem


def run_quantize_job(job: QuantizeJob, loaded=None) -> Generator[ProgressEvent, None, QuantReport]:
    """Quantize ``job.model`` into ``job.output``; returns the report with per-stage seconds.

    loaded: an already loaded ``LoadedModel`` of job.model to reuse (it is modified in place).
    """
    from core.checkpoint import _check_output, save_quantized
    from core.models import load_model
    from core.quantize import quantize_model
    from core.sensitivity import load_or_compute_fisher

    device = resolve_device(job.device)
    output = Path(job.output).expanduser().resolve()
    _check_output(output, job.overwrite)  # fail before the long work, not after it
    _check_text_source(job.calibration.source)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if loaded is None:
        yield ProgressEvent("load", 0, 1, f"loading {job.model}")
        loaded = load_model(job.model)
    if getattr(loaded, "quantized", False):
        raise UserError(f"{job.model} is already quantized: start from the original model")
    loaded.model.to(device)
    seconds["load"] = time.perf_counter() - t0
    yield ProgressEvent("load", 1, 1, f"loaded {loaded.name}")
    fisher = None
    if job.config.method == "squeezellm":
        t0 = time.perf_counter()
        fisher = yield from load_or_compute_fisher(loaded.model, loaded.tokenizer, job.calibration)
        seconds["fisher"] = time.perf_counter() - t0
    report = yield from quantize_model(loaded.model, job.config, fisher, device=device)
    seconds.update(report.seconds)
    t0 = time.perf_counter()
    settings = {"config": to_dict(job.config), "range_multiplier": report.range_multiplier,
                "calibration": to_dict(job.calibration) if fisher is not None else None,
                "source_model": job.model, "bits_per_weight": report.bits_per_weight,
                "sparse_percent": report.sparse_percent}
    yield from save_quantized(loaded.model.cpu(), loaded.tokenizer, output, settings, overwrite=job.overwrite)
    seconds["save"] = time.perf_counter() - t0
    return dataclasses.replace(report, seconds=seconds)
