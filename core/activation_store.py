"""Per-window activations of the block-major pass: in RAM within a budget, spilled to disk beyond it.

The forward sweep keeps every block's input for every calibration window (the backward sweep
recomputes each block from them). ``ActivationStore`` holds them on the CPU until ``budget_bytes``
is used, then writes further tensors as safetensors files into ``spill_dir`` (never pickles) and
reads them back on demand. Keys are strings chosen by the caller.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


class ActivationStore:
    """Tensors by key, RAM first, disk past ``budget_bytes`` (0: everything on disk)."""

    def __init__(self, budget_bytes: int, spill_dir: Path) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self.spill_dir = Path(spill_dir)
        self._ram: dict[str, torch.Tensor] = {}
        self._disk: set[str] = set()
        self.ram_bytes = 0
        self.peak_ram_bytes = 0
        self.spilled_bytes = 0

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (any device; stored detached on the CPU) under ``key``, replacing an older one."""
        self.drop(key)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.ram_bytes + size <= self.budget_bytes:
            self._ram[key] = tensor
            self.ram_bytes += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return
        from safetensors.torch import save_file

        self.spill_dir.mkdir(parents=True, exist_ok=True)
        save_file({"t": tensor}, self._path(key))
        self._disk.add(key)
        self.spilled_bytes += size

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (CPU). KeyError when there is none."""
        if key in self._ram:
            return self._ram[key]
        if key in self._disk:
            from safetensors.torch import load_file

            return load_file(self._path(key))["t"]
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def drop(self, key: str) -> None:
        tensor = self._ram.pop(key, None)
        if tensor is not None:
            self.ram_bytes -= tensor.numel() * tensor.element_size()
        if key in self._disk:
            self._disk.discard(key)
            self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self._ram.clear()
        self._disk.clear()
        self.ram_bytes = 0
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    def _path(self, key: str) -> Path:
        return self.spill_dir / f"{key}.safetensors"
