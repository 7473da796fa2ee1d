"""The import and export jobs: core.interop's generators, plus what the studio does around them. No Qt.

Each job yields ``ProgressEvent``s and returns its outcome; the JobRunner runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import EvalConfig
from core.models import LoadedModel
from core.progress import ProgressEvent

IMPORT_STAGES = {"read": 0.1, "convert": 0.6, "save": 0.15, "load": 0.15}
EXPORT_STAGES = {"squeezellm-pt": {"load": 0.2, "save": 0.8},  # the stages each format's export yields
                 "hf-dense": {"load": 0.1, "dequantize": 0.6, "save": 0.3},
                 "gguf": {"load": 0.05, "gguf": 0.95}}
MEASURE_SHARE = 0.6  # of a measured export's time: loading both models and two perplexity runs
COST_WINDOWS = 4  # a few windows: enough to see an fp16/bf16 rounding cost, quick on a CPU
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_TAGS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class ImportOutcome:
    """The imported folder, loaded back and described (core LoadedModel, studio ModelInfo)."""

    path: Path
    loaded: LoadedModel
    info: object


def import_job(checkpoint: str, base: str | None, output: str, overwrite: bool
               ) -> Generator[ProgressEvent, None, ImportOutcome]:
    """Convert the original's packed .pt into a quantized folder, then load that folder."""
    from core.interop.original_pt import import_original_checkpoint
    from studio.jobs import load_job

    path = yield from import_original_checkpoint(checkpoint, base or None, output, overwrite=overwrite)
    loaded, info = yield from load_job(str(path))
    return ImportOutcome(Path(path), loaded, info)


@dataclass(frozen=True)
class ExportRequest:
    """folder: the quantized folder; fmt: one of core.interop.export.EXPORT_FORMATS; dtype: a key of
    DTYPES; cost: the protocol for the perplexity cost of a dequantized export (None: not measured)."""

    folder: Path
    fmt: str
    output: Path
    dtype: str = "float16"
    overwrite: bool = False
    cost: EvalConfig | None = None


@dataclass(frozen=True)
class PerplexityCost:
    """Perplexity of the quantized folder and of its export, on the same windows."""

    quantized: float
    exported: float
    config: EvalConfig

    @property
    def change_percent(self) -> float:
        return 100.0 * (self.exported / self.quantized - 1.0)


@dataclass(frozen=True)
class ExportWritten:
    """Yielded (it is not a ProgressEvent) once the export is complete on disk, before any measuring."""

    path: Path


@dataclass(frozen=True)
class ExportOutcome:
    path: Path
    fmt: str
    size_bytes: int | None
    cost: PerplexityCost | None
    warnings: tuple[str, ...] = ()


def export_stages(fmt: str, measured: bool) -> dict[str, float]:
    """Stage weights of an export of ``fmt`` (for the overall bar), the measuring included when asked."""
    stages = {name: weight * (1 - MEASURE_SHARE if measured else 1) for name, weight in EXPORT_STAGES[fmt].items()}
    return {**stages, "measure": MEASURE_SHARE} if measured else stages


def cost_config(eval_config: EvalConfig, windows: int = COST_WINDOWS) -> EvalConfig:
    """The Evaluate page's text and window length, on at most ``windows`` windows."""
    return EvalConfig(source=eval_config.source, windows=min(windows, eval_config.windows),
                      seqlen=eval_config.seqlen, batch_size=eval_config.batch_size)


def export_job(request: ExportRequest) -> Generator[ProgressEvent | ExportWritten, None, ExportOutcome]:
    """Export (core.interop.export.export_model), then measure the perplexity cost when asked."""
    from core.evaluate import size_on_disk
    from core.interop.export import export_model

    warnings: list[str] = []
    events = export_model(request.folder, request.fmt, request.output, dtype=DTYPES[request.dtype],
                          overwrite=request.overwrite)
    path = yield from _noting_warnings(events, warnings)
    yield ExportWritten(Path(path))
    cost = None
    if request.cost is not None:
        cost = yield from perplexity_cost(request.folder, Path(path), request.cost)
    return ExportOutcome(Path(path), request.fmt, size_on_disk(path), cost, tuple(warnings))


def perplexity_cost(quantized: Path, exported: Path, config: EvalConfig
                    ) -> Generator[ProgressEvent, None, PerplexityCost]:
    """core.evaluate.compare of the two folders (what ``squeeze eval A B --compare`` prints), its
    events folded into one "measure" stage."""
    from core.evaluate import compare

    rows = yield from _as_one_stage(compare([str(quantized), str(exported)], config), "measure", models=2)
    return PerplexityCost(rows[0].perplexity, rows[1].perplexity, config)


def _relay(gen: Generator, convert: Callable[[ProgressEvent], ProgressEvent]) -> Generator:
    """Re-yield ``convert(event)`` for each of ``gen``'s events and return its result; closing this
    closes ``gen`` (a cancel reaches the export, so its temporary files go before "finished")."""
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield convert(event)
    finally:
        gen.close()


def _noting_warnings(gen: Generator, warnings: list[str]) -> Generator:
    """Re-yield ``gen``'s events, appending the message of each "warning" event to ``warnings``."""
    def note(event: ProgressEvent) -> ProgressEvent:
        if event.stage == "warning":
            warnings.append(event.message)
        return event

    return (yield from _relay(gen, note))


def _as_one_stage(gen: Generator, stage: str, models: int) -> Generator:
    """Re-yield the events of core.evaluate.compare over ``models`` models as one stage of 0..1000:
    its "load" events say which model is next, its "eval" events how far that model has got."""
    index = 0

    def rescale(event: ProgressEvent) -> ProgressEvent:
        nonlocal index
        if event.stage == "load":
            index = min(event.done, models)
        within = event.fraction if event.stage == "eval" else 0.0
        return ProgressEvent(stage, int(1000 * min(1.0, (index + within) / models)), 1000, event.message)

    return (yield from _relay(gen, rescale))


def fresh_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """``folder/stem+suffix``, or ``folder/stem-2+suffix``, ``-3``... whichever does not exist yet."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in stem) or "model"
    candidate, n = folder / f"{stem}{suffix}", 2
    while candidate.exists():
        candidate, n = folder / f"{stem}-{n}{suffix}", n + 1
    return candidate


def default_export_path(folder: Path, fmt: str, dtype: str, where: Path) -> Path:
    """A fresh output for exporting ``folder``: <name>-vllm, <name>-dense-fp16, <name>-fp16.gguf."""
    tag = DTYPE_TAGS.get(dtype, dtype)
    if fmt == "gguf":
        return fresh_path(where, f"{folder.name}-{tag}", ".gguf")
    return fresh_path(where, f"{folder.name}-vllm" if fmt == "squeezellm-pt" else f"{folder.name}-dense-{tag}")
