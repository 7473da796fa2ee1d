import pytest
import torch

from core.errors import UserError
from core.kernels import dequantize, lut_matmul
from core.layers import SqueezeLinear, squeeze_linear_from_state
from core.packing import csr_to_dense, dense_to_csr

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def parts(out, inp, bits, with_sparse, with_bias, seed=0):
    """(codes, fp16-exact LUT, sparse CSR or None, bias or None) for a random layer."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)
    lut = torch.randn(out, 1 << bits, generator=g).half().float()
    sparse = None
    if with_sparse:
        mask = torch.rand(out, inp, generator=g) < 0.05
        mask[0, -1] = True  # at least one entry, in the last input column
        sparse = dense_to_csr(torch.randn(out, inp, generator=g), mask)
    bias = torch.randn(out, generator=g) if with_bias else None
    return codes, lut, sparse, bias


def expected_weight(codes, lut, sparse):
    w = lut.gather(1, codes.long())
    return w + csr_to_dense(*sparse, w.shape) if sparse is not None else w


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("inp", [33, 192, 576])
@pytest.mark.parametrize("with_sparse,with_bias", [(False, False), (True, True), (True, False)])
def test_forward_is_x_times_lut_plus_sparse_plus_bias(bits, inp, with_sparse, with_bias):
    codes, lut, sparse, bias = parts(40, inp, bits, with_sparse, with_bias, seed=bits * inp)
    layer = SqueezeLinear.from_parts(codes, lut, bits, sparse=sparse, bias=bias)
    w = expected_weight(codes, lut, sparse)
    assert torch.equal(layer.dequantize(), w)
    for shape in [(inp,), (5, inp), (2, 3, inp)]:
        x = torch.randn(*shape)
        expected = x @ w.T + (bias if bias is not None else 0)
        y = layer(x)
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
        assert torch.allclose(y, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_keeps_the_input_dtype(dtype):
    codes, lut, sparse, bias = parts(24, 96, 3, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse, bias=bias.to(dtype))
    x = torch.randn(2, 3, 96).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 24)
    expected = x.float() @ expected_weight(codes, lut, sparse).T + bias.to(dtype).float()
    assert relative_error(y, expected) < TOLERANCE[dtype]


def test_lut_in_float32_is_kept_exactly():
    codes, _, sparse, _ = parts(8, 64, 4, True, False)
    lut = torch.randn(8, 16)  # not representable in fp16
    layer = SqueezeLinear.from_parts(codes, lut, 4, sparse=sparse, lut_dtype=torch.float32)
    assert layer.lookup_table.dtype == torch.float32
    assert torch.equal(layer.dequantize(), expected_weight(codes, lut, sparse))


def test_default_lut_is_float16():
    codes, _, _, _ = parts(8, 64, 3, False, False)
    lut = torch.randn(8, 8)
    layer = SqueezeLinear.from_parts(codes, lut, 3)
    assert layer.lookup_table.dtype == torch.float16
    assert torch.equal(layer.dequantize(), lut.half().float().gather(1, codes.long()))


def test_buffers_have_the_documented_shapes_and_dtypes():
    codes, lut, sparse, bias = parts(40, 33, 3, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse, bias=bias.bfloat16())
    nnz = sparse[2].numel()
    state = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "qweight": ((6, 40), torch.int32), "lookup_table": ((40, 8), torch.float16),
        "sparse_rows": ((41,), torch.int32), "sparse_cols": ((nnz,), torch.int32),
        "sparse_vals": ((nnz,), torch.float32), "bias": ((40,), torch.bfloat16)}
    assert layer.nnz == nnz
    assert "bias" not in SqueezeLinear(33, 40, 3).state_dict()


@pytest.mark.parametrize("with_sparse,with_bias", [(False, False), (True, True)])
def test_state_dict_round_trip_is_bit_exact(with_sparse, with_bias):
    codes, lut, sparse, bias = parts(40, 576, 3, with_sparse, with_bias)
    layer = SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse, bias=bias)
    fresh = SqueezeLinear(576, 40, 3, nnz=layer.nnz, bias=with_bias)
    fresh.load_state_dict(layer.state_dict())
    for key, tensor in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    x = torch.randn(3, 576)
    assert torch.equal(fresh(x), layer(x))


def test_meta_module_from_layout_loads_with_assign():
    codes, lut, sparse, bias = parts(16, 100, 4, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, 4, sparse=sparse, bias=bias.half())
    empty = SqueezeLinear.from_layout(layer.layout())
    assert all(t.is_meta for t in empty.buffers())
    empty.load_state_dict(layer.state_dict(), assign=True)
    assert not any(t.is_meta for t in empty.buffers())
    assert empty.bias.dtype == torch.float16 and empty.nnz == layer.nnz
    x = torch.randn(2, 100)
    assert torch.equal(empty(x), layer(x))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_module_sized_from_saved_tensors(bits):
    codes, lut, sparse, bias = parts(24, 200, bits, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, bits, sparse=sparse, bias=bias)
    state = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in layer.state_dict().items()}
    state["model.norm.weight"] = torch.ones(3)
    loaded = squeeze_linear_from_state("model.layers.0.mlp.up_proj", state, in_features=200)
    assert (loaded.bits, loaded.out_features, loaded.nnz) == (bits, 24, layer.nnz)
    x = torch.randn(4, 200)
    assert torch.equal(loaded(x), layer(x))


def test_module_from_incomplete_or_mismatched_tensors_is_a_user_error():
    codes, lut, sparse, _ = parts(24, 64, 3, True, False)
    state = SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse).state_dict()
    with pytest.raises(UserError, match="lacks sparse_vals"):
        squeeze_linear_from_state("", {k: v for k, v in state.items() if k != "sparse_vals"}, 64)
    with pytest.raises(UserError, match="bit width"):
        squeeze_linear_from_state("", state, 4000)
    with pytest.raises(UserError, match="do not fit"):
        squeeze_linear_from_state("", {**state, "sparse_rows": torch.zeros(3, dtype=torch.int32)}, 64)


def test_storage_bytes_is_the_sum_of_buffer_bytes():
    codes, lut, sparse, bias = parts(40, 576, 3, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse, bias=bias)
    assert layer.storage_bytes() == sum(t.nbytes for t in layer.state_dict().values())
    nnz = layer.nnz
    assert layer.storage_bytes() == 18 * 3 * 40 * 4 + 40 * 8 * 2 + 41 * 4 + nnz * 8 + 40 * 4


def test_empty_sparse_part_works():
    codes, lut, _, _ = parts(16, 64, 3, False, False)
    rows, cols, vals = dense_to_csr(torch.randn(16, 64), torch.zeros(16, 64, dtype=torch.bool))
    layer = SqueezeLinear.from_parts(codes, lut, 3, sparse=(rows, cols, vals))
    assert layer.nnz == 0
    assert torch.equal(layer.dequantize(), expected_weight(codes, lut, None))
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), x @ expected_weight(codes, lut, None).T, atol=1e-5)


def test_repr_names_the_shape_bits_nnz_and_lut_dtype():
    codes, lut, sparse, _ = parts(16, 64, 3, True, False)
    text = repr(SqueezeLinear.from_parts(codes, lut, 3, sparse=sparse))
    for part in ("in_features=64", "out_features=16", "bits=3", f"nnz={sparse[2].numel()}", "float16"):
        assert part in text


def test_kernel_functions_agree_with_the_layer_and_check_the_input_width():
    codes, lut, sparse, bias = parts(16, 64, 4, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, 4, sparse=sparse, bias=bias)
    args = (layer.qweight, layer.lookup_table, 4, 64, *sparse)
    assert torch.equal(dequantize(*args), layer.dequantize())
    x = torch.randn(3, 64)
    assert torch.equal(lut_matmul(x, *args, bias=bias), layer(x))
    with pytest.raises(ValueError, match="expects 64"):
        layer(torch.randn(3, 63))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_on_cuda_matches_the_cpu(bits):
    codes, lut, sparse, bias = parts(40, 576, bits, True, True)
    layer = SqueezeLinear.from_parts(codes, lut, bits, sparse=sparse, bias=bias)
    on_gpu = SqueezeLinear.from_parts(codes.cuda(), lut.cuda(), bits, sparse=tuple(t.cuda() for t in sparse),
                                      bias=bias.cuda())
    for key, tensor in layer.state_dict().items():
        assert torch.equal(on_gpu.state_dict()[key].cpu(), tensor), key
    assert torch.equal(on_gpu.dequantize().cpu(), layer.dequantize())
    x = torch.randn(3, 576)
    assert torch.allclose(on_gpu(x.cuda()).cpu(), layer(x), atol=1e-3)
