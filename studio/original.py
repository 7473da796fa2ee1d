"""An original model as the studio holds it: opened lazily, its weights read from the files on demand.

Opening reads config.json and the safetensors headers only (``core.lazy_model.LazyModel``: a skeleton
on the meta device), so an 8 B model opens in seconds with no weight in memory. What needs weights
asks for them: one matrix for a histogram (``matrix``), one matrix at a time for the outlier
statistics (``core.lazy_stats``), the whole model in its stored dtype (bf16/fp16 stay bf16/fp16) for
Evaluate and Chat (``dense``, loaded once in a job and kept), and a float32 copy for the whole-model
sensitivity of the Inspect page (``float32_copy``, not kept).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import torch

from core.errors import UserError
from core.models import LoadedModel
from core.progress import ProgressEvent

# Share of the free memory a whole-model load may take; the rest is left for the work itself.
LOAD_SHARE = 0.9
# Bytes per parameter of the whole-model sensitivity: float32 weights, gradients and the Fisher sums.
SENSITIVITY_BYTES_PER_PARAMETER = 12


class OriginalModel:
    """An original (not quantized) model opened lazily.

    lazy: the ``LazyModel`` (skeleton on meta, tensors read on demand); folder: the safetensors folder
    behind ``source`` (what the user gave: "demo", a folder, a .gguf file, a hub name); dense: the whole
    model in its stored dtype once a job has loaded it (Evaluate, Chat), else None.
    """

    quantized = False

    def __init__(self, lazy, source: str, name: str) -> None:
        self.lazy = lazy
        self.folder: Path = lazy.folder
        self.source = source
        self.name = name
        self.dense: LoadedModel | None = None

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.lazy.stored_dtype

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.lazy.skeleton.parameters())

    def matrix_names(self) -> list[str]:
        """Full names of the quantizable matrices (the Linear layers inside the blocks), in block order."""
        from core.models import quantizable_linears

        return list(quantizable_linears(self.lazy.skeleton))

    def matrix(self, name: str) -> torch.Tensor:
        """The stored weight [out, in] of matrix ``name``, read from its file alone (stored dtype)."""
        return self.lazy.tensor(f"{name}.weight")

    def load_dense(self) -> Generator[ProgressEvent, None, LoadedModel]:
        """The whole model in its stored dtype, loaded once (then kept for the next job)."""
        if self.dense is None:
            self.dense = yield from self._load(self.stored_dtype, "to run it")
        return self.dense

    def float32_copy(self) -> Generator[ProgressEvent, None, LoadedModel]:
        """A float32 copy of the whole model for gradients (not kept); the stored one when that is float32."""
        if self.dense is not None and self.dense.model.dtype == torch.float32:
            return self.dense
        need = self.parameters * SENSITIVITY_BYTES_PER_PARAMETER
        return (yield from self._load(torch.float32, "for the sensitivity of the whole model", need))

    def _load(self, dtype: torch.dtype, purpose: str,
              need: int | None = None) -> Generator[ProgressEvent, None, LoadedModel]:
        from core.memory_plan import available_memory
        from core.models import load_model
        from core.units import format_bytes

        element = torch.empty(0, dtype=dtype).element_size()
        need = need or self.parameters * element
        free = available_memory()
        if need > LOAD_SHARE * free:
            raise UserError(f"{self.name} needs about {format_bytes(need)} of memory {purpose}, and "
                            f"{format_bytes(free)} is free: close other programs, use a quantized result "
                            "instead, or quantize it (the Quantize page works one block at a time)")
        dtype_name = str(dtype).removeprefix("torch.")
        yield ProgressEvent("load", 0, 1, f"loading {self.name} in {dtype_name} ({format_bytes(need)})…")
        loaded = load_model(str(self.folder), dtype=dtype)
        yield ProgressEvent("load", 1, 1, f"loaded {self.name}")
        return LoadedModel(loaded.model, loaded.tokenizer, self.source, self.name, False)


def display_name(spec: str, folder: Path) -> str:
    """The short name of a model: the demo's, a .gguf file's stem, a hub name, or the folder's name."""
    from core.models import DEMO_NAME

    text = spec.strip()
    if text == "demo":
        return DEMO_NAME
    path = Path(text).expanduser()
    if path.is_file():
        return path.stem
    if not path.exists():
        return text  # a hub name: its snapshot folder is a hash
    return folder.name


def open_original(spec: str) -> Generator[ProgressEvent, None, OriginalModel]:
    """Open ``spec`` lazily (a .gguf file is converted once, cached); UserError for bad input."""
    from core.lazy_model import LazyModel, resolve_folder

    folder = yield from resolve_folder(spec)
    lazy = LazyModel.open(folder)  # computes in float32, as a quantization run on the CPU does
    return OriginalModel(lazy, spec.strip(), display_name(spec, Path(folder)))

