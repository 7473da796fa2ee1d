"""A corrupt sparse column index raises the same RuntimeError in every implementation: the torch
reference, the CPU kernel and the CUDA kernels (issue 18, item 9). None reads or writes out of bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cuda_ext
from core import kernels
from core.kernels import SPARSE_INDEX_ERROR
from core.packing import dense_to_csr, pack_codes

CSRC = Path(__file__).resolve().parents[2] / "cuda_ext" / "csrc"


def corrupt_layer(bad_col: int, in_features: int = 64, out_features: int = 16, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=g)
    mask = torch.rand(out_features, in_features, generator=g) < 0.2
    rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features, generator=g), mask)
    cols = cols.clone()
    cols[3] = bad_col
    layer = dict(qweight=pack_codes(codes, 4), lookup_table=torch.randn(out_features, 16, generator=g).half(),
                 sparse_rows=rows, sparse_cols=cols, sparse_vals=vals)
    return {k: v.to(device) for k, v in layer.items()} | dict(bits=4, in_features=in_features)


@pytest.mark.parametrize("bad_col", [64, -1, 1 << 30])
def test_the_torch_reference_raises_for_a_column_out_of_range(bad_col):
    layer = corrupt_layer(bad_col)
    with pytest.raises(RuntimeError) as info:
        kernels._lut_matmul_torch(torch.randn(2, 64), **layer, bias=None)
    assert str(info.value) == SPARSE_INDEX_ERROR
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.dequantize(layer["qweight"], layer["lookup_table"], 4, 64, layer["sparse_rows"],
                           layer["sparse_cols"], layer["sparse_vals"])


@pytest.mark.parametrize("bad_col", [64, -1])
@pytest.mark.parametrize("rows", [1, 20])  # the mat-vec and the dequantize + GEMM paths
def test_the_cpu_kernel_raises_the_same_error(bad_col, rows):
    if not cuda_ext.is_available("cpu"):
        pytest.skip(f"CPU kernel unavailable: {cuda_ext.unavailable_reason('cpu')}")
    from cuda_ext import cpu

    with pytest.raises(RuntimeError) as info:
        cpu.lut_matmul(torch.randn(rows, 64), **corrupt_layer(bad_col), bias=None)
    assert SPARSE_INDEX_ERROR in str(info.value)


def test_every_implementation_words_the_error_alike():
    for source in ("cpu_lut.cpp", "lut_cuda_ops.cpp"):
        assert SPARSE_INDEX_ERROR in (CSRC / source).read_text(), source
    for source in ("lut_gemv.cu", "lut_dequant.cu"):  # both CSR kernels flag a bad column, neither skips silently
        text = (CSRC / source).read_text()
        assert "*bad_index = 1;" in text and "if (col < 0 || col >= in_features) return;" not in text, source


@pytest.mark.cuda
@pytest.mark.parametrize("bad_col", [64, -1])
@pytest.mark.parametrize("rows", [1, 20])  # csr_gemv (decode) and csr_scatter_add (prefill)
def test_the_cuda_kernels_raise_the_same_error(monkeypatch, bad_col, rows):
    from cuda_ext import ops

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    missing = ops.missing_requirement()
    if missing:
        pytest.skip(f"the CUDA kernels cannot be built here: {missing}")
    # build and load them: this test may run before any other has (the ops exist without their kernels)
    assert cuda_ext.is_available("cuda"), cuda_ext.unavailable_reason("cuda")
    layer = corrupt_layer(bad_col, device="cuda")
    with pytest.raises(RuntimeError) as info:
        ops.lut_matmul(torch.randn(rows, 64, device="cuda"), **layer, bias=None)
        torch.cuda.synchronize()
    assert SPARSE_INDEX_ERROR in str(info.value)
