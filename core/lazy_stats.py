"""Outlier statistics of a model too big to load: one matrix at a time from its safetensors files.

``collect_lazy_stats(lazy)`` condenses every quantizable matrix of a ``core.lazy_model.LazyModel``
(``core.preview.MatrixStats``, the input of the live previews), reading each matrix from the shards
on its own, so the peak is one matrix and its temporaries (~0.5 GB for an 8 B model's MLP matrix),
plus the condensed statistics kept (``core.outliers.OutlierStats``: a 16-bit matrix's distinct values
and their counts, a few kilobytes; at most ``SKETCH_SIZE`` float32 values of a float32 matrix).

Each finished block is cached on disk (``StatsCache``: one safetensors file per block, keyed by the
folder's fingerprint ``core.lazy_model.folder_fingerprint``), so a cancelled pass resumes at the first
missing block and a second visit reads the cache in seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path

import torch

from core.outliers import SKETCH_SIZE, OutlierStats
from core.preview import MatrixStats
from core.progress import ProgressEvent

CACHE_FORMAT = 2  # 2: 16-bit matrices as distinct values + cumulative counts


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
                keys = set(handle.keys())
                return [MatrixStats(name, tuple(fact["shape"]),
                                    OutlierStats(fact["numel"], fact["q1"], fact["q3"], handle.get_tensor(name),
                                                 handle.get_tensor(f"{name}:ends") if f"{name}:ends" in keys else None,
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
            tensors = {m.name: m.stats.values.contiguous() for m in stats}
            tensors.update({f"{m.name}:ends": m.stats.ends.contiguous() for m in stats if m.stats.ends is not None})
            save_file(tensors, tmp,
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
    return MatrixStats(name, tuple(weight.shape), OutlierStats.of(weight))


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
