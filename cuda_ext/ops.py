"""The CUDA LUT kernels (csrc/lut_*.cu) as torch.library ops, and the matmul that picks between them.

Two ops, defined here (so they exist, with fake implementations for torch.compile / CUDA-graph
tracing, on every machine) and implemented by the compiled library on CUDA tensors:

* ``torch.ops.squeeze_cuda.lut_gemv(x, qweight, lookup_table, bits, in_features, sparse_rows,
  sparse_cols, sparse_vals, bias)``: x [rows, in] float16/bfloat16/float32 -> [rows, out] in x's
  dtype, summed in float32. The dense LUT part reads the packed weights once per 8 rows; the
  CSR residual is a second kernel with the same work per thread whatever the row lengths.
* ``torch.ops.squeeze_cuda.lut_dequantize(qweight, lookup_table, bits, in_features, sparse_rows,
  sparse_cols, sparse_vals, dtype)``: the effective weight **transposed**, [in, out] in ``dtype``.

``lut_matmul`` uses the mat-vec below ``DEQUANTIZE_MIN_ROWS`` rows and dequantize + cuBLAS GEMM
(tensor cores) from there on. Weight arguments are those of ``core.kernels.lut_matmul``:
qweight int32 [ceil(in/32)*bits, out], lookup_table [out, 2**bits], CSR residual (rows int32
[out+1], cols int32 [nnz], vals float32 [nnz]) or None, bias [out] or None; 2, 3 or 4 bits.

core uses them for CUDA tensors by default (``SQUEEZE_KERNELS=torch`` turns them off): an H200 run
passed tests/cuda_ext and measured them against fp16 cuBLAS (bench/kernels.py, BENCHMARKS.md).
"""

from __future__ import annotations

import os
import shutil

import torch

from cuda_ext import jit

SOURCES = [jit.CSRC / "lut_cuda_ops.cpp", jit.CSRC / "lut_gemv.cu", jit.CSRC / "lut_gemv_fused.cu",
           jit.CSRC / "lut_dequant.cu"]
HEADERS = [jit.CSRC / "lut_cuda.h", jit.CSRC / "lut_common.cuh", jit.CSRC / "lut_decode.cuh"]
SUPPORTED_BITS = (2, 3, 4)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# From this many rows (tokens) on, dequantizing to x's dtype and one cuBLAS GEMM beats the mat-vec
# (run once per 8 rows). Measured on an H200 (bench.kernels, BENCHMARKS.md "CUDA kernels"): at 12
# rows dequantize + GEMM wins on every LLaMA-7B shape at 3 and 4 bits (31 vs 30 us on 4096x4096,
# 83 vs 71 on 11008x4096), at 8 rows the mat-vec does (19 vs 30 us); 9-11 rows were not measured.
DEQUANTIZE_MIN_ROWS = 12

_LIB = torch.library.Library("squeeze_cuda", "DEF")
_LIB.define("lut_gemv(Tensor x, Tensor qweight, Tensor lookup_table, int bits, int in_features, "
            "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals, Tensor? bias) -> Tensor")
_LIB.define("lut_dequantize(Tensor qweight, Tensor lookup_table, int bits, int in_features, "
            "Tensor? sparse_rows, Tensor? sparse_cols, Tensor? sparse_vals, ScalarType dtype) -> Tensor")


@torch.library.register_fake("squeeze_cuda::lut_gemv")
def _lut_gemv_fake(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals, bias):
    torch._check(x.dim() == 2 and x.shape[1] == in_features, lambda: "x must be [rows, in_features]")
    return x.new_empty((x.shape[0], qweight.shape[1]))


@torch.library.register_fake("squeeze_cuda::lut_dequantize")
def _lut_dequantize_fake(qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals, dtype):
    return qweight.new_empty((in_features, qweight.shape[1]), dtype=dtype)


def missing_requirement() -> str | None:
    """Why the CUDA kernels cannot be used here (checked without compiling), or None."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if _nvcc() is None:
        return (f"nvcc was not found: install the CUDA toolkit {torch.version.cuda} (or set CUDA_HOME) "
                "to build the kernels")
    return jit.compiler_missing()


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def build() -> str:
    """Compile (cached on disk, see cuda_ext.jit) and load the library; returns its path."""
    return jit.build("squeeze_cuda", SOURCES, ["-O3"], [], HEADERS, extra_cuda_cflags=["-O3", "-lineinfo"])


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
               sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
               sparse_vals: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] on a CUDA device -> [..., out] in x's dtype (float32 sums).

    Activations or tables of other float dtypes (float64) go through float32. Needs the library
    loaded (``cuda_ext.load("cuda")``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the CUDA kernels take {SUPPORTED_BITS}-bit codes, not {bits}")
    compute_dtype = x.dtype if x.dtype in KERNEL_DTYPES else torch.float32
    if lookup_table.dtype not in KERNEL_DTYPES:
        lookup_table = lookup_table.to(torch.float32)
    if sparse_vals is None or sparse_vals.numel() == 0:
        sparse_rows = sparse_cols = sparse_vals = None
    out_features = qweight.shape[1]
    rows = x.reshape(-1, in_features).to(compute_dtype)
    if rows.shape[0] < DEQUANTIZE_MIN_ROWS:
        y = torch.ops.squeeze_cuda.lut_gemv(rows, qweight, lookup_table, bits, in_features,
                                            sparse_rows, sparse_cols, sparse_vals, bias)
    else:
        weight_t = torch.ops.squeeze_cuda.lut_dequantize(qweight, lookup_table, bits, in_features,
                                                         sparse_rows, sparse_cols, sparse_vals, compute_dtype)
        y = rows @ weight_t if bias is None else torch.addmm(bias.to(compute_dtype), rows, weight_t)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


def dequantize(qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
               sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
               sparse_vals: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The effective weight [out, in] in ``dtype`` (as ``core.kernels.dequantize`` when float32)."""
    if sparse_vals is None or sparse_vals.numel() == 0:
        sparse_rows = sparse_cols = sparse_vals = None
    weight_t = torch.ops.squeeze_cuda.lut_dequantize(qweight, lookup_table, bits, in_features,
                                                     sparse_rows, sparse_cols, sparse_vals, dtype)
    return weight_t.t()
