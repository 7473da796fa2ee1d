"""Perplexity, size accounting and side-by-side comparison of models.

Protocol (ASSETS.md): non-overlapping windows of ``seqlen`` tokens; perplexity =
exp(mean over windows of the mean token cross-entropy of the window). Windows are
batched; a batch that runs out of memory is retried with half as many windows.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.config import EvalConfig
from core.errors import UserError, describe_memory_error
from core.progress import ProgressEvent
from core.units import format_bytes


@dataclass(frozen=True)
class PerplexityResult:
    """perplexity: exp(mean of nll_per_window); nll_per_window: mean cross-entropy (nats) of each
    window over its seqlen-1 predicted tokens; tokens: tokens fed through the model (n * seqlen);
    seconds: wall time of the forward passes; tokens_per_second: tokens / seconds."""

    perplexity: float
    nll_per_window: tuple[float, ...]
    tokens: int
    seconds: float
    tokens_per_second: float


@dataclass(frozen=True)
class SizeReport:
    """Storage of a model: quantizable linear weights vs everything else (bytes as held in memory)."""

    n_weights: int
    quantized_bytes: int
    other_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / max(1, self.n_weights)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


@dataclass(frozen=True)
class CompareRow:
    """One model of a comparison; delta_vs_first is perplexity / the first model's perplexity."""

    name: str
    perplexity: float
    delta_vs_first: float
    bits_per_weight: float
    size_on_disk_bytes: int | None
    tokens_per_second: float


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's "can't allocate" errors (core.errors decides)."""
    return describe_memory_error(exc) is not None


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of each window.

    batch: int64 [b, seqlen] on the model's device -> float64 [b] on the CPU.
    """
    logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
    targets = batch[:, 1:]
    # fp32 log-softmax even for half models: fp16 cross-entropy over 50k+ logits loses digits.
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return nll.double().mean(dim=1).cpu()


def perplexity(model: torch.nn.Module, windows: torch.Tensor, *,
               batch_size: int = 4) -> Generator[ProgressEvent, None, PerplexityResult]:
    """Perplexity of ``model`` over ``windows`` (int64 [n, seqlen], n >= 1, seqlen >= 2).

    Yields ("eval", windows_done, n) after every batch. A batch that runs out of memory is retried
    with half the batch size; at batch size 1 a UserError tells the user to shorten the windows.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise UserError(f"evaluation windows have shape {tuple(windows.shape)}: need at least one window "
                        "of at least 2 tokens (use a longer text or fewer/shorter windows)")
    n, seqlen = windows.shape
    from core.data import check_window_fits

    check_window_fits(getattr(model, "config", None), seqlen)  # longer windows give meaningless numbers
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nlls: list[float] = []
    seconds = 0.0
    size = max(1, batch_size)
    yield ProgressEvent("eval", 0, n, f"evaluating {n} windows of {seqlen} tokens")
    try:
        while len(nlls) < n:
            batch = windows[len(nlls):len(nlls) + size].to(device)
            t0 = time.perf_counter()
            nll = _nll_or_none_on_oom(model, batch)
            if nll is None:  # out of memory: the failed batch's tensors are gone by now
                size = _smaller_batch(size, seqlen, device)
                continue
            seconds += time.perf_counter() - t0
            nlls.extend(nll.tolist())
            yield ProgressEvent("eval", len(nlls), n, f"window {len(nlls)}/{n}: "
                                f"running perplexity {math.exp(sum(nlls) / len(nlls)):.3f}")
    finally:
        model.train(was_training)
    ppl = math.exp(sum(nlls) / n)
    tokens = n * seqlen
    return PerplexityResult(ppl, tuple(nlls), tokens, seconds, tokens / max(seconds, 1e-9))


