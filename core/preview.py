"""What a quantization setting will do, before anything is quantized.

``collect_stats`` condenses each quantizable matrix once (seconds); ``preview`` then
answers "how many outliers / sensitive values, what sparse share, how many bits per
weight, how large a file" for any setting in milliseconds, so the studio's readouts
follow a slider live and ``squeeze inspect`` prints a table.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch

from core.config import QuantConfig
from core.outliers import OutlierStats, solve_range_multiplier
from core.progress import ProgressEvent

LUT_BYTES_PER_ENTRY = 2  # fp16 lookup tables
SPARSE_BYTES_PER_ENTRY = 8  # fp32 value + int32 column


@dataclass(frozen=True)
class MatrixStats:
    name: str
    shape: tuple[int, int]  # (out, in)
    stats: OutlierStats


@dataclass(frozen=True)
class LayerPreview:
    name: str
    shape: tuple[int, int]
    threshold: float | None
    outliers: int
    sensitive: int
    sparse: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Preview:
    """The predicted effect of one QuantConfig on a model."""

    range_multiplier: float | None
    layers: tuple[LayerPreview, ...]
    quantized_bytes: int  # packed codes + LUTs + sparse part of the quantizable layers
    other_bytes: int  # everything else as the folder stores it (norms; embedding and head at their widths)
    original_bytes: int  # the whole model as loaded
    embed_head_bytes: int = 0  # of other_bytes: the token embedding and output head at the setting's widths

    @property
    def n_weights(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparse_percent(self) -> float:
        return 100.0 * sum(layer.sparse for layer in self.layers) / max(1, self.n_weights)

    @property
    def outlier_percent(self) -> float:
        return 100.0 * sum(layer.outliers for layer in self.layers) / max(1, self.n_weights)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.quantized_bytes / max(1, self.n_weights)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def packed_layer_bytes(out_features: int, in_features: int, bits: int, nnz: int) -> int:
    """Bytes a SqueezeLinear stores: codes (input padded to 32), fp16 LUT, CSR sparse part."""
    codes = math.ceil(in_features / 32) * bits * out_features * 4
    lut = out_features * (1 << bits) * LUT_BYTES_PER_ENTRY
    sparse = nnz * SPARSE_BYTES_PER_ENTRY + (out_features + 1) * 4
    return codes + lut + sparse


def collect_stats(model: torch.nn.Module, fisher: dict[str, torch.Tensor] | None = None
                  ) -> Generator[ProgressEvent, None, list[MatrixStats]]:
    """Condense every quantizable matrix (weights, and Fisher ranking when given)."""
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    result = []
    for i, (name, lin) in enumerate(linears.items()):
        f = fisher.get(name) if fisher is not None else None
        result.append(MatrixStats(name, tuple(lin.weight.shape), OutlierStats.of(lin.weight, f)))
        yield ProgressEvent("stats", i + 1, len(linears), f"statistics: {name}")
    return result


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the quantizable linear weights, bytes of everything else) as stored now."""
    from core.models import quantizable_linears

    quantizable = {id(lin.weight) for lin in quantizable_linears(model).values()}
    seen: set[int] = set()
    q_bytes = o_bytes = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        n = tensor.numel() * tensor.element_size()
        if id(tensor) in quantizable:
            q_bytes += n
        else:
            o_bytes += n
    return q_bytes, o_bytes


