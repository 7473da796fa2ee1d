"""The CUDA LUT kernels against the torch reference, and the fallback everywhere else.

Tests marked ``cuda`` need an NVIDIA GPU and a CUDA build of torch with nvcc; they skip
otherwise (and fail, not skip, when a GPU is there but the build breaks). The rest run on any
machine: the ops' fake implementations, the backend choice, and the one-line fallback.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import cuda_ext
from core import kernels
from core.layers import SqueezeLinear
from core.packing import dense_to_csr, pack_codes
from cuda_ext import ops
from cuda_ext.build import build_kernels, describe_build

HAS_GPU = torch.cuda.is_available()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# ||kernel - reference|| / ||reference|| allowed per activation dtype: float32 sums in another
# order; float16 / bfloat16 outputs (and, above the batch threshold, weights) are rounded.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GEMM_REL_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def cuda_ops():
    """cuda_ext.ops with its library built and loaded (skips without a GPU or a toolchain)."""
    if not HAS_GPU:
        pytest.skip("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    missing = ops.missing_requirement()
    if missing:
        pytest.skip(f"the CUDA kernels cannot be built here: {missing}")
    assert cuda_ext.is_available("cuda"), f"building the CUDA kernels failed: {cuda_ext.unavailable_reason('cuda')}"
    return ops


def make_weights(out_features: int, in_features: int, bits: int, device="cpu", lut_dtype=torch.float16,
                 bias: bool = True, seed: int = 0) -> dict:
    """Random packed weights with a CSR residual of very uneven rows (one row holds half its inputs)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), dtype=torch.uint8, generator=g)
    lut = torch.randn(out_features, 1 << bits, generator=g).sort(dim=1).values
    mask = torch.rand(out_features, in_features, generator=g) < 0.005
    mask[0, : max(1, in_features // 2)] = True
    rows, cols, vals = dense_to_csr(torch.randn(out_features, in_features, generator=g), mask)
    weights = dict(qweight=pack_codes(codes, bits), lookup_table=lut.to(lut_dtype), sparse_rows=rows,
                   sparse_cols=cols, sparse_vals=vals, bias=torch.randn(out_features, generator=g) if bias else None)
    return {k: (v.to(device) if v is not None else None) for k, v in weights.items()} | dict(bits=bits,
                                                                                         in_features=in_features)


def reference(x: torch.Tensor, w: dict) -> torch.Tensor:
    """The oracle: dense float32 weight from core.kernels, float32 GEMM, result in float32."""
    weight = kernels.dequantize(w["qweight"], w["lookup_table"], w["bits"], w["in_features"], w["sparse_rows"],
                                w["sparse_cols"], w["sparse_vals"])
    bias = w["bias"].float() if w["bias"] is not None else None
    return F.linear(x.float(), weight, bias)


def run_kernel(x: torch.Tensor, w: dict) -> torch.Tensor:
    return ops.lut_matmul(x, w["qweight"], w["lookup_table"], w["bits"], w["in_features"], w["sparse_rows"],
                          w["sparse_cols"], w["sparse_vals"], w["bias"])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(actual).all()
    error = (actual.float() - expected).norm() / expected.norm().clamp_min(1e-12)
    assert error.item() < tol, f"relative error {error.item():.2e} exceeds {tol:.0e}"


# ---------------------------------------------------------------- GPU: kernels against the oracle


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 7), (7, 33), (33, 1), (192, 576), (576, 192)])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_lut_matmul_matches_reference(cuda_ops, dtype, bits, out_features, in_features, rows):
    w = make_weights(out_features, in_features, bits, "cuda", seed=rows)
    x = torch.randn(rows, in_features, device="cuda").to(dtype)
    y = run_kernel(x, w)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    tol = (GEMM_REL_TOL if rows >= ops.DEQUANTIZE_MIN_ROWS else REL_TOL)[dtype]
    assert_matches(y, reference(x, w), tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_llama_sized_matrix(cuda_ops, dtype, bits, rows):
    w = make_weights(4096, 11008, bits, "cuda")
    x = torch.randn(rows, 11008, device="cuda").to(dtype)
    tol = (GEMM_REL_TOL if rows >= ops.DEQUANTIZE_MIN_ROWS else REL_TOL)[dtype]
    assert_matches(run_kernel(x, w), reference(x, w), tol)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_non_contiguous_and_3d_input(cuda_ops, rows):
    w = make_weights(192, 576, 3, "cuda")
    wide = torch.randn(rows, 2 * 576, device="cuda", dtype=torch.float16)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    assert_matches(run_kernel(x, w), reference(x, w), GEMM_REL_TOL[torch.float16])
    x3 = torch.randn(576, rows, 2, device="cuda", dtype=torch.float16).permute(2, 1, 0)  # [2, rows, 576]
    y3 = run_kernel(x3, w)
    assert y3.shape == (2, rows, 192)
    assert_matches(y3, reference(x3, w), GEMM_REL_TOL[torch.float16])


@pytest.mark.cuda
@pytest.mark.parametrize("lut_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_lut_dtype_and_width(cuda_ops, lut_dtype, bits):
    w = make_weights(100, 300, bits, "cuda", lut_dtype=lut_dtype)
    for rows in (1, 3, 8, 64):
        x = torch.randn(rows, 300, device="cuda")
        assert_matches(run_kernel(x, w), reference(x, w), GEMM_REL_TOL[torch.float32])


@pytest.mark.cuda
def test_batches_between_8_rows_and_the_threshold_run_in_chunks(cuda_ops):
    w = make_weights(192, 576, 4, "cuda")
    for rows in (9, 10, ops.DEQUANTIZE_MIN_ROWS - 1, ops.DEQUANTIZE_MIN_ROWS, 17):
        x = torch.randn(rows, 576, device="cuda")
        assert_matches(run_kernel(x, w), reference(x, w), GEMM_REL_TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_matches_reference(cuda_ops, dtype):
    w = make_weights(576, 192, 3, "cuda")
    expected = kernels.dequantize(w["qweight"], w["lookup_table"], 3, 192, w["sparse_rows"], w["sparse_cols"],
                                  w["sparse_vals"])
    actual = ops.dequantize(w["qweight"], w["lookup_table"], 3, 192, w["sparse_rows"], w["sparse_cols"],
                            w["sparse_vals"], dtype=dtype)
    assert actual.shape == (576, 192) and actual.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected)
    else:  # the sparse entries are rounded twice (dense value, then the sum)
        torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=1e-2)


@pytest.mark.cuda
def test_residual_only_rows_and_empty_rows(cuda_ops):
    """Rows with no residual between rows with many; nnz not a multiple of the per-thread count."""
    w = make_weights(50, 1000, 4, "cuda", bias=False)
    mask = torch.zeros(50, 1000, dtype=torch.bool)
    mask[3, :999] = True
    mask[4, 7] = True
    mask[49, ::3] = True
    w["sparse_rows"], w["sparse_cols"], w["sparse_vals"] = (
        t.cuda() for t in dense_to_csr(torch.randn(50, 1000), mask))
    for rows in (1, 2, 8):
        x = torch.randn(rows, 1000, device="cuda")
        assert_matches(run_kernel(x, w), reference(x, w), REL_TOL[torch.float32])


@pytest.mark.cuda
def test_inputs_are_left_untouched(cuda_ops):
    w = make_weights(64, 96, 3, "cuda")
    before = {k: v.clone() for k, v in w.items() if isinstance(v, torch.Tensor)}
    x = torch.randn(1, 96, device="cuda")
    x_before = x.clone()
    run_kernel(x, w)
    run_kernel(torch.randn(64, 96, device="cuda"), w)
    torch.cuda.synchronize()
    assert torch.equal(x, x_before)
    for name, tensor in before.items():
        assert torch.equal(w[name], tensor), name


@pytest.mark.cuda
def test_bad_shapes_raise_clear_errors(cuda_ops):
    w = make_weights(64, 96, 3, "cuda")
    with pytest.raises(RuntimeError, match="qweight must be"):
        ops.lut_matmul(torch.randn(1, 96, device="cuda"), w["qweight"][:-1], w["lookup_table"], 3, 96)
    with pytest.raises(RuntimeError, match="lookup_table must be"):
        ops.lut_matmul(torch.randn(1, 96, device="cuda"), w["qweight"], w["lookup_table"][:, :4], 3, 96)


@pytest.mark.cuda
def test_opcheck(cuda_ops):
    w = make_weights(64, 96, 3, "cuda")
    parts = (w["qweight"], w["lookup_table"], 3, 96, w["sparse_rows"], w["sparse_cols"], w["sparse_vals"])
    torch.library.opcheck(torch.ops.squeeze_cuda.lut_gemv.default,
                          (torch.randn(3, 96, device="cuda", dtype=torch.float16), *parts, w["bias"]))
    torch.library.opcheck(torch.ops.squeeze_cuda.lut_dequantize.default, (*parts, torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 64])
def test_torch_compile_fullgraph(cuda_ops, rows):
    w = make_weights(192, 576, 3, "cuda")
    compiled = torch.compile(run_kernel, fullgraph=True)
    x = torch.randn(rows, 576, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(compiled(x, w), run_kernel(x, w))


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 40])  # mat-vec and dequantize + GEMM, both with a CSR residual
def test_cuda_graph_capture_and_replay(cuda_ops, rows):
    """A layer with a sparse residual captures (its corrupt-index check reads nothing back while capturing)."""
    w = make_weights(192, 576, 4, "cuda")
    assert w["sparse_vals"].numel() > 0
    static_x = torch.randn(rows, 576, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_kernel(static_x, w)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run_kernel(static_x, w)
    static_x.copy_(torch.randn(rows, 576, device="cuda", dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, run_kernel(static_x, w))


@pytest.mark.cuda
def test_squeeze_linear_uses_the_kernels_when_opted_in(cuda_ops, monkeypatch):
    w = make_weights(192, 576, 3)
    layer = SqueezeLinear(576, 192, 3, nnz=w["sparse_vals"].numel(), bias=True)
    layer.load_state_dict({k: w[k] for k in ("qweight", "lookup_table", "sparse_rows", "sparse_cols",
                                             "sparse_vals", "bias")})
    layer = layer.cuda()
    x = torch.randn(2, 3, 576, device="cuda", dtype=torch.float16)
    calls = []
    original = ops.lut_matmul
    monkeypatch.setattr(ops, "lut_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("SQUEEZE_KERNELS", "cuda")
    with torch.no_grad():
        fast = layer(x)
    monkeypatch.setenv("SQUEEZE_KERNELS", "torch")
    with torch.no_grad():
        slow = layer(x)
    assert calls, "SQUEEZE_KERNELS=cuda did not route SqueezeLinear through the CUDA kernels"
    assert_matches(fast, slow.float(), REL_TOL[torch.float16])


# ---------------------------------------------------------------- everywhere: fallback and tracing


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the kernels may be available")
def test_unavailable_without_gpu_with_a_reason():
    assert not cuda_ext.is_available("cuda")
    reason = cuda_ext.unavailable_reason("cuda")
    assert isinstance(reason, str) and ("CUDA" in reason or "GPU" in reason or "nvcc" in reason)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: no fallback happens")
def test_opt_in_without_gpu_logs_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.delitem(cuda_ext._failed, "cuda", raising=False)  # forget an earlier test's verdict
    w = make_weights(24, 40, 3)
    x = torch.randn(3, 40)
    monkeypatch.setenv("SQUEEZE_KERNELS", "cuda")
    with caplog.at_level(logging.WARNING, logger="cuda_ext"):
        outputs = [kernels.lut_matmul(x, w["qweight"], w["lookup_table"], 3, 40, w["sparse_rows"],
                                      w["sparse_cols"], w["sparse_vals"], w["bias"]) for _ in range(3)]
    lines = [r.getMessage() for r in caplog.records if "cuda" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "torch reference" in lines[0]
    for y in outputs:
        torch.testing.assert_close(y, reference(x, w))


def test_cuda_kernels_serve_cuda_tensors_by_default(monkeypatch):
    """Where they build, the CUDA kernels serve CUDA tensors unless SQUEEZE_KERNELS says otherwise."""
    monkeypatch.setattr(cuda_ext, "is_available", lambda kind="cpu": kind == "cuda")
    monkeypatch.setattr(kernels, "_BACKENDS", {})  # no verdict remembered from another test
    cuda = torch.device("cuda")
    monkeypatch.delenv("SQUEEZE_KERNELS", raising=False)
    assert kernels._backend(cuda) == "cuda-ext"
    for choice, expected in (("auto", "cuda-ext"), ("cuda", "cuda-ext"), ("torch", "torch"), ("cpu", "torch")):
        monkeypatch.setenv("SQUEEZE_KERNELS", choice)
        assert kernels._backend(cuda) == expected, choice
    monkeypatch.setenv("SQUEEZE_KERNELS", "cuda")
    assert kernels._backend(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("rows", [1, 8, 31, 32, 512])
def test_fake_implementations_trace_both_paths(rows):
    """torch.compile / CUDA graphs see the ops through their fake kernels (meta tensors here)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def meta(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def fn(x, qweight, lut, sparse_rows, sparse_cols, sparse_vals, bias):
        return ops.lut_matmul(x, qweight, lut, 3, 576, sparse_rows, sparse_cols, sparse_vals, bias)

    args = (meta(2, rows, 576, dtype=torch.bfloat16), meta(18 * 3, 192, dtype=torch.int32), meta(192, 8),
            meta(193, dtype=torch.int32), meta(10, dtype=torch.int32), meta(10, dtype=torch.float32), meta(192))
    graph = make_fx(fn, tracing_mode="fake")(*args)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    expected = "squeeze_cuda.lut_gemv" if 2 * rows < ops.DEQUANTIZE_MIN_ROWS else "squeeze_cuda.lut_dequantize"
    assert any(expected in t for t in targets), targets
    y = fn(*args)
    assert y.shape == (2, rows, 192) and y.dtype == torch.bfloat16


def test_unsupported_width_is_refused_before_any_kernel():
    with pytest.raises(ValueError, match="bit codes"):
        ops.lut_matmul(torch.randn(1, 32), torch.zeros(5, 4, dtype=torch.int32), torch.zeros(4, 32), 5, 32)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the build may succeed")
def test_build_kernels_reports_why_cuda_is_unavailable():
    results = build_kernels(["cuda"])
    assert results["cuda"]
    assert describe_build(results).startswith("cuda kernels: unavailable: ")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the benchmark would measure")
def test_benchmark_refuses_to_write_numbers_without_gpu(monkeypatch, capsys):
    from bench import kernels as bench_kernels

    monkeypatch.setattr(bench_kernels, "update_section", lambda *a, **k: pytest.fail("wrote BENCHMARKS.md"))
    assert bench_kernels.main([]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