def _nll_or_none_on_oom(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """window_nll, or None when the batch ran out of memory (other errors propagate)."""
    try:
        return window_nll(model, batch)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
    return None


def _smaller_batch(size: int, seqlen: int, device: torch.device) -> int:
    """Half the batch size after an out-of-memory error; UserError when it is already 1."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if size <= 1:
        raise UserError(f"not enough memory for windows of {seqlen} tokens: use fewer/shorter windows "
                        "(e.g. --seqlen 256), a smaller model, or a device with more memory")
    return size // 2


def evaluate_model(loaded, config: EvalConfig) -> Generator[ProgressEvent, None, PerplexityResult]:
    """Perplexity of a ``core.models.LoadedModel`` with the protocol in ``config``."""
    windows = yield from _windows_for(loaded.tokenizer, config)
    return (yield from perplexity(loaded.model, windows, batch_size=config.batch_size))


def _windows_for(tokenizer, config: EvalConfig) -> Generator[ProgressEvent, None, torch.Tensor]:
    """int64 [config.windows, config.seqlen] evaluation windows of config.source."""
    from core.data import corpus_tokens, evaluation_windows

    yield ProgressEvent("tokenize", 0, 1, f"tokenizing {config.source}")
    tokens = corpus_tokens(tokenizer, config.source)
    windows = evaluation_windows(tokens, config.windows, config.seqlen)
    yield ProgressEvent("tokenize", 1, 1, f"{windows.shape[0]} windows of {windows.shape[1]} tokens")
    return windows


def _quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> module for every module that reports its own storage (SqueezeLinear, baselines)."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "storage_bytes", None)) and hasattr(m, "in_features")}


def model_size_report(model: torch.nn.Module) -> SizeReport:
    """Bytes of the quantizable linear weights (as stored) against everything else.

    Quantized modules count ``storage_bytes()``; plain quantizable ``nn.Linear`` count their weight
    and bias as held. Every other tensor of the state_dict (embeddings, norms, an untied lm_head) is
    ``other_bytes``; tensors shared by several modules (tied embeddings) are counted once, and
    non-persistent buffers (rotary tables) not at all, since they are never stored.
    """
    from core.models import quantizable_linears

    quantized = _quantized_modules(model)
    try:
        plain = {k: v for k, v in quantizable_linears(model).items() if k not in quantized}
    except UserError:
        plain = {}  # no decoder blocks found: nothing quantizable left to count
    n_weights = sum(m.in_features * m.out_features for m in [*quantized.values(), *plain.values()])
    quantized_bytes = sum(int(m.storage_bytes()) for m in quantized.values())
    other_bytes = 0
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() and not tensor.is_meta else id(tensor)
        if owner in quantized or storage in seen:
            continue
        seen.add(storage)
        if owner in plain:
            quantized_bytes += tensor.numel() * tensor.element_size()
        else:
            other_bytes += tensor.numel() * tensor.element_size()
    return SizeReport(n_weights, quantized_bytes, other_bytes)


def size_on_disk(path: str | os.PathLike | None) -> int | None:
    """Bytes of a file, or of every file under a folder; None when ``path`` is not on disk."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None


def _same_tokenizer(a, b) -> bool:
    probe = "Perplexity compares models: 3.14 naïve café 日本語 <|im_end|>\n  indented"
    return a.get_vocab() == b.get_vocab() and a(probe)["input_ids"] == b(probe)["input_ids"]


def compare(specs: list[str], config: EvalConfig) -> Generator[ProgressEvent, None, list[CompareRow]]:
    """Evaluate each model (original spec or quantized folder) on identical windows.

    The text is tokenized once with the first model's tokenizer; a model whose tokenizer differs is
    refused. Each model is freed before the next is loaded. Events carry the model's name.
    """
    from core.data import check_window_fits
    from core.models import load_model

    if not specs:
        raise UserError("nothing to compare: give at least one model or quantized folder")
    rows: list[CompareRow] = []
    windows = first_tokenizer = None
    for i, spec in enumerate(specs):
        yield ProgressEvent("load", i, len(specs), f"loading {spec}")
        loaded = load_model(spec)  # an original model or a quantized folder
        check_window_fits(loaded.model.config, config.seqlen)  # before tokenizing, not after
        if first_tokenizer is None:
            first_tokenizer = loaded.tokenizer
            windows = yield from _windows_for(first_tokenizer, config)
        elif not _same_tokenizer(first_tokenizer, loaded.tokenizer):
            raise UserError(f"{spec} uses a different tokenizer than {specs[0]}: perplexities would not be "
                            "comparable; compare only models quantized from the same original")
        result = yield from _prefixed(perplexity(loaded.model, windows, batch_size=config.batch_size),
                                      loaded.name)
        size = model_size_report(loaded.model)
        disk = size_on_disk(spec)
        disk = disk if disk is not None else size_on_disk(getattr(loaded, "source", None))
        base = rows[0].perplexity if rows else result.perplexity
        rows.append(CompareRow(loaded.name, result.perplexity, result.perplexity / base,
                               size.bits_per_weight, disk, result.tokens_per_second))
        del loaded
        _free_memory()
    yield ProgressEvent("load", len(specs), len(specs), "comparison done")
    return rows


def _prefixed(gen: Generator[ProgressEvent, None, PerplexityResult], name: str
              ) -> Generator[ProgressEvent, None, PerplexityResult]:
    """Re-yield ``gen``'s events with the model's name in front of each message."""
    result = None
    try:
        while True:
            event = next(gen)
            yield ProgressEvent(event.stage, event.done, event.total, f"{name}: {event.message}")
    except StopIteration as stop:
        result = stop.value
    finally:
        gen.close()
    return result


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_compare_table(rows: list[CompareRow]) -> str:
    """A markdown table (also readable as plain text) of a comparison."""
    header = ["model", "perplexity", "vs first", "bits/weight", "size on disk", "tokens/s"]
    body = [[r.name, f"{r.perplexity:.3f}", f"{r.delta_vs_first:.3f}x", f"{r.bits_per_weight:.2f}",
             format_bytes(r.size_on_disk_bytes), f"{r.tokens_per_second:.0f}"] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])
