"""SqueezeLLM quantization of a whole model: split, weighted k-means, pack.

``quantize_model`` replaces every quantizable ``nn.Linear`` of a model in place by a
``SqueezeLinear`` and yields progress at least once per matrix, so a consumer can stop
between matrices. ``quantize_matrix`` is the per-matrix step (SPEC A.4-A.6, H.1-H.4).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from core.config import QuantConfig, to_dict
from core.kmeans import weighted_kmeans_1d
from core.layers import SqueezeLinear
from core.outliers import (OutlierStats, iqr_threshold, outlier_mask, quartiles, sanitize_fisher, sensitive_mask,
                           solve_range_multiplier)
from core.packing import dense_to_csr
from core.progress import ProgressEvent
from core.shared_input import link_shared_inputs

T = TypeVar("T")


@dataclass(frozen=True)
class QuantizedMatrix:
    """The parts of one quantized matrix.

    codes: uint8 [out, in]; lookup_table: float16 [out, 2**bits] (sorted per row);
    sparse: (rows int32 [out+1], cols int32 [nnz], vals float32 [nnz]) residuals so that
    lookup_table[r, codes[r, j]] + sparse[r, j] == original weight at the sparse positions.
    """

    codes: torch.Tensor
    lookup_table: torch.Tensor
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    n_outliers: int
    n_sparse: int
    weighted_error: float
    relative_error: float


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    outliers: int
    sparse: int
    weighted_error: float
    relative_error: float
    # (bits, Fisher-weighted error) of every width tried; mixed precision tries 3 and 4
    weighted_errors: tuple[tuple[int, float], ...] = ()
    # with refinement (core.refine): the gradient-weighted objective Σ eᵀHe before and after
    refine_objective: tuple[float, float] | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class QuantReport:
    """What a quantization did; ``bits_per_weight`` counts every stored bit of the quantized layers."""

    config: dict
    range_multiplier: float | None
    layers: tuple[LayerReport, ...]
    n_weights: int
    quantized_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / max(1, self.n_weights)

    @property
    def sparse_percent(self) -> float:
        return 100.0 * sum(layer.sparse for layer in self.layers) / max(1, self.n_weights)

    @property
    def layer_bits(self) -> dict[str, int]:
        """name -> bits of each quantized matrix (all equal unless ``target_bits`` was set)."""
        return {layer.name: layer.bits for layer in self.layers}

    @property
    def dense_bits(self) -> float:
        """Average code bits per weight (what ``target_bits`` budgets: no LUT, no sparse part)."""
        numel = sum(layer.numel for layer in self.layers)
        if not numel:
            return float(self.config.get("bits", 0))
        return sum(layer.bits * layer.numel for layer in self.layers) / numel

    @property
    def matrices_per_bits(self) -> dict[int, int]:
        """bits -> number of matrices quantized at that width, ascending."""
        counts: dict[int, int] = {}
        for layer in self.layers:
            counts[layer.bits] = counts.get(layer.bits, 0) + 1
        return dict(sorted(counts.items()))


def quantize_matrix(weight: torch.Tensor, fisher: torch.Tensor | None, bits: int, *,
                    threshold: float | None = None, sensitivity_percent: float = 0.0,
                    max_iter: int = 50, seed: int = 0, timings: dict[str, float] | None = None) -> QuantizedMatrix:
    """Dense-and-sparse non-uniform quantization of one matrix.

    weight: float [out, in] (any float dtype, any device); fisher: float [out, in] or None for
    unweighted k-means. The dense part is quantized per output row with a Fisher-weighted k-means of
    2**bits centroids; entries chosen by ``sparse_mask`` are kept exactly as residuals in CSR.
    timings: if given, seconds spent in "split" and "kmeans" are added to it.
    """
    return quantize_matrix_widths(weight, fisher, (bits,), threshold=threshold,
                                  sensitivity_percent=sensitivity_percent, max_iter=max_iter, seed=seed,
                                  timings=timings)[bits]


def quantize_matrix_widths(weight: torch.Tensor, fisher: torch.Tensor | None, widths: tuple[int, ...], *,
                           threshold: float | None = None, sensitivity_percent: float = 0.0,
                           max_iter: int = 50, seed: int = 0, timings: dict[str, float] | None = None
                           ) -> dict[int, QuantizedMatrix]:
    """``quantize_matrix`` at several bit widths from one dense/sparse split: bits -> result.

    Same arguments as ``quantize_matrix``; the sparse part (and so ``n_sparse``) is identical for
    every width, only the k-means of the dense part runs once per width.
    """
    clock = _Stopwatch(timings)
    w = weight.detach().float()
    f = sanitize_fisher(fisher.to(w.device)) if fisher is not None else torch.ones_like(w)
    mask = outlier_mask(w, threshold)  # sparse_mask's union, with f sanitised once and |w| taken once
    n_outliers = int(mask.sum())
    if sensitivity_percent > 0:
        mask |= sensitive_mask(f, sensitivity_percent)
    dense, dense_fisher = w.masked_fill(mask, 0.0), f.masked_fill(mask, 0.0)
    clock.lap("split")
    results = {}
    for bits in widths:
        centroids, codes = weighted_kmeans_1d(dense, dense_fisher, 1 << bits, max_iter=max_iter, seed=seed)
        clock.lap("kmeans")
        results[bits] = _assemble(w, f, mask, centroids, codes, n_outliers)
        clock.lap("split")
    return results


ASSEMBLE_CHUNK = 1 << 20  # entries per slice of rows: the temporaries of a 58 M-entry matrix stay small


def _assemble(w: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, centroids: torch.Tensor,
              codes: torch.Tensor, n_outliers: int) -> QuantizedMatrix:
    """The stored parts and errors of one matrix from its k-means result (all tensors [out, in]).

    Works through slices of rows, so its float64 and int64 temporaries take a few MB whatever the
    matrix size (whole, they were ~40 bytes per weight: 2.3 GB for an 8 B model's MLP matrix).
    """
    lookup_table = centroids.to(torch.float16)
    table = lookup_table.float()
    step = max(1, ASSEMBLE_CHUNK // max(1, w.shape[1]))
    counts, cols, vals = [], [], []
    weighted_error, error_square, weight_square = 0.0, 0.0, 0.0
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        w_c, m_c = w[rows], mask[rows]
        decoded = table[rows].gather(1, codes[rows].long())
        residual = torch.where(m_c, w_c - decoded, torch.zeros_like(w_c))
        part_rows, part_cols, part_vals = dense_to_csr(residual, m_c)
        counts.append(part_rows[1:] - part_rows[:-1])
        cols.append(part_cols)
        vals.append(part_vals)
        error = (w_c - (decoded + residual)).double().square()
        weighted_error += float((f[rows].double() * error).sum())
        error_square += float(error.sum())
        weight_square += float(w_c.double().square().sum())
    row_pointer = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
    row_pointer[1:] = torch.cat(counts).cumsum(0)
    relative_error = (error_square / max(weight_square, 1e-60)) ** 0.5
    return QuantizedMatrix(codes.cpu(), lookup_table.cpu(), (row_pointer.cpu(), torch.cat(cols).cpu(),
                                                            torch.cat(vals).cpu()),
                           n_outliers, int(mask.sum()), weighted_error, relative_error)


class _Stopwatch:
    """Adds the seconds since the last lap to a named bucket (no-op without a dict)."""

    def __init__(self, totals: dict[str, float] | None):
        self.totals = totals
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.totals is not None:
            now = time.perf_counter()
            self.totals[name] = self.totals.get(name, 0.0) + now - self.t
            self.t = now


def outlier_thresholds(linears: dict[str, torch.nn.Linear], config: QuantConfig
                       ) -> Generator[ProgressEvent, None, tuple[dict[str, float | None], float | None]]:
    """Per-matrix outlier thresholds for the config, and the IQR multiplier used (None: no outliers).

    With a target percentage the multiplier is solved over the whole model (SPEC H.3).
    """
    outliers = config.outliers
    if not outliers.enabled or config.method != "squeezellm":
        return {name: None for name in linears}, None
    n = len(linears)
    quarts: dict[str, tuple[float, float]] = {}
    stats: list[OutlierStats] = []
    for i, (name, lin) in enumerate(linears.items()):
        if outliers.range_multiplier is not None:
            quarts[name] = quartiles(lin.weight)
        else:
            s = OutlierStats.of(lin.weight)
            stats.append(s)
            quarts[name] = (s.q1, s.q3)
        yield ProgressEvent("outliers", i + 1, n, f"outlier statistics: {name}")
    r = outliers.range_multiplier
    if r is None:
        r = solve_range_multiplier(stats, outliers.percent)
    return {name: iqr_threshold(q1, q3, r) for name, (q1, q3) in quarts.items()}, r


def quantize_model(model: torch.nn.Module, config: QuantConfig,
                   fisher: dict[str, torch.Tensor] | None = None, *,
                   device: str | torch.device | None = None) -> Generator[ProgressEvent, None, QuantReport]:
    """Replace every quantizable linear of ``model`` by a ``SqueezeLinear``, in place.

    fisher: name -> float32 [out, in] (from ``load_or_compute_fisher``); None gives unweighted k-means.
    device: where the k-means runs (default: the weights' device). Yields at least once per matrix.
    With ``config.target_bits`` each matrix gets one of the two widths around it (config.mixed_widths) under that budget (core.mixed_precision).
    Sibling layers that read the same input are linked to run as one kernel call (core.shared_input).
    The embedding and head are quantized too when ``config.embed_bits`` / ``head_bits`` are below 16
    (core.embed_head): the head weighted by ``fisher[<head name>]`` when the Fisher includes it
    (``core.sensitivity.head_target``), an untied embedding unweighted (no calibration text here).
    ``config.refine`` is not applied here: refinement needs each layer's gradient-weighted H, which the
    streaming engine (core.stream_quantize) collects during its backward sweep.
    """
    report = yield from _quantize_linears(model, config, fisher, device)
    if config.embed_bits < 16 or config.head_bits < 16:
        from core.embed_head import find_embed_head, quantize_embed_head

        found = find_embed_head(model)
        head_fisher = fisher.get(found.head) if fisher is not None and found is not None and found.head else None
        yield ProgressEvent("quantize", len(report.layers), len(report.layers), "embedding and head: k-means")
        quantize_embed_head(model, config, head_fisher, None, report.range_multiplier)
    link_shared_inputs(model)
    return report


def _quantize_linears(model: torch.nn.Module, config: QuantConfig, fisher: dict[str, torch.Tensor] | None,
                      device: str | torch.device | None) -> Generator[ProgressEvent, None, QuantReport]:
    from core.models import quantizable_linears

    if config.target_bits is not None:
        from core.mixed_precision import quantize_mixed

        return (yield from quantize_mixed(model, config, fisher, device=device))
    linears = quantizable_linears(model)
    if config.method != "squeezellm":
        from core.baselines import quantize_rtn

        yield from quantize_rtn(model, config.bits, 128 if config.method == "rtn-g128" else None)
        return _report(model, config, None, [], {})
    t0 = time.perf_counter()
    thresholds, multiplier = yield from outlier_thresholds(linears, config)
    seconds = {"outliers": time.perf_counter() - t0}
    layers: list[LayerReport] = []

    def job(name: str, lin: torch.nn.Linear, target: torch.device) -> QuantizedMatrix:
        f = fisher.get(name) if fisher is not None else None
        return quantize_matrix(lin.weight.to(target), f.to(target) if f is not None else None, config.bits,
                               threshold=thresholds[name], sensitivity_percent=config.sensitivity_percent,
                               max_iter=config.kmeans_max_iter, seed=config.seed, timings=seconds)

    with contextlib.closing(per_matrix(linears, device, job)) as results:
        for i, (name, lin, q) in enumerate(results):
            clock = _Stopwatch(seconds)
            module = squeeze_module(q, config.bits, lin)
            model.set_submodule(name, module.to(lin.weight.device))
            clock.lap("packing")
            layers.append(layer_report(name, lin, config.bits, q))
            yield ProgressEvent("quantize", i + 1, len(linears), f"quantized {name} ({q.n_sparse} sparse)")
    return _report(model, config, multiplier, layers, seconds)


def squeeze_module(q: QuantizedMatrix, bits: int, linear: torch.nn.Linear) -> SqueezeLinear:
    """The ``SqueezeLinear`` (on the CPU) holding ``q`` and the bias of the ``linear`` it replaces."""
    bias = linear.bias.detach() if linear.bias is not None else None
    return SqueezeLinear.from_parts(q.codes, q.lookup_table, bits, sparse=q.sparse, bias=bias)


def layer_report(name: str, linear: torch.nn.Linear, bits: int, q: QuantizedMatrix,
                 weighted_errors: tuple[tuple[int, float], ...] = ()) -> LayerReport:
    return LayerReport(name, tuple(linear.weight.shape), bits, q.n_outliers, q.n_sparse, q.weighted_error,
                       q.relative_error, weighted_errors)


def per_matrix(linears: dict[str, torch.nn.Linear], device: str | torch.device | None,
               work: Callable[[str, torch.nn.Linear, torch.device], T]
               ) -> Generator[tuple[str, torch.nn.Linear, T], None, None]:
    """Run ``work(name, linear, device)`` for every matrix on a thread pool; yield results in model order.

    device: where the work runs (None: each weight's own device). Closing the generator cancels the
    matrices not yet started (a stopped run does not finish them).
    """
    pool_device = device if device is not None else next(iter(linears.values())).weight.device
    largest = max(lin.weight.numel() for lin in linears.values())
    with _matrix_pool(pool_device, largest) as pool:
        futures = [pool.submit(work, name, lin, torch.device(device) if device is not None else lin.weight.device)
                   for name, lin in linears.items()]
        try:
            for (name, lin), future in zip(linears.items(), futures):
                yield name, lin, future.result()
        finally:
            for future in futures:
                future.cancel()


LARGE_MATRIX = 1 << 22  # entries; above it one matrix at a time uses every thread


@contextlib.contextmanager
def _matrix_pool(device: str | torch.device, largest: int = 0):
    """Threads over matrices, each running torch single-threaded, on the CPU.

    The k-means is many small tensor ops: torch's intra-op threads mostly fight each other
    over them (measured 17x slower on a busy 2-core machine), while whole matrices in parallel
    keep every core busy. Matrices above ``LARGE_MATRIX`` entries go one at a time with torch's
    threads instead: their ops are large enough to split, and each holds ~30 bytes per weight of
    temporaries (1.7 GB for an 8 B model's MLP matrix), which parallel matrices would multiply.
    On a GPU one worker feeds the device.
    """
    on_cpu = torch.device(device).type == "cpu"
    one_at_a_time = not on_cpu or largest > LARGE_MATRIX
    from core.distributed import cpu_cores

    workers = 1 if one_at_a_time else cpu_cores()  # the machine's cores, shared by the ranks running on it
    threads = torch.get_num_threads()
    if not one_at_a_time:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="squeeze-kmeans") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _report(model: torch.nn.Module, config: QuantConfig, multiplier: float | None,
            layers: list[LayerReport], seconds: dict[str, float]) -> QuantReport:
    n_weights, n_bytes = 0, 0
    for module in model.modules():
        if hasattr(module, "storage_bytes") and hasattr(module, "in_features"):
            n_weights += module.in_features * module.out_features
            n_bytes += module.storage_bytes()
    return QuantReport(to_dict(config), multiplier, tuple(layers), n_weights, n_bytes, seconds)
