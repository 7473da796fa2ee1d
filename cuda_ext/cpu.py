"""The CPU kernel (csrc/cpu_lut.cpp): LUT mat-vec on the packed codes, tiled dequantize + GEMM for prefill.

Registers torch ops (so torch.compile sees them, with fake implementations for tracing):

* ``torch.ops.squeeze.lut_matmul_cpu(x, qweight, lookup_table, bits, in_features, sparse_rows,
  sparse_cols, sparse_vals, bias, max_matvec_rows=8)``: x [..., in] any float dtype ->
  [..., out] in x's dtype, computed in float32 (arguments as ``core.kernels.lut_matmul``);
* ``torch.ops.squeeze.lut_matmul_many_cpu(x, qweights, lookup_tables, bits, in_features, sparse_rows,
  sparse_cols, sparse_vals, biases, max_matvec_rows=8)``: the same for several layers that read the
  same x (lists with one entry per layer), in one parallel region -> one output per layer;
* ``torch.ops.squeeze.dequantize_cpu(qweight, lookup_table, bits, in_features, sparse_rows,
  sparse_cols, sparse_vals)``: the dense weight float32 [out, in];
* ``torch.ops.squeeze.half_linear_cpu(x, weight, bias, max_matvec_rows=8)``: x [..., in] any float
  dtype, weight float16 [out, in] -> [..., out] in x's dtype, computed in float32 (the fp16 head,
  ``core.kernels.half_linear``).

Use ``cuda_ext.load("cpu")`` (or ``is_available("cpu")``) first; the functions below assume it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from cuda_ext import jit

# Every cpu_*.cpp is one translation unit of the library; cpu_*.h are the headers they include.
SOURCES = sorted(jit.CSRC.glob("cpu_*.cpp"))
HEADERS = sorted(jit.CSRC.glob("cpu_*.h"))
# Up to this many input rows the LUT mat-vec reads the packed codes once per 8 rows; beyond it
# dequantizing to fp32 and one BLAS GEMM is faster (bench/cpu_inference.py --crossover).
MAX_MATVEC_ROWS = 8


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags() -> list[str]:
    """-O3 and OpenMP, plus AVX2/FMA/F16C only when this CPU has them (never -march=native,
    so a cached build stays valid on any CPU with the same flags: the cache key includes them).
    ``SQUEEZE_CPU_SIMD=0`` builds the portable scalar loops instead."""
    flags = ["-O3"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    if os.environ.get("SQUEEZE_CPU_SIMD", "1") != "0" and {"avx2", "fma", "f16c"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def missing_requirement() -> str | None:
    if sys.platform == "win32":
        return "the CPU kernel is built with gcc/clang flags, not supported on Windows yet"
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"the CPU kernel is not built for {platform.machine()} processors"
    return jit.compiler_missing()


def build() -> str:
    """Compile (once per machine; cached) and load the library; register the fake implementations."""
    flags = compile_flags()
    global _lut_matmul_op, _lut_matmul_many_op, _half_linear_op
    path = jit.build("squeeze_cpu", SOURCES, flags, ["-fopenmp"] if "-fopenmp" in flags else [], HEADERS)
    _register_fakes()
    _lut_matmul_op = torch.ops.squeeze.lut_matmul_cpu.default  # resolved once: ~1 us less per call
    _lut_matmul_many_op = torch.ops.squeeze.lut_matmul_many_cpu.default
    _half_linear_op = torch.ops.squeeze.half_linear_cpu.default
    return path


_lut_matmul_op = None
_lut_matmul_many_op = None
_half_linear_op = None


def _register_fakes() -> None:
    @torch.library.register_fake("squeeze::lut_matmul_cpu")
    def _lut_matmul_fake(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals,
                         bias, max_matvec_rows=MAX_MATVEC_ROWS):
        return x.new_empty((*x.shape[:-1], qweight.shape[1]))

    @torch.library.register_fake("squeeze::lut_matmul_many_cpu")
    def _lut_matmul_many_fake(x, qweights, lookup_tables, bits, in_features, sparse_rows, sparse_cols, sparse_vals,
                              biases, max_matvec_rows=MAX_MATVEC_ROWS):
        return [x.new_empty((*x.shape[:-1], q.shape[1])) for q in qweights]

    @torch.library.register_fake("squeeze::dequantize_cpu")
    def _dequantize_fake(qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals):
        return qweight.new_empty((qweight.shape[1], in_features), dtype=torch.float32)

    @torch.library.register_fake("squeeze::half_linear_cpu")
    def _half_linear_fake(x, weight, bias, max_matvec_rows=MAX_MATVEC_ROWS):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def uses_simd() -> bool:
    """True when the loaded build decodes with AVX2 (else it runs its scalar loops)."""
    return bool(torch.ops.squeeze.cpu_kernel_simd())


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
               sparse_rows: torch.Tensor | None, sparse_cols: torch.Tensor | None, sparse_vals: torch.Tensor | None,
               bias: torch.Tensor | None, max_matvec_rows: int = MAX_MATVEC_ROWS) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype; shapes and dtypes as ``core.kernels.lut_matmul``."""
    op = _lut_matmul_op or torch.ops.squeeze.lut_matmul_cpu.default
    return op(x, qweight, lookup_table, bits, in_features, sparse_rows, sparse_cols, sparse_vals, bias,
              max_matvec_rows)


def lut_matmul_many(x: torch.Tensor, layers: list[tuple], in_features: int,
                    max_matvec_rows: int = MAX_MATVEC_ROWS) -> list[torch.Tensor]:
    """x [..., in] through several layers at once -> one [..., out_i] per layer, in x's dtype.

    layers: (qweight, lookup_table, bits, sparse_rows, sparse_cols, sparse_vals, bias) per layer,
    each as in ``lut_matmul``.
    """
    op = _lut_matmul_many_op or torch.ops.squeeze.lut_matmul_many_cpu.default
    q, lut, bits, rows, cols, vals, bias = zip(*layers)
    return op(x, q, lut, bits, in_features, rows, cols, vals, bias, max_matvec_rows)


def dequantize(qweight: torch.Tensor, lookup_table: torch.Tensor, bits: int, in_features: int,
               sparse_rows: torch.Tensor | None = None, sparse_cols: torch.Tensor | None = None,
               sparse_vals: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight float32 [out, in], as ``core.kernels.dequantize``."""
    return torch.ops.squeeze.dequantize_cpu(qweight, lookup_table, bits, in_features, sparse_rows,
                                            sparse_cols, sparse_vals)


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                max_matvec_rows: int = MAX_MATVEC_ROWS) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype, weight float16 [out, in]; as ``core.kernels.half_linear``."""
    op = _half_linear_op or torch.ops.squeeze.half_linear_cpu.default
    return op(x, weight, bias, max_matvec_rows)
