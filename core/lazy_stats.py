"""Outlier statistics of a model too big to load: one matrix at a time from its safetensors files.

``collect_lazy_stats(lazy)`` condenses every quantizable matrix of a ``core.lazy_model.LazyModel``
(``core.preview.MatrixStats``, the input of the live previews), reading each matrix from the shards
on its own, so the peak is one matrix and its temporaries (~0.5 GB for an 8 B model's MLP matrix),
plus the condensed statistics kept (at most ``SKETCH_SIZE`` float32 values per matrix). 16-bit
matrices are condensed by counting their bit patterns instead of sorting (``condense``).

Each finished block is cached on disk (``StatsCache``: one safetensors file per block, keyed by the
folder's fingerprint ``core.lazy_model.folder_fingerprint``), so a cancelled pass resumes at the first
missing block and a second visit reads the cache in seconds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch

from core.outliers import SKETCH_SIZE, OutlierStats
from core.preview import MatrixStats
from core.progress import ProgressEvent

CACHE_FORMAT = 1


class StatsCache:
    """The outlier statistics of one model folder, one safetensors file per decoder block."""

    def __init__(self, fingerprint: str) -> None:
        from core.paths import cache_dir

        self.folder = cache_dir() / "outlier-stats" / f"{fingerprint}-v{CACHE_FORMAT}-s{SKETCH_SIZE}"

    def _file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def has(self, index: int) -> bool:
        return self._file(index).is_file()

    def get(self, index: int) -> list[MatrixStats] | None:
        """The block's statistics, or None when missing or unreadable (then they are computed again)."""
        from safetensors import safe_open

        try:
            with safe_open(self._file(index), framework="pt") as handle:
                facts = json.loads(handle.metadata()["matrices"])
                return [MatrixStats(name, tuple(fact["shape"]),
                                    OutlierStats(fact["numel"], fact["q1"], fact["q3"], handle.get_tensor(name),
                                                 torch.empty(0)))
                        for name, fact in facts.items()]
        except Exception:  # a damaged or foreign file: recompute rather than fail
            return None

    def put(self, index: int, stats: list[MatrixStats]) -> None:
        """Write atomically (a kill leaves the old file or none)."""
        from safetensors.torch import save_file

        from core.litter import sweep, temp_path

        self.folder.mkdir(parents=True, exist_ok=True)
        sweep(self.folder)
        facts = {m.name: {"shape": list(m.shape), "numel": m.stats.numel, "q1": m.stats.q1, "q3": m.stats.q3}
                 for m in stats}
        path = self._file(index)
        tmp = temp_path(path, "tmp")
        try:
            save_file({m.name: m.stats.values_sorted.contiguous() for m in stats}, tmp,
                      metadata={"matrices": json.dumps(facts), "block": str(index)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def block_matrices(lazy) -> list[list[str]]:
    """Per decoder block, the full names of its quantizable matrices (nn.Linear), in module order."""
    from core.models import quantizable_linears

    names: list[list[str]] = [[] for _ in lazy.blocks]
    for name in quantizable_linears(lazy.skeleton):
        names[_block_of(name, lazy.block_prefix)].append(name)
    return names


def _block_of(name: str, prefix: str) -> int:
    rest = name[len(prefix) + 1:] if prefix else name
    return int(rest.split(".", 1)[0])


def matrix_stats(lazy, name: str) -> MatrixStats:
    """One matrix condensed, read from its file alone."""
    weight = lazy.tensor(f"{name}.weight")
    return MatrixStats(name, tuple(weight.shape), condense(weight))


def condense(weight: torch.Tensor) -> OutlierStats:
    """``OutlierStats.of(weight)`` (no Fisher), equal to it value for value, in linear time for 16-bit
    weights: a bf16/fp16 matrix has at most 65,536 distinct values, so counting each bit pattern gives
    the sorted entries without sorting (an 8 B model's 58.7 M-entry matrix: a count instead of a sort)."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return OutlierStats.of(weight)
    codes = weight.detach().reshape(-1).cpu().view(torch.int16).to(torch.int32) & 0xFFFF  # the bit patterns
    counts = torch.bincount(codes, minlength=1 << 16).numpy()
    value_of = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(weight.dtype).float().numpy()
    order = np.argsort(value_of, kind="stable")  # NaN patterns last, as np.sort puts them
    values, ends = value_of[order], np.cumsum(counts[order])  # ends[i]: entries up to value i, sorted

    def at(positions: np.ndarray) -> np.ndarray:
        """The entries at these 0-based positions of the sorted matrix."""
        return values[np.searchsorted(ends, positions, side="right")]

    n = codes.numel()
    q1, q3 = (_interpolated(at, q * (n - 1)) for q in (0.25, 0.75))
    if n > SKETCH_SIZE:
        sketch = at(np.linspace(0, n - 1, SKETCH_SIZE).round().astype(np.int64))
    else:
        sketch = np.repeat(values, counts[order])
    return OutlierStats(n, q1, q3, torch.from_numpy(np.ascontiguousarray(sketch, dtype=np.float32)), torch.empty(0))


def _interpolated(at, position: float) -> float:
    """numpy's linear interpolation between the sorted entries around ``position`` (core.outliers.quartiles)."""
    lo, hi = math.floor(position), math.ceil(position)
    v_lo, v_hi = (float(v) for v in at(np.array([lo, hi])))
    return v_lo + (v_hi - v_lo) * (position - lo)


def collect_lazy_stats(lazy, cache: StatsCache | None = None) -> Generator[ProgressEvent, None, list[MatrixStats]]:
    """Every quantizable matrix condensed (``core.preview.MatrixStats`` in block order), block by block.

    Cached blocks are read back; each computed block is written to ``cache`` when it is complete, so
    closing the generator (cancel) loses at most the block in progress.
    """
    blocks = block_matrices(lazy)
    total = sum(len(names) for names in blocks)
    done = 0
    result: list[MatrixStats] = []
    for index, names in enumerate(blocks):
        cached = cache.get(index) if cache is not None and cache.has(index) else None
        if cached is not None and [m.name for m in cached] == names:
            result += cached
            done += len(names)
            yield ProgressEvent("stats", done, total, f"block {index + 1}/{len(blocks)}: from the cache",
                                item=lazy.block_name(index))
            continue
        block = []
        for name in names:
            block.append(matrix_stats(lazy, name))
            done += 1
            yield ProgressEvent("stats", done, total, f"block {index + 1}/{len(blocks)}: {name}")
        if cache is not None:
            cache.put(index, block)
        result += block
        yield ProgressEvent("stats", done, total, f"block {index + 1}/{len(blocks)} done",
                            item=lazy.block_name(index))
    return result
