"""Round-to-nearest baselines (asymmetric min-max), to show what SqueezeLLM buys.

Per output channel: each row r gets ``scale_r = (max_r - min_r) / (2**b - 1)`` and
``zero_r = min_r``; ``q = clamp(round((w - min_r) / scale_r), 0, 2**b - 1)``. The grid
``min_r + i * scale_r`` is a per-row lookup table, so these layers are ``SqueezeLinear``s
without a sparse part. Groups of ``group_size`` along the input dimension: the same
formula per group, stored by ``GroupQuantLinear`` (packed codes, fp16 scales and zeros).
"""

from __future__ import annotations

import math
from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from core.packing import pack_codes, unpack_codes
from core.progress import ProgressEvent


def _min_max_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, scale) of each row of w float [rows, cols], both float32 [rows, 1].

    A constant row gets scale 1 so that it decodes exactly to its value with code 0.
    """
    lo = w.amin(dim=1, keepdim=True)
    scale = (w.amax(dim=1, keepdim=True) - lo) / ((1 << bits) - 1)
    return lo, torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_to_grid(w: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of w on the grid lo + i * scale (broadcast), clamped to [0, 2**bits - 1]."""
    return torch.round((w - lo) / scale).clamp_(0, (1 << bits) - 1).to(torch.uint8)


def rtn_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max round-to-nearest of each output row.

    weight: float [out, in] -> (codes uint8 [out, in], lookup_table float32 [out, 2**bits]) with
    ``lookup_table[r, i] = min_r + i * scale_r``, so ``lookup_table[r, codes[r, j]]`` is the
    dequantized weight (error at most scale_r / 2 per element).
    """
    w = weight.detach().float()
    lo, scale = _min_max_grid(w, bits)
    codes = _round_to_grid(w, lo, scale, bits)
    levels = torch.arange(1 << bits, dtype=torch.float32, device=w.device)
    return codes, lo + levels * scale


class GroupQuantLinear(nn.Module):
    """A linear layer stored as round-to-nearest codes with a min and a scale per group of inputs.

    Buffers:
      qweight  int32 [ceil(in/32) * bits, out]   codes packed along the input dim (core.packing)
      scales   float16 [out, n_groups]            step of each group's grid
      zeros    float16 [out, n_groups]            minimum of each group (the value of code 0)
      bias     [out] in the original dtype, or absent
    ``n_groups = ceil(in / group_size)``; the last group is shorter when ``in`` is not a multiple.
    Weight ``[r, j] = zeros[r, g] + codes[r, j] * scales[r, g]`` with ``g = j // group_size``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 has_bias: bool, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = math.ceil(in_features / group_size)
        words = math.ceil(in_features / 32) * bits
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        bias = torch.zeros(out_features, dtype=dtype, device=device) if has_bias else None
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> GroupQuantLinear:
        """Quantize ``linear.weight`` float [out, in] with min-max round-to-nearest per group."""
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        module = cls(in_features, out_features, bits, group_size, linear.bias is not None,
                     dtype=linear.weight.dtype, device=w.device)
        lo, scale = cls._group_grid(w, bits, group_size)
        # Round against the fp16 grid that is stored, so every code is nearest for what decodes.
        lo, scale = lo.half(), scale.half()
        codes = _round_to_grid(w, cls._per_column(lo.float(), group_size, in_features),
                               cls._per_column(scale.float(), group_size, in_features), bits)
        module.qweight.copy_(pack_codes(codes, bits))
        module.zeros.copy_(lo)
        module.scales.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    @staticmethod
    def _group_grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(minimum, scale) float32 [out, n_groups] of each group of w float [out, in]."""
        out_features, in_features = w.shape
        pad = -in_features % group_size
        # Padding with +inf / -inf leaves the short last group's own min and max unchanged.
        lo = F.pad(w, (0, pad), value=math.inf).view(out_features, -1, group_size).amin(dim=2)
        hi = F.pad(w, (0, pad), value=-math.inf).view(out_features, -1, group_size).amax(dim=2)
        scale = (hi - lo) / ((1 << bits) - 1)
        return lo, torch.where(scale > 0, scale, torch.ones_like(scale))

    @staticmethod
    def _per_column(values: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
        """[out, n_groups] -> [out, in]: each group's value repeated over its columns."""
        return values.repeat_interleave(group_size, dim=1)[:, :in_features]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``dtype`` [out, in]."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features).to(torch.float32)
        scales = self._per_column(self.scales.float(), self.group_size, self.in_features)
        zeros = self._per_column(self.zeros.float(), self.group_size, self.in_features)
        return torch.addcmul(zeros, codes, scales).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: packed codes, scales and zeros (the bias, as in nn.Linear's
        accounting elsewhere, is counted too when present)."""
        tensors = [self.qweight, self.scales, self.zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def layout(self) -> dict:
        """What ``from_layout`` needs to rebuild an empty module of this shape (JSON-ready)."""
        return {"type": "group", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None}

    @classmethod
    def from_layout(cls, info: dict) -> GroupQuantLinear:
        """An empty module (meta tensors) to be filled by ``load_state_dict(..., assign=True)``."""
        dtype = getattr(torch, info.get("bias_dtype") or "float32")
        return cls(int(info["in_features"]), int(info["out_features"]), int(info["bits"]),
                   int(info["group_size"]), bool(info["bias"]), dtype=dtype, device="meta")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def rtn_module(linear: nn.Linear, bits: int, group_size: int | None) -> nn.Module:
    """The round-to-nearest replacement of ``linear`` (on the CPU).

    group_size None: per output channel (a ``SqueezeLinear`` whose LUT is the uniform grid);
    otherwise ``GroupQuantLinear`` with groups of ``group_size`` inputs.
    """
    from core.layers import SqueezeLinear

    if group_size is None:
        codes, lut = rtn_per_channel(linear.weight, bits)
        bias = linear.bias.detach() if linear.bias is not None else None
        return SqueezeLinear.from_parts(codes.cpu(), lut.cpu(), bits, bias=bias.cpu() if bias is not None else None)
    return GroupQuantLinear.from_linear(linear, bits, group_size).cpu()


def quantize_rtn(model: nn.Module, bits: int, group_size: int | None) -> Generator[ProgressEvent, None, None]:
    """Replace every quantizable linear of ``model`` in place by ``rtn_module``. Yields once per matrix."""
    from core.models import quantizable_linears

    linears = quantizable_linears(model)
    kind = "per channel" if group_size is None else f"groups of {group_size}"
    for i, (name, linear) in enumerate(linears.items()):
        model.set_submodule(name, rtn_module(linear, bits, group_size).to(linear.weight.device))
        yield ProgressEvent("quantize", i + 1, len(linears), f"round-to-nearest {bits}-bit ({kind}): {name}")
