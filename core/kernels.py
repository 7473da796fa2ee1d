"""LUT matmul: ``y = x @ (LUT[codes] + sparse)^T + bias``, and its plain-torch reference.

The torch functions here are the oracle that compiled kernels (``cuda_ext``) are tested against.
``lut_matmul`` picks an implementation in one place, ``_backend()``: the compiled CPU kernel
(``cuda_ext.cpu``) for CPU tensors and the CUDA kernels (``cuda_ext.ops``) for CUDA tensors when
they build, else the torch reference, which dequantizes to float32 and calls ``F.linear``.
``SQUEEZE_KERNELS=torch`` forces the reference everywhere. The CUDA kernels are the default on
GPUs since an H200 run passed every CUDA test and measured them 14-28x faster than the reference
(BENCHMARKS.md, "CUDA kernels").
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from core.packing import csr_row_indices, unpack_codes_transposed


def _backend(device: torch.device) -> str:
    """Which implementation ``lut_matmul`` uses for tensors on ``device``: "cpu-ext", "cuda-ext" or "torch".

    ``$SQUEEZE_KERNELS``: "auto" (default) takes a compiled kernel for the device when
    ``cuda_ext`` can build it (the first call may compile it, once per machine), "torch" forces
    the reference, "cpu" / "cuda" allow only that kernel. A kernel that cannot be built logs one
    warning (in cuda_ext) and the reference serves; asking for "cuda" where the CUDA kernels cannot
    work logs that once, on any device.
    The answer is remembered per (setting, device type): a build's success or failure is final
    for the process, and this runs on every quantized layer call (the lookup took 4 us, as long
    as the kernel call itself on a small layer).
    """
    key = (os.environ.get("SQUEEZE_KERNELS", "auto"), device.type)
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = _pick_backend(key[0].strip().lower(), device)
    return backend


_BACKENDS: dict[tuple[str, str], str] = {}


def _pick_backend(choice: str, device: torch.device) -> str:
    import cuda_ext

    if choice == "cuda" or (choice == "auto" and device.type == "cuda"):
        if cuda_ext.is_available("cuda") and device.type == "cuda":
            return "cuda-ext"
    if device.type == "cpu" and choice in ("auto", "cpu"):
        if cuda_ext.is_available("cpu"):
            return "cpu-ext"
    return "torch"


def _cpu_kernel():
    """cuda_ext.cpu, imported once (a per-call ``from cuda_ext import cpu`` costs about a microsecond)."""
    global _CPU_KERNEL
    if _CPU_KERNEL is None:
        from cuda_ext import cpu

        _CPU_KERNEL = cpu
    return _CPU_KERNEL


_CPU_KERNEL = None


def _has_sparse(sparse_vals: torch.Tensor | None) -> bool:
    return sparse_vals is not None and sparse_vals.numel() > 0


def dequantize(qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
               sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
               sparse_vals: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight float32 [out, in_features]: ``W[r, j] = lookup_table[r, code[r, j]] + S[r, j]``.

    qweight int32 [ceil(in/32)*bits, out] (core.packing layout); lookup_table float16/32/bf16
    [out, 2**bits]; optional CSR residual S: sparse_rows int32 [out+1], sparse_cols int32 [nnz],
    sparse_vals float32 [nnz] (nnz may be 0). The sum is taken in float32.
    """
    return dequantize_transposed(qweight, lookup_table, bits, in_features,
                                 sparse_rows, sparse_cols, sparse_vals).t().contiguous()


