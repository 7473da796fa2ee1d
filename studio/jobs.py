"""The studio's long jobs: core generators chained into what one button does. No Qt here.

Each job yields ``ProgressEvent``s (chat jobs also yield text pieces) and returns its result; the
JobRunner runs it in a worker thread. Stage names match the progress panels' bars.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from core.config import CalibrationConfig, ChatConfig, EvalConfig
from core.models import LoadedModel
from core.pipeline import QuantizeJob
from core.progress import ProgressEvent

LOAD_STAGES = {"load": 1.0}
ANALYSE_STAGES = {"stats": 1.0}
SENSITIVITY_STAGES = {"load": 0.1, "fisher": 0.7, "stats": 0.2}
# Shares of a streaming run's time (core.pipeline): sensitivity and k-means alternate block by block.
QUANTIZE_STAGES = {"load": 0.04, "forward": 0.15, "backward": 0.4, "quantize": 0.33, "allocate": 0.01,
                   "save": 0.03, "reload": 0.04}
EVALUATE_STAGES = {"load": 0.1, "eval": 0.9}


def load_job(spec: str) -> Generator[ProgressEvent, None, tuple]:
    """Open ``spec`` and describe it; returns (model, ModelInfo).

    An original is opened lazily (studio.original.OriginalModel: headers only, no weights read); a
    quantized folder is loaded (its packed layers are small, and Inspect and Chat use them directly).
    """
    from core.checkpoint import is_quantized_folder
    from core.models import load_model
    from studio.model_info import describe
    from studio.original import open_original

    path = Path(spec.strip()).expanduser()
    if path.is_dir() and is_quantized_folder(path):
        yield ProgressEvent("load", 0, 0, f"loading {spec}…")
        model = load_model(spec)
    else:
        yield ProgressEvent("load", 0, 0, f"opening {spec} (converting a GGUF file takes ~1 min the first time)…")
        model = yield from open_original(spec)
    yield ProgressEvent("load", 1, 2, f"reading the layers of {model.name}")
    info = describe(model)
    yield ProgressEvent("load", 2, 2, f"opened {model.name}")
    return model, info


def analyse_job(original) -> Generator[ProgressEvent, None, list]:
    """Per-matrix statistics for the live previews (list[core.preview.MatrixStats]), one matrix at a time
    from the weight files, each finished block cached on disk (a cancelled pass resumes where it stopped)."""
    from core.lazy_model import folder_fingerprint
    from core.lazy_stats import StatsCache, collect_lazy_stats

    yield ProgressEvent("stats", 0, 0, f"fingerprinting {original.folder.name}")
    cache = StatsCache(folder_fingerprint(original.folder))
    return (yield from collect_lazy_stats(original.lazy, cache))


def sensitivity_job(original, calibration: CalibrationConfig) -> Generator[ProgressEvent, None, tuple]:
    """The Fisher sensitivity (cached on disk) and statistics that include it; returns (fisher, stats).

    Needs the whole model in float32 (refused with a message when it does not fit); the Quantize page
    computes the sensitivity of bigger models one block at a time.
    """
    from core.preview import collect_stats
    from core.sensitivity import load_or_compute_fisher

    loaded = yield from original.float32_copy()
    fisher = yield from load_or_compute_fisher(loaded.model, loaded.tokenizer, calibration)
    stats = yield from collect_stats(loaded.model, fisher)
    return fisher, stats


@dataclass(frozen=True)
class QuantizeOutcome:
    report: object  # core.quantize.QuantReport
    loaded: LoadedModel  # the saved folder, loaded back
    seconds: float


def quantize_job(job: QuantizeJob) -> Generator[ProgressEvent, None, QuantizeOutcome]:
    """Quantize into ``job.output`` (the pipeline loads its own copy, so the session's original stays
    intact), then load the saved folder back for evaluation and chat."""
    from core.models import load_model
    from core.pipeline import run_quantize_job

    t0 = time.perf_counter()
    report = yield from run_quantize_job(job)
    yield ProgressEvent("reload", 0, 1, f"loading the result from {job.output}")
    loaded = load_model(str(job.output))
    yield ProgressEvent("reload", 1, 1, "ready")
    return QuantizeOutcome(report, loaded, time.perf_counter() - t0)


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate: its label, the model (a quantized LoadedModel, or an OriginalModel that the
    job loads in its stored dtype), where it lives, what it was quantized with."""

    label: str
    loaded: object
    path: str | None
    settings: dict


def runnable(model) -> Generator[ProgressEvent, None, LoadedModel]:
    """A model ready to run: a LoadedModel as it is, an OriginalModel loaded whole in its stored dtype."""
    if isinstance(model, LoadedModel):
        return model
    return (yield from model.load_dense())


