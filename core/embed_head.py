"""The token embedding and the output head quantized with SqueezeLLM's per-row lookup tables.

In a small model with a large vocabulary the embedding and the head (lm_head, often the same tied
matrix) are a large share of the file: 49152 x 576 in the demo model, half of its 4-bit folder in
float16. Here they are quantized like the projections (per-row Fisher-weighted k-means, packed
codes, an optional dense-and-sparse residual) at a width of their own: 4, 5, 6 or 8 bits, or 16 =
float16 storage as before (``core.half_head``).

* ``SqueezeEmbedding``: a ``SqueezeLinear`` [num_embeddings, embedding_dim] whose forward is a
  lookup: only the looked-up rows are dequantized (``kernels.lookup_rows``), then multiplied by
  the scale the original module applied (Gemma's sqrt(hidden) embedding scale, found by probing
  the module, never by its class name);
* an untied head is a plain ``SqueezeLinear`` (the LUT mat-vec over the vocabulary rows);
* a tied head is a ``TiedHead``: the embedding's tensors used as a linear layer, so the pair is
  stored once (under the embedding's name) and serves both.

The modules are found by discovery (``get_input_embeddings`` / ``get_output_embeddings`` and
whether the two share one tensor). A folder records them in ``quantization_config["embed_head"]``
(``record``), apart from the projections' ``modules``, and ``install`` rebuilds them (empty, for
``load_state_dict(..., assign=True)``).

Weighting: the head's rows by their Fisher (the squared loss gradient of the head weight, summed
over the calibration windows), a tied pair likewise; an untied embedding by how often each token
occurs in the calibration text (``token_fisher``) or unweighted (``EMBED_WEIGHTINGS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from core import kernels
from core.errors import UserError
from core.layers import SqueezeLinear

RECORD_KEY = "embed_head"  # the quantization_config key of the record


class SqueezeEmbedding(SqueezeLinear):
    """Token embedding stored as LUT codes: ``forward(ids)`` = rows ``ids`` of the table times ``scale``.

    The buffers are a ``SqueezeLinear``'s with out_features = num_embeddings and in_features =
    embedding_dim (row t of the dense weight is token t's vector), so ``dequantize()``, ``layout()``
    and ``storage_bytes()`` describe the table as any quantized matrix (an exporter writes
    ``<name>.weight`` from ``dequantize()``, unscaled like the original weight). scale: what the
    original module multiplied its rows by (1.0 for a plain embedding). out_dtype: dtype of the
    returned rows (the model's compute dtype). Non-persistent buffers of the module it replaces
    (Gemma's ``embed_scale``) are kept as they were.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, nnz: int = 0,
                 lut_dtype: torch.dtype = torch.float16, scale: float = 1.0, padding_idx: int | None = None,
                 out_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, bits, nnz, False, lut_dtype, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scale, self.padding_idx, self.out_dtype = float(scale), padding_idx, out_dtype

    @classmethod
    def from_table(cls, table: SqueezeLinear, scale: float = 1.0, padding_idx: int | None = None,
                   out_dtype: torch.dtype = torch.float32) -> SqueezeEmbedding:
        """The embedding holding ``table``'s tensors (no copy); table: [num_embeddings, embedding_dim], no bias."""
        module = cls(table.out_features, table.in_features, table.bits, table.nnz, table.lut_dtype, scale,
                     padding_idx, out_dtype, device="meta")
        for name in ("qweight", "lookup_table", "sparse_rows", "sparse_cols", "sparse_vals"):
            module._buffers[name] = table._buffers[name]
        return module

    @classmethod
    def from_record(cls, info: dict, out_dtype: torch.dtype = torch.float32, device="meta") -> SqueezeEmbedding:
        """An empty module (meta tensors) of the sizes an ``embed_head`` record's "embedding" entry gives."""
        from core.layers import _dtype_from_name

        return cls(int(info["out_features"]), int(info["in_features"]), int(info["bits"]), int(info.get("nnz", 0)),
                   _dtype_from_name(info.get("lut_dtype") or "float16"), float(info.get("scale") or 1.0),
                   info.get("padding_idx"), out_dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int [...] -> out_dtype [..., embedding_dim]."""
        b = self._buffers
        rows = kernels.lookup_rows(input_ids, b["qweight"], b["lookup_table"], self.bits, self.embedding_dim,
                                   b["sparse_rows"], b["sparse_cols"], b["sparse_vals"])
        if self.scale != 1.0:
            rows = rows * self.scale
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, nnz={self.nnz}, scale={self.scale:g}"


class TiedHead(nn.Module):
    """The output head of a tied pair: the embedding's table used as a linear layer (one stored copy).

    The embedding is held as a plain attribute, not a submodule, so the state_dict holds the table once
    (under the embedding). bias: float [vocab] or None (a tied head rarely has one).
    """

    def __init__(self, embedding: SqueezeEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not registered: no second copy in the state_dict
        self.register_buffer("bias", bias)

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def bits(self) -> int:
        return self.embedding.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., embedding_dim] -> logits [..., num_embeddings] in x's dtype (the LUT mat-vec)."""
        t = self.embedding._buffers
        return kernels.lut_matmul(x, t["qweight"], t["lookup_table"], self.embedding.bits, self.in_features,
                                  t["sparse_rows"], t["sparse_cols"], t["sparse_vals"], self._buffers["bias"])

    def extra_repr(self) -> str:
        return f"tied to the embedding, in_features={self.in_features}, out_features={self.out_features}"


# ---------------------------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class EmbedHead:
    """Where a model's token embedding and output head are (module paths) and how they relate.

    head: None when the model has no output embedding module (or it is not a linear layer over the
    vocabulary). weight names: the parameter names of their weights (as in the checkpoint).
    """

    embedding: str
    head: str | None
    tied: bool

    @property
    def embedding_weight(self) -> str:
        return f"{self.embedding}.weight"

    @property
    def head_weight(self) -> str | None:
        return f"{self.head}.weight" if self.head is not None else None


def find_embed_head(model: nn.Module) -> EmbedHead | None:
    """The embedding and head of a transformers model by discovery, or None when there is no quantizable
    embedding (no ``get_input_embeddings``, or it is not an embedding-shaped module with a 2-D weight)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding) or embedding.weight.dim() != 2:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != tuple(embedding.weight.shape):
        head = None
    tied = head is not None and _same_tensor(head.weight, embedding.weight)
    return EmbedHead(names[id(embedding)], names[id(head)] if head is not None else None, tied)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.is_meta or b.is_meta:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape


def lookup_scale(embedding: nn.Module) -> float:
    """The factor ``embedding``'s forward multiplies the rows of its weight by (1.0 for nn.Embedding,
    sqrt(hidden) for Gemma's scaled embedding), measured on a few rows.

    UserError when the forward is not a scaled row lookup (the module does something a quantized
    table cannot reproduce).
    """
    weight = embedding.weight.detach()
    ids = torch.arange(min(64, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        got = embedding(ids).float()
    rows = F.embedding(ids, weight).float()
    scale = float((got * rows).sum() / (rows * rows).sum().clamp_min(1e-30))
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if got.shape != rows.shape or not torch.allclose(got, rows * scale, rtol=tolerance, atol=tolerance * scale):
        raise UserError(f"the token embedding ({type(embedding).__name__}) does more than look up scaled rows, "
                        "so it cannot be stored quantized: use --embed-bits 16")
    return 1.0 if abs(scale - 1.0) < tolerance else scale


# ---------------------------------------------------------------------------------------------- weighting

def token_fisher(windows: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """Per-weight k-means weights for an untied embedding [vocab, hidden]: every entry of row t weighs
    the number of times token t occurs in the calibration windows (int [n, seqlen]); None without windows.
    Rows of tokens that never occur get weight 0 (k-means treats an all-zero row as unweighted)."""
    if windows is None:
        return None
    counts = torch.bincount(windows.reshape(-1).to(torch.int64).clamp(0, shape[0] - 1), minlength=shape[0])
    return counts[: shape[0]].to(torch.float32)[:, None].expand(shape).contiguous()


def stored_bits(embed_bits: int, head_bits: int, tied: bool, row_width: int) -> tuple[int, int]:
    """(embedding bits, head bits) as stored: a tied pair is stored once, at the larger of the two widths;
    a width whose packed codes and per-row lookup table would not be smaller than the row in float16
    (narrow rows: 64 values at 6 bits take 48 + 128 bytes against 128) is stored as float16 (16).
    row_width: the embedding dimension (values per row)."""
    if tied:
        embed_bits = head_bits = max(embed_bits, head_bits)
    return _worth_codes(embed_bits, row_width), _worth_codes(head_bits, row_width)


def _worth_codes(bits: int, row_width: int) -> int:
    from core.preview import packed_layer_bytes

    return bits if bits < 16 and packed_layer_bytes(1, row_width, bits, 0) < 2 * row_width else 16


# ---------------------------------------------------------------------------------------------- quantize

def quantize_table(weight: torch.Tensor, fisher: torch.Tensor | None, bits: int, config,
                   range_multiplier: float | None, bias: torch.Tensor | None = None) -> SqueezeLinear:
    """One [rows, hidden] matrix (embedding or head) as a ``SqueezeLinear`` of ``bits`` bits.

    config: the run's QuantConfig (k-means iterations, seed, sensitivity share). range_multiplier: the
    run's IQR multiplier for outliers (None: no outliers); the dense-and-sparse split follows the
    projections' settings, so a dense-only run stores no residual here either.
    """
    from core.outliers import iqr_threshold, quartiles
    from core.quantize import quantize_matrix

    threshold = None
    if range_multiplier is not None:
        q1, q3 = quartiles(weight)
        threshold = iqr_threshold(q1, q3, range_multiplier)
    sensitivity = config.sensitivity_percent if fisher is not None else 0.0
    q = quantize_matrix(weight, fisher, bits, threshold=threshold, sensitivity_percent=sensitivity,
                        max_iter=config.kmeans_max_iter, seed=config.seed)
    return SqueezeLinear.from_parts(q.codes, q.lookup_table, bits, sparse=q.sparse, bias=bias)


def quantized_modules(model: nn.Module, config, head_fisher: torch.Tensor | None = None,
                      windows: torch.Tensor | None = None, range_multiplier: float | None = None
                      ) -> dict[str, nn.Module]:
    """Module path -> quantized replacement for ``model``'s embedding and head, per ``config.embed_bits`` /
    ``config.head_bits`` (a width of 16 leaves that module out); ``model`` itself is not changed.

    head_fisher: float32 [vocab, hidden], the Fisher of the head weight (a tied pair's too), or None
    for unweighted k-means. windows: the calibration token ids, for an untied embedding weighted by
    token frequency (``config.embed_weighting``). The embedding's and head's weights must be loaded.
    """
    found = find_embed_head(model)
    if found is None:
        return {}
    embedding = model.get_submodule(found.embedding)
    embed_bits, head_bits = stored_bits(config.embed_bits, config.head_bits, found.tied, embedding.weight.shape[1])
    head = model.get_submodule(found.head) if found.head is not None else None
    result: dict[str, nn.Module] = {}
    new_embedding = None
    if embed_bits < 16:
        weight = embedding.weight.detach()
        if found.tied:
            fisher = head_fisher
        else:
            fisher = token_fisher(windows, tuple(weight.shape)) if config.embed_weighting == "frequency" else None
        table = quantize_table(weight, fisher, embed_bits, config, range_multiplier)
        new_embedding = SqueezeEmbedding.from_table(table, lookup_scale(embedding), embedding.padding_idx)
        _keep_extra_buffers(embedding, new_embedding)
        result[found.embedding] = new_embedding
    if head is not None and head_bits < 16:
        bias = head.bias.detach() if head.bias is not None else None
        if found.tied:
            result[found.head] = TiedHead(new_embedding, bias)
        else:
            result[found.head] = quantize_table(head.weight.detach(), head_fisher, head_bits, config,
                                                range_multiplier, bias)
    return result


def install(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put ``replacements`` (module path -> module) into ``model``; a quantized tied pair is no longer
    tied by transformers (its ``tie_weights`` would look for the weight the pair no longer has)."""
    for name, module in replacements.items():
        model.set_submodule(name, module)
    if any(isinstance(m, TiedHead) for m in replacements.values()):
        _stop_transformers_tying(model)


def _stop_transformers_tying(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_tied_weights_keys"):
            module._tied_weights_keys = None  # instance attribute: get_expanded_tied_weights_keys -> {}
        if hasattr(module, "all_tied_weights_keys"):
            module.all_tied_weights_keys = {}


def _keep_extra_buffers(original: nn.Module, replacement: nn.Module) -> None:
    """The original module's non-persistent buffers (Gemma's ``embed_scale``) stay readable on the replacement."""
    for name, buffer in original.named_buffers(recurse=False):
        if name in original._non_persistent_buffers_set and not hasattr(replacement, name):
            replacement.register_buffer(name, buffer, persistent=False)


def quantize_embed_head(model: nn.Module, config, head_fisher: torch.Tensor | None = None,
                        windows: torch.Tensor | None = None, range_multiplier: float | None = None) -> dict | None:
    """``quantized_modules`` installed into ``model`` in place; returns the folder record or None."""
    replacements = quantized_modules(model, config, head_fisher, windows, range_multiplier)
    install(model, replacements)
    return record(model, replacements)


# ---------------------------------------------------------------------------------------------- folders

def record(model: nn.Module, replacements: dict[str, nn.Module] | None = None) -> dict | None:
    """The JSON-ready ``quantization_config["embed_head"]`` entry for ``model``'s quantized embedding and
    head (``replacements``: module path -> module, default: found in the model), or None when neither is.

    {"embedding": {"name", "scale", "padding_idx", **SqueezeLinear.layout()},
     "head": {"name", "tied": true, "bias"} or {"name", "tied": false, **SqueezeLinear.layout()}};
    each entry only when that module is quantized.
    """
    if replacements is None:
        replacements = {name: m for name, m in model.named_modules()
                        if isinstance(m, (SqueezeEmbedding, TiedHead)) or m is model.get_output_embeddings()
                        and isinstance(m, SqueezeLinear)}
    result = {}
    for name, module in replacements.items():
        if isinstance(module, SqueezeEmbedding):
            result["embedding"] = {"name": name, "scale": module.scale, "padding_idx": module.padding_idx,
                                   **module.layout()}
        elif isinstance(module, TiedHead):
            result["head"] = {"name": name, "tied": True, "bias": module.bias is not None,
                              "bias_dtype": str(module.bias.dtype).removeprefix("torch.")
                              if module.bias is not None else None}
        elif isinstance(module, SqueezeLinear):
            result["head"] = {"name": name, "tied": False, **module.layout()}
    return result or None


def state_tensors(replacements: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> tensor of every stored tensor of the replacements (the tied table once, under the embedding)."""
    tensors = {}
    for name, module in replacements.items():
        tensors.update({f"{name}.{key}": value.detach().cpu().contiguous()
                        for key, value in module.state_dict().items()})
    return tensors


def replaced_weights(record_: dict) -> set[str]:
    """Parameter names of the original model that a record's modules replace (their dense weights)."""
    names = set()
    for part in ("embedding", "head"):
        if part in record_:
            names.add(record_[part]["name"] + ".weight")
            if part == "head" and not record_[part]["tied"] and record_[part].get("bias"):
                names.add(record_[part]["name"] + ".bias")
    return names


def empty_modules(model: nn.Module, record_: dict, out_dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Module path -> empty (meta) module of ``record_`` to load a folder's tensors into with
    ``load_state_dict(..., assign=True)``; ``model`` supplies the modules they replace (their
    non-persistent buffers are kept). UserError for a record that cannot be rebuilt."""
    from core.layers import _dtype_from_name

    replacements: dict[str, nn.Module] = {}
    embedding = None
    try:
        if "embedding" in record_:
            info = record_["embedding"]
            embedding = SqueezeEmbedding.from_record(info, out_dtype)
            _keep_extra_buffers(model.get_submodule(info["name"]), embedding)
            replacements[info["name"]] = embedding
        if "head" in record_:
            info = record_["head"]
            if info.get("tied"):
                if embedding is None:
                    raise ValueError("a tied head without a quantized embedding")
                bias = None
                if info.get("bias"):
                    bias = torch.empty(embedding.num_embeddings, dtype=_dtype_from_name(info.get("bias_dtype")
                                                                                        or "float32"), device="meta")
                replacements[info["name"]] = TiedHead(embedding, bias)
            else:
                replacements[info["name"]] = SqueezeLinear.from_layout(info)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"config.json describes a quantized embedding or head that cannot exist ({exc}): the folder "
                        "is corrupt or was edited; quantize the model again") from exc
    return replacements


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized embedding and head weights of a loaded model, float32, by the parameter names the
    original model has ("model.embed_tokens.weight", and "lm_head.weight" for an untied quantized head);
    empty when neither is quantized. For exporters that write dense tensors (GGUF): the embedding's
    scale is not applied (the original weight is unscaled too)."""
    return {f"{name}.weight": module.dequantize() for name, module in model.named_modules()
            if isinstance(module, SqueezeEmbedding)
            or isinstance(module, SqueezeLinear) and module is model.get_output_embeddings()}
