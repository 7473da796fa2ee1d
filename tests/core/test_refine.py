"""Gradient-weighted refinement (core.refine): closed-form tables, the sweep is GPTQ's, the factored
objective is exact, monotone objective, exact sparse entries, bit-exact packing, and a tiny model whose
perplexity does not get worse."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_tiny_model
from core.layers import squeeze_linear_from_state
from core.models import quantizable_linears
from core.quantize import quantize_matrix, squeeze_module
from core.refine import (GradientHessians, Objective, decode, refine_matrix, refine_rows, refit_tables,
                         refit_tables_cg, row_objective, sparse_mask_of, sweep_codes, sweep_factor)


def _problem(out: int = 24, inn: int = 64, tokens: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    mix = torch.eye(inn) + 0.3 * torch.randn(inn, inn, generator=g)
    x = torch.randn(tokens, inn, generator=g) @ mix
    s = torch.rand(tokens, generator=g)
    h = (x * s[:, None]).t() @ x
    f = torch.rand(out, inn, generator=g)
    return w, f, h


def test_table_refit_equals_the_closed_form_least_squares():
    w, f, h = _problem()
    q = quantize_matrix(w, f, 3, threshold=2.0, sensitivity_percent=2.0)
    dense = ~sparse_mask_of(q, tuple(w.shape))
    assert (~dense).sum() > 0
    got = refit_tables(w, q.codes, dense, q.lookup_table.float(), h, ridge=0.0)
    by_cg = refit_tables_cg(w, q.codes, dense, q.lookup_table.float(), Objective(h), iterations=8)
    for r in range(w.shape[0]):
        d = dense[r]
        a = torch.nn.functional.one_hot(q.codes[r][d].long(), 8).double()  # [|D|, K]
        hd = h.double()[d][:, d]
        gram, rhs = a.t() @ hd @ a, a.t() @ hd @ w[r][d].double()
        used = gram.diagonal() > 0
        expected = torch.linalg.solve(gram[used][:, used], rhs[used])
        torch.testing.assert_close(got[r][used].double(), expected, rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(by_cg[r][used].double(), expected, rtol=2e-4, atol=2e-5)  # K steps: exact
        torch.testing.assert_close(by_cg[r][~used], q.lookup_table[r][~used].float())  # unused: unchanged
    # the closed form is a minimum: the objective with the refit table is no larger than with k-means's
    before = row_objective((w - decode(q.lookup_table, q.codes)) * dense, h)
    after = row_objective((w - decode(got, q.codes)) * dense, h)
    assert bool((after <= before * (1 + 1e-6)).all())


def test_an_unused_centroid_stays_where_it_was():
    w, _, h = _problem(out=4, inn=32)
    codes = torch.randint(0, 7, w.shape, dtype=torch.uint8)  # code 7 never used
    lut = torch.linspace(-2, 2, 8).repeat(4, 1)
    got = refit_tables(w, codes, torch.ones_like(w, dtype=torch.bool), lut, h)
    torch.testing.assert_close(got[:, 7], lut[:, 7])
    got = refit_tables_cg(w, codes, torch.ones_like(w, dtype=torch.bool), lut, Objective(h))
    torch.testing.assert_close(got[:, 7], lut[:, 7])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-only", "dense-and-sparse"])
def test_objective_never_increases_across_rounds(sparse):
    w, f, h = _problem(out=32, inn=96, seed=1)
    q = quantize_matrix(w, f, 3, threshold=2.2 if sparse else None, sensitivity_percent=1.0 if sparse else 0.0)
    dense = ~sparse_mask_of(q, tuple(w.shape))
    previous = None
    for rounds in range(0, 5):
        codes, lut, before, after, _ = refine_rows(w, q.codes, q.lookup_table, dense, h, rounds=rounds, tol=0.0)
        assert bool((after <= before).all())  # per row, never worse than k-means
        recomputed = row_objective((w - decode(lut, codes)) * dense, h)
        torch.testing.assert_close(recomputed, after, rtol=1e-5, atol=0.0)
        if previous is not None:
            assert bool((after <= previous).all())
        previous = after
    assert float(previous.sum()) < 0.8 * float(before.sum())  # and it does lower it on this problem


def _gptq_reference(w, codes, dense, lut, h, damp=0.01):
    """GPTQ's column loop, one row at a time in float64: quantize column j to the row's nearest table entry
    (sparse: the exact weight), spread (w_j - q_j) / U_jj over the later columns through row j of U, the
    upper Cholesky factor of the dampened inverse."""
    n = h.shape[0]
    hd = h.double() + damp * float(h.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    new = codes.clone()
    for r in range(w.shape[0]):
        row = w[r].double().clone()
        for j in range(n):
            pick = int((row[j] - lut[r].double()).abs().argmin())
            q = lut[r, pick].double() if dense[r, j] else w[r, j].double()
            if dense[r, j]:
                new[r, j] = pick
            row[j + 1:] -= (row[j] - q) / u[j, j] * u[j, j + 1:]
    return new


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-only", "dense-and-sparse"])
def test_the_sweep_is_gptq_with_the_rows_table_as_grid(sparse):
    w, f, h = _problem(out=12, inn=80, seed=4)  # 80 columns: two and a half blocks of the sweep
    q = quantize_matrix(w, f, 3, threshold=2.0 if sparse else None, sensitivity_percent=1.0 if sparse else 0.0)
    dense = ~sparse_mask_of(q, tuple(w.shape))
    lut = q.lookup_table.float()
    factor, shift = sweep_factor(h)
    codes, error, terms = sweep_codes(w, q.codes, dense, lut, factor)
    expected = _gptq_reference(w, q.codes, dense, lut, h)
    assert float((codes == expected).float().mean()) > 0.999  # the same choices (a float tie may differ)
    assert torch.equal(codes[~dense], q.codes[~dense])  # sparse entries keep their codes
    torch.testing.assert_close(error, (w - decode(lut, codes)) * dense)
    objective = Objective(h, (factor, shift))
    torch.testing.assert_close(terms, objective.terms(error), rtol=1e-5, atol=1e-5)
    assert float(objective.value(error).sum()) < 0.8 * float(row_objective((w - decode(lut, q.codes)) * dense, h).sum())


def test_the_factored_objective_equals_the_direct_one():
    w, _, h = _problem(out=16, inn=300, tokens=400, seed=6)  # 300 columns: blocks of the triangular products
    h[7, :] = 0
    h[:, 7] = 0  # an input never seen
    error = torch.randn(w.shape, generator=torch.Generator().manual_seed(7))
    direct, factored = Objective(h), Objective(h, sweep_factor(h))
    torch.testing.assert_close(factored.value(error), direct.value(error), rtol=1e-5, atol=0.0)
    expected = direct.gradient(error)
    assert float((factored.gradient(error) - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_sparse_entries_are_untouched():
    w, f, h = _problem(out=32, inn=96, seed=2)
    q = quantize_matrix(w, f, 3, threshold=1.8, sensitivity_percent=2.0)
    refined, stats = refine_matrix(w, f, q, h)
    assert stats.objective_after < stats.objective_before
    assert refined.n_sparse == q.n_sparse > 0 and refined.n_outliers == q.n_outliers
    for a, b in zip(refined.sparse[:2], q.sparse[:2]):
        assert torch.equal(a, b)  # same positions
    mask = sparse_mask_of(q, tuple(w.shape))
    module = squeeze_module(refined, 3, torch.nn.Linear(96, 32, bias=False))
    effective = module.dequantize()
    torch.testing.assert_close(effective[mask], w[mask], rtol=0, atol=1e-6)
    assert not torch.equal(refined.lookup_table, q.lookup_table)  # the tables did move
    assert bool((refined.lookup_table[:, 1:] >= refined.lookup_table[:, :-1]).all())  # still ascending


def test_refined_codes_pack_and_load_bit_exact(tmp_path):
    w, f, h = _problem(out=40, inn=80, seed=3)  # 80 inputs: a padded last group
    q = quantize_matrix(w, f, 3, threshold=2.0, sensitivity_percent=0.5)
    refined, _ = refine_matrix(w, f, q, torch.stack([h, 2 * h]))  # two channel groups
    module = squeeze_module(refined, 3, torch.nn.Linear(80, 40, bias=True))
    save_file(module.state_dict(), tmp_path / "m.safetensors")
    loaded = squeeze_linear_from_state("m", {f"m.{k}": v for k, v in load_file(tmp_path / "m.safetensors").items()},
                                       80)
    from core.packing import unpack_codes

    assert torch.equal(unpack_codes(loaded.qweight, 3, 80), refined.codes)
    assert torch.equal(loaded.lookup_table, refined.lookup_table)
    assert torch.equal(loaded.dequantize(), module.dequantize())


def test_hessians_match_the_definition():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(2, 5, 6)
    with GradientHessians({"lin": lin}) as rec, GradientHessians({"lin": lin}, groups=2) as rec2:
        y = lin(x)
        (y.sin().sum()).backward()
    g = torch.cos(lin(x)).detach().reshape(-1, 4)
    xs = x.reshape(-1, 6)
    s = g.square().mean(1)
    torch.testing.assert_close(rec.hessians["lin"], (xs * s[:, None]).t() @ xs)
    s2 = g.square()[:, 2:].mean(1)
    torch.testing.assert_close(rec2.hessians["lin"][1], (xs * s2[:, None]).t() @ xs)


def _loss(model, windows) -> float:
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def _trained_tiny_model(steps: int = 40):
    """A tiny llama (vocabulary 64) fitted for a moment to a noisy cyclic sequence: quantizing it costs loss."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> torch.Tensor:
        start = torch.randint(0, 64, (n, 1), generator=g)
        steps_ = torch.randint(1, 4, (n, 64), generator=g).cumsum(1)
        return (start + 7 * steps_) % 64

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = text(16)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), text(16), text(16)


def test_tiny_model_perplexity_does_not_get_worse():
    from core.progress import run_to_end
    from core.sensitivity import compute_fisher

    model, calibration, held_out = _trained_tiny_model()
    linears = quantizable_linears(model)
    with GradientHessians(linears) as rec:
        fisher = run_to_end(compute_fisher(model, calibration, linears))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _loss(model, held_out)
    losses = {}
    for refine in (False, True):
        model.load_state_dict(state)
        for name, lin in quantizable_linears(model).items():
            q = quantize_matrix(lin.weight, fisher[name], 2)  # 2 bits: a cost well above the noise
            if refine:
                q, _ = refine_matrix(lin.weight, fisher[name], q, rec.hessians[name])
            model.set_submodule(name, squeeze_module(q, 2, lin))
        losses[refine] = _loss(model, held_out)
        for name, lin in linears.items():
            model.set_submodule(name, lin)
    assert losses[False] > base + 0.004  # quantizing costs something measurable here (0.008)
    assert losses[True] - base <= 0.6 * (losses[False] - base)  # refining removes 45% of it (0.0043 left)
