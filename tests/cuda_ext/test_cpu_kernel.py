"""The compiled CPU kernel against the torch reference (core.kernels), and its build/fallback rules."""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn.functional as F

import cuda_ext
from core import kernels
from core.layers import SqueezeLinear
from core.packing import dense_to_csr, pack_codes

SHAPES = [(576, 1536), (1536, 576), (33, 7), (64, 192)]


@pytest.fixture(scope="module")
def cpu():
    if not cuda_ext.is_available("cpu"):
        pytest.skip(f"CPU kernel unavailable: {cuda_ext.unavailable_reason('cpu')}")
    from cuda_ext import cpu

    return cpu


def random_layer(in_features, out_features, bits, *, density=0.01, lut_dtype=torch.float16, bias=False,
                 seed=0):
    """Packed weights with random codes/LUT and a random CSR residual (nnz 0 when density is 0)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    lut = torch.randn(out_features, 1 << bits, generator=g).to(lut_dtype)
    mask = torch.rand(out_features, in_features, generator=g) < density
    rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features, generator=g), mask)
    b = torch.randn(out_features, generator=g) if bias else None
    return dict(qweight=pack_codes(codes, bits), lookup_table=lut, bits=bits, in_features=in_features,
                sparse_rows=rows, sparse_cols=cols, sparse_vals=vals, bias=b)


def reference(x, layer):
    """What the torch path computes: dequantize to fp32, one fp32 GEMM, back to x's dtype."""
    weight = kernels.dequantize(layer["qweight"], layer["lookup_table"], layer["bits"], layer["in_features"],
                                layer["sparse_rows"], layer["sparse_cols"], layer["sparse_vals"])
    bias = layer["bias"].float() if layer["bias"] is not None else None
    return F.linear(x.float(), weight, bias)


def assert_close_to_reference(y, x, layer):
    """fp32 sums in another order: equal up to fp32 rounding (bf16 outputs: to one bf16 step)."""
    expected = reference(x, layer)
    assert y.dtype == x.dtype and y.shape == expected.shape
    scale = expected.abs().max().clamp_min(1.0)
    tolerance = 1e-5 if x.dtype == torch.float32 else 2 ** -7
    assert (y.float() - expected).abs().max() <= tolerance * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_is_bit_exact(cpu, bits, shape):
    layer = random_layer(*shape, bits, lut_dtype=torch.float32)
    args = [layer[k] for k in ("qweight", "lookup_table", "bits", "in_features", "sparse_rows", "sparse_cols",
                               "sparse_vals")]
    assert torch.equal(cpu.dequantize(*args), kernels.dequantize(*args))


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_matmul_matches_reference(cpu, bits, shape, rows):
    layer = random_layer(*shape, bits, bias=rows % 2 == 1, seed=rows)
    x = torch.randn(rows, shape[0])
    assert_close_to_reference(cpu.lut_matmul(x, **layer), x, layer)


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_batches_and_two_bit(cpu, rows, dtype):
    layer = random_layer(96, 80, 2, lut_dtype=torch.bfloat16, bias=True)
    layer["bias"] = layer["bias"].to(torch.bfloat16)
    x = torch.randn(2, rows, 96).to(dtype)  # leading dims are kept
    y = cpu.lut_matmul(x, **layer)
    assert y.shape == (2, rows, 80)
    assert_close_to_reference(y.reshape(-1, 80), x.reshape(-1, 96), layer)


@pytest.mark.parametrize("density", [0.0, 0.05], ids=["nnz0", "sparse"])
@pytest.mark.parametrize("rows", [1, 64])
def test_sparse_part_and_empty_sparse(cpu, density, rows):
    layer = random_layer(64, 192, 3, density=density, lut_dtype=torch.float32)
    assert (layer["sparse_vals"].numel() == 0) == (density == 0.0)
    x = torch.randn(rows, 64)
    assert_close_to_reference(cpu.lut_matmul(x, **layer), x, layer)
    no_sparse = dict(layer, sparse_rows=None, sparse_cols=None, sparse_vals=None)
    assert_close_to_reference(cpu.lut_matmul(x, **no_sparse), x, no_sparse)


def test_both_paths_agree_around_the_crossover(cpu):
    layer = random_layer(576, 192, 4, bias=True)
    x = torch.randn(12, 576)
    matvec = cpu.lut_matmul(x, **layer, max_matvec_rows=16)
    gemm = cpu.lut_matmul(x, **layer, max_matvec_rows=0)
    assert torch.allclose(matvec, gemm, rtol=1e-5, atol=1e-4)