@dataclass(frozen=True)
class EmbedHeadSizes:
    """A model's token embedding and output head, for size estimates (core.embed_head).

    rows x cols: the embedding's shape (vocabulary x hidden); has_head: an output head over the
    vocabulary exists; tied: it is the embedding's tensor; stored_bytes: what they take now within
    the ``other_bytes`` a caller passes to ``preview`` (a tied pair once).
    """

    rows: int
    cols: int
    tied: bool
    has_head: bool
    stored_bytes: int

    def folder_bytes(self, config: QuantConfig) -> int:
        """Bytes the pair takes in a folder quantized with ``config``: LUT codes at ``embed_bits`` /
        ``head_bits`` (a tied pair once, at the larger width; the sparse share of the setting's outlier
        target and sensitivity), or float16 at 16 bits."""
        from core.embed_head import stored_bits

        embed_bits, head_bits = stored_bits(config.embed_bits, config.head_bits, self.tied, self.cols)
        widths = [embed_bits] + ([head_bits] if self.has_head and not self.tied else [])
        sparse = 0.0
        if config.method == "squeezellm":
            sparse = ((config.outliers.percent or 0.0) + config.sensitivity_percent) / 100
        total = 0
        for bits in widths:
            if bits >= 16:
                total += self.rows * self.cols * 2
            else:
                total += packed_layer_bytes(self.rows, self.cols, bits, math.ceil(sparse * self.rows * self.cols))
        return total


def embed_head_sizes(model: torch.nn.Module, dtypes: dict[str, torch.dtype] | None = None) -> EmbedHeadSizes | None:
    """``EmbedHeadSizes`` of an original model (meta tensors are fine); dtypes: parameter name -> dtype in
    its files (default: as held). None when the model has no embedding found by discovery."""
    from core.embed_head import find_embed_head

    found = find_embed_head(model)
    if found is None:
        return None
    names = [found.embedding_weight] + ([found.head_weight] if found.head and not found.tied else [])
    stored = 0
    for name in names:
        tensor = model.get_parameter(name)
        dtype = (dtypes or {}).get(name, tensor.dtype)
        stored += tensor.numel() * dtype.itemsize
    rows, cols = model.get_parameter(found.embedding_weight).shape
    return EmbedHeadSizes(int(rows), int(cols), found.tied, found.head is not None, stored)


def preview(stats: list[MatrixStats], config: QuantConfig, other_bytes: int, original_bytes: int,
            embed_head: EmbedHeadSizes | None = None) -> Preview:
    """The effect of ``config`` (bits, outliers, sensitivity) on the condensed matrices. Fast.

    other_bytes: every other tensor as stored now; with ``embed_head`` the embedding and head in it are
    replaced by what the folder will store at the setting's widths (``EmbedHeadSizes.folder_bytes``).
    """
    outliers = config.outliers
    multiplier = None
    if config.method == "squeezellm" and outliers.enabled:
        multiplier = outliers.range_multiplier
        if multiplier is None:
            multiplier = solve_range_multiplier([m.stats for m in stats], outliers.percent)
    sensitivity = config.sensitivity_percent if config.method == "squeezellm" else 0.0
    layers = []
    total = 0
    for m in stats:
        threshold = m.stats.threshold(multiplier) if multiplier is not None else None
        n_out, n_sens, n_sparse = m.stats.sparse_count(threshold, sensitivity)
        if not m.stats.abs_by_fisher.numel():  # no Fisher yet: sensitive values counted, overlap unknown
            from core.outliers import sensitive_count

            n_sens = sensitive_count(m.stats.numel, sensitivity)
            n_sparse = n_out + n_sens
        layers.append(LayerPreview(m.name, m.shape, threshold, n_out, n_sens, n_sparse))
        total += _layer_bytes(m.shape, config, n_sparse)
    pair = embed_head.folder_bytes(config) if embed_head is not None else 0
    if embed_head is not None:
        other_bytes = other_bytes - embed_head.stored_bytes + pair
    return Preview(multiplier, tuple(layers), round(total), other_bytes, original_bytes, pair)


def _layer_bytes(shape: tuple[int, int], config: QuantConfig, nnz: int) -> float:
    """Stored bytes of one matrix; with ``target_bits`` the budget is taken as met exactly, as if a
    share (target - low) of every matrix were at the upper width (the real split is per matrix)."""
    if config.target_bits is None:
        return packed_layer_bytes(shape[0], shape[1], config.bits, nnz)
    low, high = config.widths
    share = (config.target_bits - low) / (high - low)
    return ((1 - share) * packed_layer_bytes(shape[0], shape[1], low, nnz)
            + share * packed_layer_bytes(shape[0], shape[1], high, nnz))