def dequantize_transposed(qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
                          sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
                          sparse_vals: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(...)`` transposed, float32 [in_features, out], built in qweight's own layout."""
    codes = unpack_codes_transposed(qweight, bits, in_features)  # int32 [in, out]
    out_features = qweight.shape[1]
    lut_t = lookup_table.to(torch.float32).t().contiguous()  # [2**bits, out]
    # W^T[j, n] = lut_t[code, n]: one flat 1-D lookup, much faster on the CPU than gather().
    flat_index = codes * out_features + torch.arange(out_features, dtype=torch.int32, device=codes.device)
    weight_t = lut_t.view(-1).index_select(0, flat_index.view(-1)).view(in_features, out_features)
    if _has_sparse(sparse_vals):
        cols = sparse_cols.to(torch.int64)
        _check_sparse_cols(cols, in_features)
        index = (cols, csr_row_indices(sparse_rows, sparse_vals.numel()))
        weight_t.index_put_(index, sparse_vals.to(torch.float32), accumulate=True)
    return weight_t


# The same words as the compiled kernels (cuda_ext/csrc/cpu_lut.cpp, lut_cuda_ops.cpp) raise.
SPARSE_INDEX_ERROR = "the sparse residual's CSR indices are out of range: the weights are corrupt"


def _check_sparse_cols(cols: torch.Tensor, in_features: int) -> None:
    """RuntimeError, as from the kernels, when a column index (int64 [nnz]) is outside [0, in_features):
    index_put_ would wrap a negative one silently and fail on a large one with an unrelated message."""
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_features):
        raise RuntimeError(SPARSE_INDEX_ERROR)


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int,
               in_features: int, sparse_rows: torch.Tensor | None = None,
               sparse_cols: torch.Tensor | None = None, sparse_vals: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] (any float dtype) -> [..., out] in x's dtype, computed in float32.

    Weight arguments as in ``dequantize``; bias [out] of any float dtype, or None. One exception on the
    CPU kernel's path: bfloat16 activations of ``BF16_GEMM_MIN_ROWS`` rows or more are multiplied by
    the weight rounded to bfloat16 (a bfloat16 GEMM, several times faster than float32 on CPUs with
    bf16 instructions), as the unquantized bfloat16 model would be.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features but the layer expects {in_features}")
    # The compiled kernels have no backward: a graph that needs gradients takes the reference.
    backend = "torch" if x.requires_grad and torch.is_grad_enabled() else _backend(x.device)
    if backend == "cpu-ext":
        if _bf16_gemm_serves(x):
            return _lut_matmul_bf16_gemm(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols,
                                         sparse_vals, bias)
        return _cpu_kernel().lut_matmul(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols,
                                        sparse_vals, bias)
    if backend == "cuda-ext" and bits <= 4:  # the CUDA kernels take 2-4 bits; 5-8 go to the reference
        from cuda_ext import ops

        return ops.lut_matmul(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols,
                              sparse_vals, bias)
    if backend in ("torch", "cuda-ext"):
        return _lut_matmul_torch(x, qweight, lookup_table, bits, in_features,
                                 sparse_rows, sparse_cols, sparse_vals, bias)
    raise RuntimeError(f"unknown lut_matmul backend {backend!r}")


def lut_matmul_many(x: torch.Tensor, layers: list[tuple], in_features: int) -> list[torch.Tensor] | None:
    """x through several layers that read it, in one call of the CPU kernel: one output per layer.

    layers: (qweight, lookup_table, bits, sparse_rows, sparse_cols, sparse_vals, bias) per layer,
    arguments as in ``lut_matmul``. None where that kernel does not serve x (another device,
    SQUEEZE_KERNELS=torch, or a graph that needs gradients): the caller runs ``lut_matmul`` per layer.
    """
    if (x.requires_grad and torch.is_grad_enabled()) or _backend(x.device) != "cpu-ext" or _bf16_gemm_serves(x):
        return None
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features but the layers expect {in_features}")
    return _cpu_kernel().lut_matmul_many(x, layers, in_features)


# From this many rows on, bfloat16 activations on the CPU take a bfloat16 GEMM: the weight is
# dequantized by the CPU kernel in blocks of output rows, rounded to bfloat16 and multiplied by
# torch's bfloat16 GEMM (what the unquantized bf16 model does), instead of the kernel's float32
# dequantize + GEMM. Measured on a quiet 2-core CPU (bench.bf16_prefill, BENCHMARKS.md "bfloat16
# prefill"), 3-bit LLaMA-8B layers: at 512 rows the bf16 GEMM is 1.29-1.42x faster (14336 x 4096:
# 340 -> 263 ms), at 256 rows 0.93-1.14x, below that slower (dequantizing 58 M weights costs ~110 ms,
# the kernel's own path at 16 rows 34 ms). Demo-sized layers gain from 32 rows, but take little time.
BF16_GEMM_MIN_ROWS = 512
# Output rows dequantized at a time: bounds the float32 + bfloat16 copies to ~100 MB at 4096 inputs.
_BF16_GEMM_BLOCK_ROWS = 4096


