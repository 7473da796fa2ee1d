"""What the studio shows about a model, for original and quantized models alike.

An original is opened lazily (``studio.original.OriginalModel``) and described from its skeleton and
the safetensors headers: shapes, dtypes and sizes without reading a weight. A quantized model
(``SqueezeLinear`` / baseline layers, found by their ``layout()``) is described from its quantized
modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core.models import LoadedModel, quantizable_linears
from core.preview import embed_head_sizes, packed_layer_bytes

# The size estimates on the model page assume the default sparse share (0.45% outliers + 0.05% sensitive).
DEFAULT_SPARSE_FRACTION = 0.005


@dataclass
class ModelInfo:
    """Facts about a model. layers: rows of {name, shape [out, in], parameters, dtype}.

    memory_bytes: the model's tensors as held when loaded (an original: in its stored dtype);
    resident_bytes: what is in memory now, when that differs (an original opened lazily).
    """

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
    stored_dtype: str | None = None  # an original's dtype in its files ("bfloat16")
    resident_bytes: int | None = None
    embed_head: object | None = None  # an original's core.preview.EmbedHeadSizes (its embedding and head)

    @property
    def quantizable_parameters(self) -> int:
        return sum(row["parameters"] for row in self.layers)


def quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> quantized layer (anything with ``layout()`` and ``dequantize()``), in module order."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "layout", None)) and callable(getattr(m, "dequantize", None))}


def matrix_names(model) -> list[str]:
    """The quantizable matrices of an original (OriginalModel) or a quantized LoadedModel, in order."""
    if model.quantized:
        return list(quantized_modules(model.model))
    return model.matrix_names()


def matrix_weight(model, name: str) -> torch.Tensor:
    """float32 [out, in] on the CPU: an original's stored weight read from its file, or the effective
    weight of a quantized layer."""
    if model.quantized:
        return quantized_modules(model.model)[name].dequantize().detach().float().cpu()
    return model.matrix(name).float()


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


def describe(model) -> ModelInfo:
    """A ModelInfo for an OriginalModel (from its skeleton and headers) or a quantized LoadedModel."""
    if model.quantized:
        return _describe_quantized(model)
    return _describe_original(model)


def _describe_original(original) -> ModelInfo:
    lazy = original.lazy
    skeleton = lazy.skeleton
    dtypes = lazy.stored_dtypes()  # from the safetensors headers
    linears = quantizable_linears(skeleton)
    rows, q_bytes = [], 0
    for name, linear in linears.items():
        dtype = dtypes.get(f"{name}.weight", lazy.stored_dtype)
        rows.append({"name": name, "shape": list(linear.weight.shape), "parameters": linear.weight.numel(),
                     "dtype": str(dtype).removeprefix("torch.")})
        q_bytes += linear.weight.numel() * dtype.itemsize
    quantizable = {f"{name}.weight" for name in linears}
    o_bytes = sum(param.numel() * dtypes.get(name, lazy.stored_dtype).itemsize
                  for name, param in skeleton.named_parameters() if name not in quantizable)
    resident = sum(t.numel() * t.element_size() for t in list(skeleton.parameters()) + list(skeleton.buffers())
                   if not t.is_meta)
    o_bytes += resident  # buffers computed at open (rotary frequencies)
    embed_head = embed_head_sizes(skeleton, dtypes)
    estimates = {bits: _estimated_other_bytes(o_bytes, embed_head, bits)
                 + sum(_estimated_layer_bytes(row["shape"], bits) for row in rows) for bits in (4, 3)}
    text = getattr(lazy.config, "text_config", None) or lazy.config
    return ModelInfo(original.name, original.source, False, type(skeleton).__name__, original.parameters,
                     len(lazy.blocks), getattr(text, "hidden_size", None), q_bytes + o_bytes, q_bytes, o_bytes,
                     rows, estimates, weights_file_bytes(original.source) or weights_file_bytes(str(original.folder)),
                     str(original.stored_dtype).removeprefix("torch."), resident, embed_head)


def estimated_folder_bytes(info: ModelInfo, config) -> int:
    """The whole folder an original would quantize to with ``config`` (a QuantConfig): projections at its
    width (the mixed target's average), the default sparse share, the embedding and head at their widths."""
    low, high = config.widths[0], config.widths[-1]
    share = (config.target_bits - low) / (high - low) if config.target_bits is not None else None
    layers = 0.0
    for row in info.layers:
        if share is None:
            layers += _estimated_layer_bytes(row["shape"], config.bits)
        else:
            layers += (1 - share) * _estimated_layer_bytes(row["shape"], low) + share * _estimated_layer_bytes(
                row["shape"], high)
    other = info.other_bytes
    if info.embed_head is not None:
        other = other - info.embed_head.stored_bytes + info.embed_head.folder_bytes(config)
    return int(other + layers)


def _estimated_other_bytes(other_bytes: int, embed_head, bits: int) -> int:
    """The tensors outside the projections as a folder of ``bits`` bits with the default embedding and head
    widths stores them (core.preview.EmbedHeadSizes)."""
    if embed_head is None:
        return other_bytes
    from core.config import QuantConfig

    return other_bytes - embed_head.stored_bytes + embed_head.folder_bytes(QuantConfig(bits=bits))


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