def test_corrupt_sparse_indices_raise_instead_of_reading_out_of_bounds(cpu):
    layer = random_layer(64, 16, 4, density=0.2)
    layer["sparse_cols"] = layer["sparse_cols"].clone()
    layer["sparse_cols"][0] = 64
    for rows in (1, 20):
        with pytest.raises(RuntimeError, match="out of range"):
            cpu.lut_matmul(torch.randn(rows, 64), **layer)


def test_squeeze_linear_uses_the_kernel_and_the_reference_when_asked(cpu, monkeypatch):
    codes = torch.randint(0, 16, (192, 64), dtype=torch.uint8)
    module = SqueezeLinear.from_parts(codes, torch.randn(192, 16), 4, bias=torch.randn(192))
    x = torch.randn(2, 64)
    monkeypatch.delenv("SQUEEZE_KERNELS", raising=False)
    assert kernels._backend(x.device) == "cpu-ext"
    fast = module(x)
    monkeypatch.setenv("SQUEEZE_KERNELS", "torch")
    assert kernels._backend(x.device) == "torch"
    assert torch.allclose(fast, module(x), rtol=1e-5, atol=1e-5)


def test_gradients_still_flow_through_the_reference(cpu):
    codes = torch.randint(0, 8, (16, 64), dtype=torch.uint8)
    module = SqueezeLinear.from_parts(codes, torch.randn(16, 8), 3)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_torch_compile_traces_the_op(cpu):
    layer = random_layer(64, 48, 4, bias=True)
    x = torch.randn(1, 64)

    def forward(inputs):
        return torch.ops.squeeze.lut_matmul_cpu(inputs, layer["qweight"], layer["lookup_table"], 4, 64,
                                                layer["sparse_rows"], layer["sparse_cols"], layer["sparse_vals"],
                                                layer["bias"]) * 2

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), forward(x))


def test_a_failed_build_logs_once_and_is_not_retried(monkeypatch, caplog):
    calls = []

    def build():
        calls.append(1)
        raise RuntimeError("error: fake compiler failure")

    fake = types.SimpleNamespace(missing_requirement=lambda: None, build=build)
    monkeypatch.setitem(cuda_ext._MODULES, "fake", "fake_kernels")
    monkeypatch.setattr(cuda_ext, "_module", lambda kind: fake)
    with caplog.at_level(logging.WARNING, logger="cuda_ext"):
        assert not cuda_ext.is_available("fake")
        assert not cuda_ext.is_available("fake")
    assert "fake compiler failure" in cuda_ext.unavailable_reason("fake")
    assert len(calls) == 1
    assert len([r for r in caplog.records if "fake kernels unavailable" in r.getMessage()]) == 1
    cuda_ext._failed.pop("fake", None)


def test_a_missing_compiler_is_a_reason_not_a_crash(monkeypatch):
    from cuda_ext import jit

    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(jit.shutil, "which", lambda name: None)
    assert "no C++ compiler" in jit.compiler_missing()


@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_lookup_table_dtype(cpu, lut_dtype, bits):
    for shape in ((33, 7), (64, 300)):
        layer = random_layer(*shape, bits, lut_dtype=lut_dtype, bias=True)
        x = torch.randn(2, shape[0])
        assert_close_to_reference(cpu.lut_matmul(x, **layer), x, layer)
        args = [layer[k] for k in ("qweight", "lookup_table", "bits", "in_features", "sparse_rows", "sparse_cols",
                                   "sparse_vals")]
        assert torch.equal(cpu.dequantize(*args), kernels.dequantize(*args))


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 33])
@pytest.mark.parametrize("in_features", [576, 77])
def test_fp16_head_matches_fp32_linear_of_its_weights(cpu, rows, in_features):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(1000, in_features, generator=g).half()
    x = torch.randn(rows, in_features, generator=g)
    expected = F.linear(x, weight.float())
    for max_rows in (0, 8, 64):  # GEMM path, default, mat-vec path for every row count
        y = cpu.half_linear(x, weight, None, max_rows)
        assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    bias = torch.randn(1000, generator=g)
    assert torch.allclose(cpu.half_linear(x, weight, bias), expected + bias, rtol=1e-5, atol=1e-4)


def test_fp16_head_traces_and_checks_its_weight(cpu):
    weight = torch.randn(48, 64).half()
    compiled = torch.compile(lambda inputs: torch.ops.squeeze.half_linear_cpu(inputs, weight, None) * 2,
                             backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 64)
    assert torch.allclose(compiled(x), cpu.half_linear(x, weight) * 2)
    with pytest.raises(RuntimeError, match="float16"):
        cpu.half_linear(x, weight.float())