def _bf16_gemm_serves(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.numel() >= BF16_GEMM_MIN_ROWS * x.shape[-1]


def _lut_matmul_bf16_gemm(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals,
                          bias) -> torch.Tensor:
    """bfloat16 x [..., in] -> [..., out] bfloat16: blocks of the weight dequantized (float32, CPU kernel),
    rounded to bfloat16, and one bfloat16 GEMM per block (float32 accumulation inside the GEMM)."""
    cpu = _cpu_kernel()
    rows = x.reshape(-1, in_features).contiguous()
    out_features = qweight.shape[1]
    bias16 = bias.to(torch.bfloat16) if bias is not None else None
    parts = []
    for n0 in range(0, out_features, _BF16_GEMM_BLOCK_ROWS):
        n1 = min(out_features, n0 + _BF16_GEMM_BLOCK_ROWS)
        whole = n0 == 0 and n1 == out_features
        block_sparse = (None, None, None)
        if _has_sparse(sparse_vals):
            start, end = int(sparse_rows[n0]), int(sparse_rows[n1])
            block_sparse = (sparse_rows if whole else (sparse_rows[n0:n1 + 1] - start).contiguous(),
                            sparse_cols if whole else sparse_cols[start:end],
                            sparse_vals if whole else sparse_vals[start:end])
        weight = cpu.dequantize(qweight if whole else qweight[:, n0:n1].contiguous(),
                                lookup_table if whole else lookup_table[n0:n1], bits, in_features, *block_sparse)
        parts.append(F.linear(rows, weight.to(torch.bfloat16), bias16[n0:n1] if bias16 is not None else None))
        del weight
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return y.view(*x.shape[:-1], out_features)


def _lut_matmul_torch(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols,
                      sparse_vals, bias) -> torch.Tensor:
    """Reference: dequantize the whole weight to float32, then one float32 GEMM."""
    weight_t = dequantize_transposed(qweight, lookup_table, bits, in_features,
                                     sparse_rows, sparse_cols, sparse_vals)
    bias32 = bias.to(torch.float32) if bias is not None else None
    # F.linear multiplies by weight^T; passing the transposed view lets BLAS read weight_t as is.
    return F.linear(x.to(torch.float32), weight_t.t(), bias32).to(x.dtype)


def lookup_rows(ids: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
                sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
                sparse_vals: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``ids`` of the dense weight, float32 [*ids.shape, in_features]: an embedding lookup.

    ids: integer tensor of row indices (tokens); weight arguments as in ``dequantize`` (row r of
    the weight is column r of qweight). Only the distinct rows asked for are dequantized: their
    packed columns, LUT rows and CSR entries are indexed first, so a lookup of n tokens costs
    O(n * in_features), not a pass over the whole table.
    """
    flat = ids.reshape(-1).to(torch.int64)
    n_rows = qweight.shape[1]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_rows):
        raise IndexError(f"token id out of range: the table has {n_rows} rows, got ids in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    rows, inverse = torch.unique(flat, return_inverse=True)
    table = dequantize_transposed(qweight.index_select(1, rows), lookup_table.index_select(0, rows), bits,
                                  in_features).t()  # [len(rows), in] view
    if _has_sparse(sparse_vals):
        starts, ends = sparse_rows[rows].to(torch.int64), sparse_rows[rows + 1].to(torch.int64)
        counts = ends - starts
        total = int(counts.sum())
        if total:
            owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts, output_size=total)
            first = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts, output_size=total)
            entries = first + torch.arange(total, device=rows.device)  # positions in sparse_cols / sparse_vals
            cols = sparse_cols[entries].to(torch.int64)
            _check_sparse_cols(cols, in_features)
            table = table.contiguous()
            table.index_put_((owner, cols), sparse_vals[entries].to(torch.float32), accumulate=True)
    return table.index_select(0, inverse).view(*ids.shape, in_features)


# Rows of an fp16 head weight upcast at a time by the reference (bounds its float32 copy to ~16 MB).
_HALF_REFERENCE_ROWS = 4096


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` for a float16 weight, computed in float32: the fp16 output head.

    x [..., in] (any float dtype); weight float16 [out, in]; bias [out] of any float dtype or None
    -> [..., out] in x's dtype. The CPU kernel streams the fp16 weight (half the bytes of fp32);
    the reference upcasts it in row blocks, so it never holds a float32 copy of the whole weight.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features but the head expects {weight.shape[1]}")
    backend = "torch" if x.requires_grad and torch.is_grad_enabled() else _backend(x.device)
    if backend == "cpu-ext" and weight.dtype == torch.float16:
        return _cpu_kernel().half_linear(x, weight, bias)
    return _half_linear_torch(x, weight, bias)


def _half_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: float32 F.linear on float32 copies of blocks of weight rows."""
    x32 = x.to(torch.float32)
    parts = [F.linear(x32, weight[n0:n0 + _HALF_REFERENCE_ROWS].to(torch.float32))
             for n0 in range(0, weight.shape[0], _HALF_REFERENCE_ROWS)]
    y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
