"""``SqueezeLinear``: a linear layer stored as packed LUT codes plus a CSR sparse residual."""

from __future__ import annotations

import torch
from torch import nn

from core import kernels
from core.errors import UserError, quote_error
from core.packing import CODECS, GROUP, pack_codes, packed_rows

_BUFFERS = ("qweight", "lookup_table", "sparse_rows", "sparse_cols", "sparse_vals", "bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"unknown tensor dtype {name!r} in the quantized layout: re-save the model")
    return dtype


class SqueezeLinear(nn.Module):
    """A dense-and-sparse non-uniformly quantized linear layer (SqueezeLLM).

    ``W[r, j] = lookup_table[r, code[r, j]] + S[r, j]``, ``y = x @ W^T + bias``. Buffers, all
    persistent (they are the state_dict):

      qweight       int32     [ceil(in/32) * bits, out]  codes packed along the input dim
                                                         (core.packing; input padded with code 0)
      lookup_table  lut_dtype [out, 2**bits]             per-row centroids (float16 by default)
      sparse_rows   int32     [out + 1]                  CSR row pointer of the residual S
      sparse_cols   int32     [nnz]                      input index of each residual
      sparse_vals   float32   [nnz]                      residual values
      bias          bias_dtype [out]                     only when bias=True (else ``self.bias`` is None)

    Forward computes in float32 and returns x's dtype. Note that ``module.half()`` /
    ``.to(dtype)`` would also cast the LUT and residuals; move devices with ``.to(device)`` only.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, nnz: int = 0, bias: bool = False,
                 lut_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in CODECS:
            raise ValueError(f"{bits}-bit SqueezeLinear is not supported: choose one of {sorted(CODECS)}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("lookup_table", torch.zeros(out_features, 1 << bits, dtype=lut_dtype, device=device))
        self.register_buffer("sparse_rows", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("sparse_cols", torch.zeros(nnz, dtype=torch.int32, device=device))
        self.register_buffer("sparse_vals", torch.zeros(nnz, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.shared_input = None  # a core.shared_input.SharedInputGroup when linked with its siblings

    @property
    def nnz(self) -> int:
        """Number of sparse residuals (read from the buffer, so it follows load_state_dict(assign=True))."""
        return self.sparse_vals.numel()

    @property
    def lut_dtype(self) -> torch.dtype:
        return self.lookup_table.dtype

    @classmethod
    def from_parts(cls, codes: torch.Tensor, lookup_table: torch.Tensor, bits: int,
                   sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   bias: torch.Tensor | None = None, lut_dtype: torch.dtype = torch.float16) -> SqueezeLinear:
        """Build a layer on ``codes.device`` from its parts.

        codes uint8 [out, in] (values < 2**bits); lookup_table float [out, 2**bits] (cast to
        lut_dtype); sparse (rows int32 [out+1], cols int32 [nnz], vals float [nnz]) or None;
        bias [out] of any float dtype (kept in that dtype) or None.
        """
        out_features, in_features = codes.shape
        if tuple(lookup_table.shape) != (out_features, 1 << bits):
            raise ValueError(f"lookup_table {tuple(lookup_table.shape)} does not match {out_features} rows "
                             f"of {bits}-bit codes: expected {(out_features, 1 << bits)}")
        rows, cols, vals = sparse if sparse is not None else (None, None, None)
        nnz = vals.numel() if vals is not None else 0
        bias_dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, bits, nnz, bias is not None, lut_dtype, bias_dtype,
                     device=codes.device)
        module.qweight.copy_(pack_codes(codes, bits))
        module.lookup_table.copy_(lookup_table)
        if rows is not None:
            module.sparse_rows.copy_(rows)
            module.sparse_cols.copy_(cols)
            module.sparse_vals.copy_(vals)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        if self.shared_input is not None:  # siblings reading the same x (core.shared_input)
            y = self.shared_input.output(self, x)
            if y is not None:
                return y
        # Buffers read from _buffers: ``self.qweight`` goes through nn.Module.__getattr__ (1.1 us each,
        # 8 us per call: as long as the kernel call itself on a small layer, 210 calls per token).
        b = self._buffers
        return kernels.lut_matmul(x, b["qweight"], b["lookup_table"], self.bits, self.in_features,
                                  b["sparse_rows"], b["sparse_cols"], b["sparse_vals"], b["bias"])

    def kernel_arguments(self) -> tuple:
        """(qweight, lookup_table, bits, sparse_rows, sparse_cols, sparse_vals, bias): one layer of
        ``kernels.lut_matmul_many``."""
        b = self._buffers
        return (b["qweight"], b["lookup_table"], self.bits, b["sparse_rows"], b["sparse_cols"], b["sparse_vals"],
                b["bias"])

    def dequantize(self) -> torch.Tensor:
        """The effective weight, float32 [out, in] (dense LUT part plus sparse residuals)."""
        return kernels.dequantize(self.qweight, self.lookup_table, self.bits, self.in_features,
                                  self.sparse_rows, self.sparse_cols, self.sparse_vals)

    def storage_bytes(self) -> int:
        """Bytes of every buffer as stored (codes, LUT, CSR part and the bias when present)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def layout(self) -> dict:
        """What ``from_layout`` needs to rebuild an empty module of this shape (JSON-ready)."""
        return {"type": "squeeze", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "nnz": self.nnz, "bias": self.bias is not None,
                "lut_dtype": _dtype_name(self.lut_dtype),
                "bias_dtype": _dtype_name(self.bias.dtype) if self.bias is not None else None}

    @classmethod
    def from_layout(cls, info: dict, device: torch.device | str = "meta") -> SqueezeLinear:
        """An empty module (meta tensors by default) to fill with ``load_state_dict(..., assign=True)``."""
        return cls(int(info["in_features"]), int(info["out_features"]), int(info["bits"]),
                   int(info.get("nnz", 0)), bool(info.get("bias", False)),
                   _dtype_from_name(info.get("lut_dtype") or "float16"),
                   _dtype_from_name(info.get("bias_dtype") or "float32"), device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"nnz={self.nnz}, lut_dtype={_dtype_name(self.lut_dtype)}, bias={self.bias is not None}")


def squeeze_linear_from_state(prefix: str, state: dict[str, torch.Tensor], in_features: int) -> SqueezeLinear:
    """A ``SqueezeLinear`` sized from, and holding, the tensors ``state[prefix + "qweight"]`` etc.

    prefix: module path with or without the trailing dot ("model.layers.0.mlp.up_proj").
    bits = qweight rows / ceil(in/32); out = qweight columns; nnz = len(sparse_vals); the LUT and
    bias keep their stored dtypes. The tensors are assigned, not copied. UserError when they are
    missing or do not fit together.
    """
    prefix = prefix if prefix.endswith(".") or not prefix else prefix + "."
    parts = {name: state[prefix + name] for name in _BUFFERS if prefix + name in state}
    missing = [name for name in _BUFFERS[:5] if name not in parts]
    if missing:
        raise UserError(f"quantized layer {prefix.rstrip('.')!r} lacks {', '.join(missing)} in the weights "
                        "file: the file is incomplete or not a Squeeze Studio model; quantize it again")
    groups = -(-in_features // GROUP)
    words, out_features = parts["qweight"].shape
    bits = words // groups
    if bits * groups != words or bits not in CODECS:
        raise UserError(f"{prefix}qweight has {words} rows, which is not a supported bit width for "
                        f"{in_features} inputs: check the model's config.json matches its weights")
    bias = parts.get("bias")
    module = SqueezeLinear(in_features, out_features, bits, parts["sparse_vals"].numel(), bias is not None,
                           parts["lookup_table"].dtype, bias.dtype if bias is not None else torch.float32,
                           device="meta")
    try:
        module.load_state_dict(parts, assign=True)
    except RuntimeError as exc:  # load_state_dict lists every mismatch on its own line: quote the first
        detail = next((line.strip() for line in str(exc).splitlines() if "mismatch" in line), quote_error(exc))
        raise UserError(f"the tensors of {prefix.rstrip('.')!r} do not fit together ({detail}): "
                        "the weights file is corrupt; quantize the model again") from exc
    return module
