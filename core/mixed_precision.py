"""Per-layer mixed precision (SPEC H.9): one of two widths per matrix under an average-bits budget.

The budget ``target_bits`` picks the two whole widths around it (``core.config.mixed_widths``: 3.5 ->
3 or 4 bits, 4.5 -> 4 or 5). Every matrix is split into dense and sparse parts once and its dense part
clustered at both widths, so the Fisher-weighted error Σ F (W − Ŵ)² of each matrix at each is known.
The extra bit of a matrix costs out*in bits; the budget goes, greedily, to the matrices whose
error drops most per extra bit, as long as the average code bits per weight stays within the
target (never above it). The LUTs and the sparse part are not budgeted: the target is the
``--bits`` a person would otherwise choose.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from core.config import MIXED_RANGE, QuantConfig, mixed_widths
from core.layers import SqueezeLinear
from core.progress import ProgressEvent
from core.quantize import (LayerReport, QuantizedMatrix, QuantReport, _report, _Stopwatch, layer_report,
                           outlier_thresholds, per_matrix, quantize_matrix_widths, squeeze_module)

@dataclass(frozen=True)
class Candidate:
    """One matrix quantized at every width: bits -> packed module (CPU) and its report."""

    name: str
    device: torch.device  # where the replaced linear lived (the chosen module goes there)
    modules: dict[int, SqueezeLinear]
    reports: dict[int, LayerReport]

    @property
    def numel(self) -> int:
        return next(iter(self.reports.values())).numel

    @property
    def errors(self) -> dict[int, float]:
        return {bits: report.weighted_error for bits, report in self.reports.items()}


@dataclass(frozen=True)
class Candidates:
    """Every quantizable matrix of a model at both widths, before any is placed in the model."""

    matrices: dict[str, Candidate]  # in model order
    range_multiplier: float | None
    seconds: dict[str, float]

    def allocate(self, target_bits: float) -> dict[str, int]:
        """name -> bits meeting ``target_bits`` (see ``allocate_bits``)."""
        return allocate_bits({n: c.numel for n, c in self.matrices.items()},
                             {n: c.errors for n, c in self.matrices.items()}, target_bits)


def allocate_bits(numel: Mapping[str, int], errors: Mapping[str, Mapping[int, float]],
                  target_bits: float) -> dict[str, int]:
    """Choose the lower or upper of ``mixed_widths(target_bits)`` per matrix so that
    Σ bits·numel ≤ target_bits · Σ numel.

    numel: name -> weights of the matrix; errors: name -> {bits: error} (Fisher-weighted) holding both
    widths. Greedy knapsack by marginal gain: matrices sorted by (error at low − error at high) / numel,
    largest first (ties keep the given order), each upgraded when its extra out*in bits still fit; a
    matrix that does not fit is skipped and smaller ones after it may still fit. Exact integer
    arithmetic, so target 4.0 gives every matrix 4 bits and 3.0 gives none. Returns name -> bits in
    the order of ``numel``.
    """
    if not MIXED_RANGE[0] <= target_bits <= MIXED_RANGE[1]:
        raise ValueError(f"target bits = {target_bits} is outside [{MIXED_RANGE[0]:g}, {MIXED_RANGE[1]:g}]: "
                         "use an average such as 3.5")
    lo, hi = mixed_widths(target_bits)
    total = sum(numel.values())
    spare = math.floor(Fraction(target_bits) * total) - lo * total  # bits left after everything at the low width
    order = sorted(numel, key=lambda n: -(errors[n][lo] - errors[n][hi]) / max(1, numel[n]))
    chosen = {name: lo for name in numel}
    for name in order:
        cost = (hi - lo) * numel[name]
        if cost <= spare:
            chosen[name] = hi
            spare -= cost
    return chosen


def average_bits(numel: Mapping[str, int], allocation: Mapping[str, int]) -> float:
    """Σ bits·numel / Σ numel: the average code bits per weight of an allocation."""
    total = sum(numel.values())
    return sum(allocation[name] * n for name, n in numel.items()) / max(1, total)


def quantize_candidates(model: torch.nn.Module, config: QuantConfig, fisher: dict[str, torch.Tensor] | None = None,
                        *, device: str | torch.device | None = None) -> Generator[ProgressEvent, None, Candidates]:
    """Quantize every quantizable linear of ``model`` at both of ``config.widths``; the model is not changed.

    fisher: name -> float32 [out, in] or None (unweighted); device: where the k-means runs. The
    dense/sparse split runs once per matrix, the k-means twice. Memory: both packed results of every
    matrix are held (about 7/8 byte per weight) until ``place`` puts one of them in the model.
    Yields "outliers" events, then one "quantize" event per matrix.
    """
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    t0 = time.perf_counter()
    thresholds, multiplier = yield from outlier_thresholds(linears, config)
    seconds = {"outliers": time.perf_counter() - t0}

    def job(name: str, lin: torch.nn.Linear, target: torch.device) -> dict[int, QuantizedMatrix]:
        f = fisher.get(name) if fisher is not None else None
        return quantize_matrix_widths(lin.weight.to(target), f.to(target) if f is not None else None, config.widths,
                                      threshold=thresholds[name], sensitivity_percent=config.sensitivity_percent,
                                      max_iter=config.kmeans_max_iter, seed=config.seed, timings=seconds)

    matrices: dict[str, Candidate] = {}
    with contextlib.closing(per_matrix(linears, device, job)) as results:
        for i, (name, lin, by_bits) in enumerate(results):
            clock = _Stopwatch(seconds)
            tried = tuple((bits, q.weighted_error) for bits, q in by_bits.items())
            matrices[name] = Candidate(name, lin.weight.device,
                                       {bits: squeeze_module(q, bits, lin) for bits, q in by_bits.items()},
                                       {bits: layer_report(name, lin, bits, q, tried) for bits, q in by_bits.items()})
            clock.lap("packing")
            errors = ", ".join(f"{bits}-bit {err:.3g}" for bits, err in tried)
            yield ProgressEvent("quantize", i + 1, len(linears),
                                f"k-means at {' and '.join(map(str, config.widths))} bits: {name} "
                                f"(weighted error {errors})")
    return Candidates(matrices, multiplier, seconds)


def place(model: torch.nn.Module, candidates: Candidates, allocation: Mapping[str, int]
          ) -> Generator[ProgressEvent, None, list[LayerReport]]:
    """Put the module of the allocated width of every matrix into ``model`` (replacing what is there).

    May be called again with another allocation of the same candidates. Yields one "allocate" event
    per matrix; returns the chosen layers' reports in model order.
    """
    layers = []
    n = len(candidates.matrices)
    for i, (name, candidate) in enumerate(candidates.matrices.items()):
        bits = allocation[name]
        model.set_submodule(name, candidate.modules[bits].to(candidate.device))
        layers.append(candidate.reports[bits])
        yield ProgressEvent("allocate", i + 1, n, f"{name}: {bits} bits")
    return layers


def quantize_mixed(model: torch.nn.Module, config: QuantConfig, fisher: dict[str, torch.Tensor] | None = None,
                   *, device: str | torch.device | None = None) -> Generator[ProgressEvent, None, QuantReport]:
    """``quantize_model`` for a config with ``target_bits``: candidates, allocation, placement.

    Stages: "outliers", "quantize" (k-means at both widths, one event per matrix), "allocate" (the
    choice, then one event per matrix placed). The report's layers carry each matrix's chosen bits
    and its weighted error at both widths.
    """
    if config.target_bits is None:
        raise ValueError("quantize_mixed needs a config with target_bits: use e.g. QuantConfig(target_bits=3.5)")
    candidates = yield from quantize_candidates(model, config, fisher, device=device)
    t0 = time.perf_counter()
    allocation = candidates.allocate(config.target_bits)
    numel = {name: c.numel for name, c in candidates.matrices.items()}
    high = config.widths[-1]
    n_high = sum(bits == high for bits in allocation.values())
    yield ProgressEvent("allocate", 0, len(allocation),
                        f"{high} bits for {n_high} of {len(allocation)} matrices: "
                        f"{average_bits(numel, allocation):.4f} bits per dense weight (target {config.target_bits})")
    layers = yield from place(model, candidates, allocation)
    seconds = {**candidates.seconds, "allocate": time.perf_counter() - t0}
    return _report(model, config, candidates.range_multiplier, layers, seconds)
