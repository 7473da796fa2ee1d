"""bfloat16 activations of many rows on the CPU: the weight rounded to bfloat16 and a bfloat16 GEMM.

A bf16 model's prefill (evaluation, a chat prompt) on the CPU took the kernel's float32 dequantize +
GEMM, 3-4x slower than the bf16 GEMM on a CPU with bf16 instructions; now it takes the bf16 GEMM from
``kernels.BF16_GEMM_MIN_ROWS`` rows on. The result must stay within bfloat16's rounding of the float32
reference, CSR residual and bias included, whatever the block split of the output rows.
"""

from __future__ import annotations

import pytest
import torch

import cuda_ext
from core import kernels
from core.packing import dense_to_csr, pack_codes


@pytest.fixture(autouse=True)
def cpu_kernel():
    if not cuda_ext.is_available("cpu"):
        pytest.fail(f"the CPU kernel must build here: {cuda_ext.unavailable_reason('cpu')}")


def layer(out_features: int, in_features: int, bits: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8, generator=g)
    lut = (torch.randn(out_features, 1 << bits, generator=g).sort(1).values * 0.02).half()
    mask = torch.rand(out_features, in_features, generator=g) < 0.01
    mask[3, : in_features // 2] = True  # one row holding half its inputs
    rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features, generator=g) * 0.05, mask)
    return dict(qweight=pack_codes(codes, bits), lookup_table=lut, bits=bits, in_features=in_features,
                sparse_rows=rows, sparse_cols=cols, sparse_vals=vals, bias=torch.randn(out_features, generator=g))


def relative_error(y: torch.Tensor, x: torch.Tensor, w: dict) -> float:
    ref = kernels._lut_matmul_torch(x.float(), w["qweight"], w["lookup_table"], w["bits"], w["in_features"],
                                    w["sparse_rows"], w["sparse_cols"], w["sparse_vals"], w["bias"])
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("block_rows", [4096, 7])  # one block, and blocks that cut the CSR rows apart
def test_many_bf16_rows_match_the_reference_within_bf16_rounding(monkeypatch, block_rows):
    monkeypatch.setattr(kernels, "_BF16_GEMM_BLOCK_ROWS", block_rows)
    w = layer(50, 96)
    x = torch.randn(2, kernels.BF16_GEMM_MIN_ROWS, 96).bfloat16()
    calls = []
    original = kernels._lut_matmul_bf16_gemm
    monkeypatch.setattr(kernels, "_lut_matmul_bf16_gemm", lambda *a: calls.append(1) or original(*a))
    y = kernels.lut_matmul(x, **w)
    assert calls, "bf16 activations above the threshold did not take the bf16 GEMM"
    assert y.dtype == torch.bfloat16 and y.shape == (2, kernels.BF16_GEMM_MIN_ROWS, 50)
    # the output alone rounds to bf16 at ~2e-3; the weight's rounding adds a little
    assert relative_error(y, x, w) < 4e-3


def test_few_bf16_rows_and_float32_keep_the_float32_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_lut_matmul_bf16_gemm", lambda *a: pytest.fail("bf16 GEMM used"))
    w = layer(40, 64)
    few = torch.randn(kernels.BF16_GEMM_MIN_ROWS - 1, 64).bfloat16()
    assert relative_error(kernels.lut_matmul(few, **w), few, w) < 3e-3
    many32 = torch.randn(64, 64)
    assert relative_error(kernels.lut_matmul(many32, **w), many32, w) < 1e-5


def test_layers_sharing_an_input_go_one_by_one_for_many_bf16_rows():
    w = layer(24, 32)
    args = (w["qweight"], w["lookup_table"], w["bits"], w["sparse_rows"], w["sparse_cols"], w["sparse_vals"],
            w["bias"])
    assert kernels.lut_matmul_many(torch.randn(kernels.BF16_GEMM_MIN_ROWS, 32).bfloat16(), [args, args], 32) is None
    assert kernels.lut_matmul_many(torch.randn(4, 32).bfloat16(), [args, args], 32) is not None
