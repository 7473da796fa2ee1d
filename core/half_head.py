"""Token embedding and output head stored in float16, computed in float32.

Quantization leaves the token embedding and the output head (lm_head, usually the same tied
matrix) unquantized. In a small model that matrix is a large share of everything: 49152 x 576 in
the demo model, 113 MB in float32, read in full by the head for every generated token. Kept in
float16 it takes half the memory and half the bandwidth; the sums stay float32 (the embedding
rows are upcast, the head multiplies by the CPU kernel's fp16-weight mat-vec or by float32 copies
of row blocks), so the only change is rounding each weight to float16 (relative error <= 2^-11).

``halve_embeddings(model)`` swaps the modules in place, keeping a tied pair tied (one fp16
tensor). Quantized folders store the halved matrix (``core.checkpoint``) when the embedding or head
width is 16; narrower widths store LUT codes instead (``core.embed_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core import kernels

# Beyond float16's largest finite value a weight would become inf: such a matrix is left as is.
_FP16_MAX = 65504.0


class HalfEmbedding(nn.Module):
    """Token embedding with a float16 table; forward returns ``out_dtype`` rows.

    weight: float16 [num_embeddings, embedding_dim] (a persistent buffer named like
    nn.Embedding's parameter, so state_dict keys and weight tying are unchanged).
    """

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [...] -> out_dtype [..., embedding_dim]."""
        return F.embedding(input_ids, self.weight).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=float16, out={self.out_dtype}"


class HalfLinear(nn.Module):
    """Linear layer (the output head) with a float16 weight [out, in], computed in float32.

    bias: [out] in any float dtype, or None. forward: x [..., in] -> [..., out] in x's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.half_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float16, " \
               f"bias={self.bias is not None}"


def _halvable(module: nn.Module | None, kind: type) -> bool:
    """An exact nn.Embedding / nn.Linear with a float32 (or already float16) weight in fp16 range."""
    if type(module) is not kind or module.weight.is_meta:
        return False
    weight = module.weight
    if weight.dtype == torch.float16:
        return True
    return weight.dtype == torch.float32 and bool(weight.detach().abs().max() <= _FP16_MAX)


def _as_half(weight: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """weight in float16, converted once per storage (a tied pair shares the result)."""
    key = weight.untyped_storage().data_ptr()
    if key not in cache:
        cache[key] = weight.detach().to(torch.float16)
    return cache[key]


def halve_embeddings(model: nn.Module) -> bool:
    """Swap a float32 model's token embedding and output head for float16-weight modules, in place.

    model: a transformers causal LM (get_input_embeddings / get_output_embeddings). Only a float32
    compute model is changed (its embedding rows stay float32 activations); a tied pair stays tied.
    Each of the two is halved on its own when it is a plain float32 module (the other may be stored
    as LUT codes, core.embed_head). A weight already in float16 (as loaded from a quantized folder)
    is wrapped without a copy. Returns True when the embedding or the head now holds a float16 table.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, HalfEmbedding) or isinstance(head, HalfLinear):
        return True
    if _compute_dtype(model) != torch.float32:
        return False
    halve_embedding = _halvable(embedding, nn.Embedding)
    halve_head = _halvable(head, nn.Linear)
    tied = halve_embedding and head is not None and getattr(head, "weight", None) is not None and \
        head.weight.untyped_storage().data_ptr() == embedding.weight.untyped_storage().data_ptr()
    if tied and not (halve_embedding and halve_head):  # halving one side only would untie the pair and add a copy
        return False
    cache: dict[int, torch.Tensor] = {}
    if halve_embedding:
        model.set_input_embeddings(HalfEmbedding(_as_half(embedding.weight, cache)))
    if halve_head:
        bias = head.bias.detach() if head.bias is not None else None
        model.set_output_embeddings(HalfLinear(_as_half(head.weight, cache), bias))
    return halve_embedding or halve_head


def _compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating tensors other than the embedding/head weights."""
    skip = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None and getattr(m, "weight", None) is not None}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and id(tensor) not in skip and not tensor.is_meta:
            return tensor.dtype
    return None