def evaluate_job(targets: list[EvalTarget], config: EvalConfig) -> Generator[ProgressEvent, None, list[dict]]:
    """Perplexity of each target on the same windows; returns one runs-table row (dict) per target."""
    from core.data import corpus_tokens, evaluation_windows
    from core.evaluate import model_size_report, perplexity, size_on_disk

    models = []
    for target in targets:
        models.append((yield from runnable(target.loaded)))
    yield ProgressEvent("eval", 0, 0, f"tokenizing {config.source}")
    tokens = corpus_tokens(models[0].tokenizer, config.source)
    windows = evaluation_windows(tokens, config.windows, config.seqlen)
    rows = []
    for index, (target, loaded) in enumerate(zip(targets, models)):
        target = dataclasses.replace(target, loaded=loaded)
        events = perplexity(target.loaded.model, windows, batch_size=config.batch_size)
        result = yield from _renamed(events, f"[{index + 1}/{len(targets)}] {target.label}")
        size = model_size_report(target.loaded.model)
        rows.append(run_row(target, config, result, size.total_bytes, size.bits_per_weight,
                            size_on_disk(target.path) if target.path else None))
    return rows


def _renamed(gen: Generator, prefix: str) -> Generator:
    """Re-yield ``gen``'s events with ``prefix`` in front of each message; returns its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        yield dataclasses.replace(event, message=f"{prefix}: {event.message}")


def run_row(target: EvalTarget, config: EvalConfig, result, memory_bytes: int, bits_per_weight: float,
            disk_bytes: int | None) -> dict:
    """One row of the runs table (JSON-ready)."""
    settings = target.settings or {}
    quant = settings.get("config") or {}
    outliers = quant.get("outliers") or {}
    return {
        "id": f"{time.time_ns():x}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "label": target.label,
        "path": target.path,
        "bits": quant.get("bits"),
        "method": quant.get("method"),
        "outliers": (f"{outliers['percent']}%" if outliers.get("percent") is not None else
                     f"r={outliers['range_multiplier']}" if outliers.get("range_multiplier") is not None else
                     ("none" if quant else None)),
        "sensitivity": quant.get("sensitivity_percent"),
        "size_bytes": disk_bytes if disk_bytes is not None else memory_bytes,
        "bits_per_weight": bits_per_weight,
        "perplexity": result.perplexity,
        "tokens_per_second": result.tokens_per_second,
        "seconds": result.seconds,
        "corpus": config.source,
        "windows": config.windows,
        "seqlen": config.seqlen,
    }


# ------------------------------------------------------------ chat


@dataclass(frozen=True)
class ChatPiece:
    """A piece of streamed reply text for one side ("left" or "right")."""

    side: str
    text: str


def chat_job(sides: dict[str, tuple[LoadedModel, object]], user_text: str, config: ChatConfig,
             should_stop: Callable[[], bool], seed: int | None = None) -> Generator[ChatPiece, None, dict]:
    """Stream the reply of one or two models to the same message, interleaved token by token.

    sides: side -> (model, its core.chat.ChatSession); an original is loaded in its stored dtype first
    (once: it is kept for the next message). Returns side -> (ChatStats, seconds spent on that side
    alone), so tokens per second are fair even though both share one thread.
    """
    from core.chat import stream_reply

    loaded_sides = {}
    for side, (model, chat) in sides.items():
        loaded_sides[side] = ((yield from runnable(model)), chat)
    sides = loaded_sides
    streams = {side: stream_reply(loaded.model, loaded.tokenizer, chat, user_text, config, stop=should_stop,
                                  seed=seed) for side, (loaded, chat) in sides.items()}
    busy = {side: 0.0 for side in streams}
    results: dict[str, tuple] = {}
    try:
        while len(results) < len(streams):
            for side, stream in streams.items():
                if side in results:
                    continue
                t0 = time.perf_counter()
                try:
                    piece = next(stream)
                except StopIteration as stop:
                    results[side] = (stop.value, busy[side] + time.perf_counter() - t0)
                    continue
                busy[side] += time.perf_counter() - t0
                yield ChatPiece(side, piece)
    finally:
        for stream in streams.values():
            stream.close()  # a stopped reply still enters the history (core.chat does it on close)
    return results


def default_output(info_name: str, bits: float, base: Path) -> Path:
    """A fresh folder name for a result: <base>/<model>-sq<bits>[-2, -3...] (bits: 3, 4, or a mixed target 3.5)."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in info_name) + f"-sq{bits:g}"
    candidate, n = base / stem, 2
    while candidate.exists():
        candidate, n = base / f"{stem}-{n}", n + 1
    return candidate
