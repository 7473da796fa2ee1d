"""What the studio shows about a loaded model, for original and quantized models alike.

``core.models.model_summary`` describes a model whose projections are still ``nn.Linear``; a
quantized model (``SqueezeLinear`` / baseline layers, found by their ``layout()``) is described here
from its quantized modules instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core.models import LoadedModel, model_summary, quantizable_linears
from core.preview import model_bytes, packed_layer_bytes

# The size estimates on the model page assume the default sparse share (0.45% outliers + 0.05% sensitive).
DEFAULT_SPARSE_FRACTION = 0.005


@dataclass
class ModelInfo:
    """Facts about a loaded model. layers: rows of {name, shape [out, in], parameters, dtype}."""

    name: str
    source: str
    quantized: bool
    architecture: str
    parameters: int
    blocks: int
    hidden_size: int | None
    memory_bytes: int
    quantizable_bytes: int
    other_bytes: int
    layers: list[dict] = field(default_factory=list)
    estimated_bytes: dict[int, int] = field(default_factory=dict)  # bits -> whole model bytes
    file_bytes: int | None = None  # the weight files on disk, when the model came from disk

    @property
    def quantizable_parameters(self) -> int:
        return sum(row["parameters"] for row in self.layers)


def quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> quantized layer (anything with ``layout()`` and ``dequantize()``), in module order."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "layout", None)) and callable(getattr(m, "dequantize", None))}


def matrices(loaded: LoadedModel) -> dict[str, torch.nn.Module]:
    """The model's quantizable matrices: nn.Linear layers of an original, quantized layers otherwise."""
    if loaded.quantized:
        return quantized_modules(loaded.model)
    return dict(quantizable_linears(loaded.model))


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """float32 [out, in] on the CPU: the weight, or the effective weight of a quantized layer."""
    if callable(getattr(module, "dequantize", None)):
        return module.dequantize().detach().float().cpu()
    return module.weight.detach().float().cpu()


def weights_file_bytes(source: str) -> int | None:
    """Bytes of the weight files behind ``source`` (a .gguf file, or a folder's weight files)."""
    from pathlib import Path

    from core.models import demo_model_dir

    path = demo_model_dir() if source == "demo" else Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        files = [f for pattern in ("*.safetensors", "*.gguf", "*.bin") for f in path.glob(pattern)]
        return sum(f.stat().st_size for f in files) or None
    return None


def _stored_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def describe(loaded: LoadedModel) -> ModelInfo:
    """A ModelInfo for ``loaded`` (milliseconds; no weights are copied)."""
    model = loaded.model
    if loaded.quantized:
        return _describe_quantized(loaded)
    summary = model_summary(model)
    q_bytes, o_bytes = model_bytes(model)
    estimates = {bits: o_bytes + sum(_estimated_layer_bytes(row["shape"], bits) for row in summary["layers"])
                 for bits in (4, 3)}
    return ModelInfo(loaded.name, loaded.source, False, summary["architecture"], summary["parameters"],
                     summary["blocks"], summary["hidden_size"], summary["bytes"], q_bytes, o_bytes,
                     summary["layers"], estimates, weights_file_bytes(loaded.source))


def _estimated_layer_bytes(shape: list[int], bits: int) -> int:
    out_features, in_features = shape
    nnz = math.ceil(out_features * in_features * DEFAULT_SPARSE_FRACTION)
    return packed_layer_bytes(out_features, in_features, bits, nnz)


def _describe_quantized(loaded: LoadedModel) -> ModelInfo:
    model = loaded.model
    modules = quantized_modules(model)
    rows = []
    for name, module in modules.items():
        info = module.layout()
        kind = f"{info.get('bits', '?')}-bit LUT" if info.get("type", "squeeze") == "squeeze" else \
            f"{info.get('bits', '?')}-bit groups"
        nnz = info.get("nnz")
        rows.append({"name": name, "shape": [module.out_features, module.in_features],
                     "parameters": module.out_features * module.in_features,
                     "dtype": f"{kind} + {nnz} sparse" if nnz else kind})
    quantized_bytes = sum(int(m.storage_bytes()) for m in modules.values())
    memory = _stored_bytes(model)
    other_params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    blocks = {part for row in rows for part in row["name"].split(".") if part.isdigit()}
    return ModelInfo(loaded.name, loaded.source, True, type(model).__name__,
                     other_params + sum(r["parameters"] for r in rows), len(blocks),
                     getattr(config, "hidden_size", None), memory, quantized_bytes,
                     memory - quantized_bytes, rows, {}, weights_file_bytes(loaded.source))
