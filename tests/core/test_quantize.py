import pytest
import torch

from core.config import OutlierConfig, QuantConfig
from core.layers import SqueezeLinear
from core.models import quantizable_linears
from core.progress import Cancelled, run_to_end
from core.quantize import quantize_matrix, quantize_model
from tests.conftest import build_tiny_model


def heavy_tailed(out=48, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[torch.rand(out, inp, generator=g) < 0.01] *= 15  # a few outliers, as in real LLM weights
    f = torch.rand(out, inp, generator=g) ** 6  # heavy-tailed sensitivity
    return w, f


def decode(q, bits):
    from core.packing import csr_to_dense

    dense = q.lookup_table.float().gather(1, q.codes.long())
    return dense + csr_to_dense(*q.sparse, dense.shape)


@pytest.mark.parametrize("bits", [3, 4])
def test_sparse_positions_are_reconstructed_exactly(bits):
    w, f = heavy_tailed()
    q = quantize_matrix(w, f, bits, threshold=0.1, sensitivity_percent=0.5)
    rows, cols, vals = q.sparse
    assert q.n_sparse == vals.numel() > 0
    rec = decode(q, bits)
    r = torch.repeat_interleave(torch.arange(w.shape[0]), (rows[1:] - rows[:-1]).long())
    assert torch.allclose(rec[r, cols.long()], w[r, cols.long()], atol=1e-7, rtol=0)
    assert q.lookup_table.shape == (w.shape[0], 1 << bits) and q.lookup_table.dtype == torch.float16


def test_dense_and_sparse_beats_dense_only_and_4bit_beats_3bit():
    w, f = heavy_tailed(seed=3)
    err = {}
    for bits in (3, 4):
        for name, (t, s) in {"dense": (None, 0.0), "ds": (0.06, 0.5)}.items():
            err[bits, name] = quantize_matrix(w, f, bits, threshold=t, sensitivity_percent=s).weighted_error
    assert err[4, "dense"] < err[3, "dense"]
    assert err[3, "ds"] < err[3, "dense"] and err[4, "ds"] < err[4, "dense"]


def test_4bit_non_uniform_error_is_small_on_gaussian_rows():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quantize_matrix(w, None, 4)
    sqnr_db = 20 * torch.log10(w.norm() / (w - decode(q, 4)).norm())
    assert sqnr_db > 19.5  # Lloyd-Max optimum for a Gaussian at 16 levels is ~20.2 dB


@pytest.mark.parametrize("threshold,sens", [(None, 0.0), (None, 0.05), (0.05, 0.0), (0.05, 0.05)])
def test_every_mode_runs_including_matrices_too_small_for_one_sensitive_value(threshold, sens):
    w, f = heavy_tailed(out=4, inp=8)  # 32 entries: 0.05% selects none
    q = quantize_matrix(w, f, 3, threshold=threshold, sensitivity_percent=sens)
    assert q.codes.shape == (4, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights_and_bad_fisher(dtype):
    w, f = heavy_tailed()
    f[0, :5] = float("nan")
    f[1] = -f[1]
    f[2] = 0.0
    q = quantize_matrix(w.to(dtype), f.to(dtype), 4, threshold=0.1, sensitivity_percent=0.05)
    assert torch.isfinite(q.lookup_table.float()).all()
    assert q.relative_error < 0.2


def test_tiny_models_quantize_and_still_predict(tiny_model):
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        ref = tiny_model(ids).logits
    names = list(quantizable_linears(tiny_model))
    fisher = {n: torch.rand_like(m.weight) for n, m in quantizable_linears(tiny_model).items()}
    config = QuantConfig(bits=4, outliers=OutlierConfig(percent=0.5), sensitivity_percent=0.5)
    report = run_to_end(quantize_model(tiny_model, config, fisher))
    assert all(isinstance(tiny_model.get_submodule(n), SqueezeLinear) for n in names)
    assert len(report.layers) == len(names)
    assert 0.5 < report.sparse_percent < 2.0
    from core.preview import packed_layer_bytes  # the size formula agrees with the stored buffers
    expected = sum(packed_layer_bytes(*layer.shape, 4, layer.sparse) for layer in report.layers)
    expected += sum(4 * m.out_features for n in names if (m := tiny_model.get_submodule(n)).bias is not None)
    assert report.quantized_bytes == expected
    assert report.bits_per_weight == pytest.approx(8 * expected / report.n_weights)
    with torch.no_grad():
        out = tiny_model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.15
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6


def test_stopping_between_matrices_leaves_remaining_layers_untouched():
    model = build_tiny_model("llama")
    names = list(quantizable_linears(model))
    events = []
    with pytest.raises(Cancelled):
        run_to_end(quantize_model(model, QuantConfig(bits=3), None), events.append,
                   should_stop=lambda: events[-1].stage == "quantize" and events[-1].done == 2)
    assert isinstance(model.get_submodule(names[1]), SqueezeLinear)
    assert isinstance(model.get_submodule(names[-1]), torch.nn.Linear)
