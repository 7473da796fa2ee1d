"""Gradient-weighted refinement of SqueezeLLM codes and lookup tables (LNQ-style), same storage format.

The k-means of ``core.quantize`` minimises a Fisher-*diagonal* error per row. Here each row r is
refined against the layer-wise objective weighted by the output gradients (GuidedQuant, Kim et
al. 2025)::

    f_r = (w_r - ŵ_r)^T H (w_r - ŵ_r),   H = Σ_t s_t x_t x_t^T

x_t the layer's input at token t, s_t the squared loss gradient of the layer's output at t
averaged over output channels (one group; with G groups, rows are split into G contiguous
groups with their own H). Sparse entries are exact, so their error is 0 whatever the table: they
stay outside the fit. Alternating, per row, from the k-means solution:

(a) the codes, table fixed: a GPTQ-style column sweep from the weights (columns by decreasing H_jj)
    with error feedback, the row's table as its grid, all rows at once: with M lower triangular and
    MᵀM = H + dampening, column k takes the entry nearest w_k + Σ_{j<k} M_kj e_j / M_kk (Babai's
    nearest plane; the same choices as GPTQ's feedback through the inverse's Cholesky factor, with
    one factorisation and no inverse). Sparse entries keep the exact weight (error 0);
(b) the table, codes fixed: one Jacobi-preconditioned conjugate-gradient step with exact line search
    on the K x K weighted least squares ``(AᵀH_DD A) c = AᵀH_DD w_D`` (A the one-hot code matrix on
    the dense entries D), unused centroids left in place (``refit_tables`` is the closed form, and K
    steps of ``refit_tables_cg`` reach it).

Objectives and gradients are taken through the same factor (``Objective``): ‖M e‖² minus the
dampening, half a product each. Every state is scored on the fp16 table and each row keeps its best,
so the objective never increases and never ends worse than k-means's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from core.packing import csr_row_indices

SWEEP_BLOCK = 32  # columns per block of the sweep (earlier blocks' errors: one product per block)
ONE_HOT_BYTES = 64 << 20  # rows of one-hot codes materialised at a time in the table refit
ROUNDS = 1  # sweep + refit rounds: on the demo's real H (blocks 3, 15, 27, 3-bit) the objective falls to 0.449 of
# k-means's after one, 0.440 after two, 0.436 after three; the streamed demo's quantize step took 2.0x k-means's with
# one round, 2.9x with two (one process each, loaded 2-core machine)
REFINE_BYTES_PER_WEIGHT = 100  # peak temporaries of refine_matrix: 91-99 bytes per weight measured at 1024 x 2048
# and 2048 x 1024 (H, its factor and a dozen [out, in] float32 / int64 copies); core.memory_plan counts it
CG_STEPS = 1  # conjugate-gradient steps per table refit: on the demo's real H, 2 or 4 lower the objective
# by 0.2% more for one or three more products of the matrix with H


@dataclass(frozen=True)
class RefineStats:
    """What refining one matrix did: summed row objectives before/after, rounds run, seconds."""

    objective_before: float
    objective_after: float
    rounds: int
    seconds: float


class GradientHessians:
    """While active, accumulates H = Σ_t s_t x_t x_tᵀ for every given ``nn.Linear`` in float32.

    x_t: the layer's input at token t; s_t: the squared loss gradient of its output at t averaged
    over output channels (``groups`` > 1: over each of that many contiguous channel groups). Every
    backward through the layers adds to ``hessians``: name -> float32 [in, in] (or [groups, in, in]).
    Forward passes without a backward add nothing.
    """

    def __init__(self, linears: dict, groups: int = 1, device: torch.device | str | None = None) -> None:
        self.linears, self.groups = linears, groups
        self.hessians: dict[str, torch.Tensor] = {}
        for name, lin in linears.items():
            n = lin.in_features
            shape = (groups, n, n) if groups > 1 else (n, n)
            self.hessians[name] = torch.zeros(shape, dtype=torch.float32, device=device or lin.weight.device)
        self._handles: list = []

    def __enter__(self) -> GradientHessians:
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_hook(self._on_forward(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, name: str):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda grad: self._add(name, x, grad))
        return hook

    def _add(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        h = self.hessians[name]
        xf = x.reshape(-1, x.shape[-1]).to(device=h.device, dtype=torch.float32)
        g2 = grad.reshape(-1, grad.shape[-1]).to(device=h.device, dtype=torch.float32).square()
        if self.groups == 1:
            h.addmm_((xf * g2.mean(1, keepdim=True)).t(), xf)
        else:  # every group's Σ s_gt x_t x_tᵀ in one product: [G * in, tokens] @ [tokens, in]
            s = g2.view(g2.shape[0], self.groups, -1).mean(2)
            weighted = (s.unsqueeze(2) * xf.unsqueeze(1)).reshape(xf.shape[0], -1)
            h.view(-1, h.shape[-1]).addmm_(weighted.t(), xf)


def check_groups(linears: dict, groups: int) -> None:
    """UserError naming the first ``nn.Linear`` whose output rows ``groups`` channel groups do not divide,
    and the group counts that divide every one of them (refinement's H has one [in, in] per group)."""
    from core.config import MAX_REFINE_GROUPS
    from core.errors import UserError

    for name, lin in linears.items():
        if lin.out_features % groups:
            common = math.gcd(*(m.out_features for m in linears.values()))
            fits = ", ".join(str(g) for g in range(1, min(common, MAX_REFINE_GROUPS) + 1) if common % g == 0)
            raise UserError(f"refinement's {groups} channel groups do not divide the {lin.out_features} output rows "
                            f"of {name}: use a group count that divides every matrix's rows ({fits})")


def sparse_mask_of(q, shape: tuple[int, int]) -> torch.Tensor:
    """bool [out, in]: the entries held exactly in ``q``'s CSR part (a ``QuantizedMatrix``)."""
    rows, cols, vals = q.sparse
    mask = torch.zeros(shape, dtype=torch.bool)
    if vals.numel():
        mask[csr_row_indices(rows, vals.numel()), cols.long()] = True
    return mask


def row_objective(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """error float [out, in], hessian float32 [in, in] -> float64 [out]: eᵣᵀ H eᵣ per row."""
    e = error.float()
    return ((e @ hessian) * e).double().sum(1)


def decode(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """lut float [out, K], codes integer [out, in] -> float32 [out, in]: lut[r, codes[r, j]]."""
    return lut.float().gather(1, codes.long())


def refit_tables(weight: torch.Tensor, codes: torch.Tensor, dense: torch.Tensor, lut: torch.Tensor,
                 hessian: torch.Tensor, ridge: float = 1e-7) -> torch.Tensor:
    """Each row's table by weighted least squares under ``hessian`` with its codes fixed.

    weight float [out, in]; codes integer [out, in]; dense bool [out, in] (False: exact sparse entry,
    outside the fit); lut float [out, K] (the current table: where a centroid is unused, or the system
    is singular, the ridge keeps it there); hessian float32 [in, in]. Returns float32 [out, K]
    solving ``(AᵀH_DD A + εI) c = AᵀH_DD w_D + ε c_old`` per row, ε = ridge * mean diag(AᵀH_DD A).
    """
    out_features, in_features = weight.shape
    k = lut.shape[1]
    w = (weight.float() * dense).contiguous()
    labels = torch.arange(k, device=codes.device).view(1, k, 1)
    chunk = max(1, ONE_HOT_BYTES // (4 * k * in_features))
    result = torch.empty(out_features, k, dtype=torch.float32, device=weight.device)
    for r0 in range(0, out_features, chunk):
        r1 = min(out_features, r0 + chunk)
        one_hot = ((codes[r0:r1, None, :].long() == labels) & dense[r0:r1, None, :]).float()  # [R, K, in]
        projected = (one_hot.reshape(-1, in_features) @ hessian).view(r1 - r0, k, in_features)  # AᵀH
        gram = torch.einsum("rki,rli->rkl", projected, one_hot).double()
        rhs = torch.einsum("rki,ri->rk", projected, w[r0:r1]).double()
        gram = 0.5 * (gram + gram.transpose(1, 2))
        eps = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(0) + torch.finfo(torch.float64).tiny
        gram = gram + eps.view(-1, 1, 1) * torch.eye(k, dtype=torch.float64, device=gram.device)
        rhs = rhs + eps.view(-1, 1) * lut[r0:r1].double()
        result[r0:r1] = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1).float()
    return result


class Objective:
    """Row objectives eᵀHe and gradients E H of error matrices E float32 [out, in] under one H.

    With ``factor`` M (lower triangular, MᵀM = H + diag(shift), from ``sweep_factor``) each costs half
    a product of E with H: eᵀHe = ‖M e‖² - Σ_j shift_j e_j² and E H = (E Mᵀ) M - E diag(shift), the
    triangular products taken by blocks of columns. Without it, one product each.
    """

    BLOCK = 256  # columns per block of the triangular products

    def __init__(self, hessian: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.hessian = hessian.float()
        self.factor, self.shift = factor if factor is not None else (None, None)

    def terms(self, error: torch.Tensor) -> torch.Tensor:
        """E Mᵀ float32 [out, in] (row r, column k: Σ_{j≤k} M_kj e_rj), the factored objective's terms."""
        m, n = self.factor, error.shape[1]
        result = torch.empty_like(error)
        for c0 in range(0, n, self.BLOCK):
            c1 = min(n, c0 + self.BLOCK)
            torch.mm(error[:, :c1], m[c0:c1, :c1].t(), out=result[:, c0:c1])
        return result

    def value(self, error: torch.Tensor, terms: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [out]: eᵣᵀ H eᵣ per row (``terms``: E Mᵀ if already known)."""
        if self.factor is None:
            return ((error @ self.hessian) * error).double().sum(1)
        terms = self.terms(error) if terms is None else terms
        return terms.double().square().sum(1) - (error.double().square() * self.shift.double()).sum(1)

    def gradient(self, error: torch.Tensor, terms: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [out, in]: E H (``terms``: E Mᵀ if already known)."""
        if self.factor is None:
            return error @ self.hessian
        terms = self.terms(error) if terms is None else terms
        m, n = self.factor, error.shape[1]
        result = torch.empty_like(error)
        for c0 in range(0, n, self.BLOCK):
            c1 = min(n, c0 + self.BLOCK)
            torch.mm(terms[:, c0:], m[c0:, c0:c1], out=result[:, c0:c1])
        return result.sub_(error * self.shift)


def refit_tables_cg(weight: torch.Tensor, codes: torch.Tensor, dense: torch.Tensor, lut: torch.Tensor,
                    objective: Objective, iterations: int = 4, gradient: torch.Tensor | None = None) -> torch.Tensor:
    """``refit_tables`` by a few steps of Jacobi-preconditioned conjugate gradients from the current table.

    Same arguments and result as ``refit_tables``, H given as an ``Objective``; gradient: E H of
    (codes, lut) if already known. Each step but the last costs one gradient of an [out, in] error
    matrix (K of them for the explicit K x K systems), the last only its objective (the exact line
    search); K steps reach the closed form (in exact arithmetic), one gets most of the way. Unused
    centroids stay where they are.
    """
    lut = lut.float()
    k = lut.shape[1]
    index = codes.long()
    mask = None if bool(dense.all()) else dense.float()

    def gather_sum(values: torch.Tensor) -> torch.Tensor:  # Aᵀv per row: sums of values by code (dense entries)
        values = values if mask is None else values * mask
        return torch.zeros(values.shape[0], k, dtype=torch.float32, device=values.device).scatter_add_(
            1, index, values).double()

    def masked(values: torch.Tensor) -> torch.Tensor:
        return values if mask is None else values * mask

    if gradient is None:
        gradient = objective.gradient(masked(weight.float() - decode(lut, codes)))
    diag = gather_sum(objective.hessian.diagonal().expand(index.shape))
    tiny = torch.finfo(torch.float64).tiny
    scale = torch.where(diag > 0, 1.0 / diag.clamp_min(tiny), torch.zeros_like(diag))
    c = lut.double()
    r = gather_sum(gradient)
    z = r * scale
    p = z.clone()
    rz = (r * z).sum(1)
    for step in range(iterations):
        direction = masked(decode(p.float(), codes))
        last = step + 1 == iterations
        ap = None if last else gather_sum(objective.gradient(direction))
        pap = objective.value(direction) if last else (p * ap).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(tiny), torch.zeros_like(pap))
        c = c + alpha.unsqueeze(1) * p
        if last:
            break
        r = r - alpha.unsqueeze(1) * ap
        z = r * scale
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    return c.float()


def sweep_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [in, in] -> (M float32 [in, in] lower triangular, shift float32 [in]), MᵀM = H + diag(shift).

    Then eᵀ(H + diag(shift))e = Σ_k (Σ_{j≤k} M_kj e_j)², so that deciding the entries in order
    k = 0, 1, ... each one's term depends only on entries already decided (the sweep). shift: λ·mean
    diag(H) (GPTQ's dampening), plus the mean diagonal for inputs never seen. One Cholesky
    factorisation: with P the order-reversing permutation and P(H + diag(shift))P = L Lᵀ,
    M = P Lᵀ P. λ starts at ``damp`` and grows tenfold until it succeeds (ill-conditioned H).
    """
    h = hessian.float()
    scale = float(h.diagonal().mean().clamp_min(0))
    scale = scale if scale > 0 else 1.0
    dead = (h.diagonal() <= 0).float() * scale  # inputs never seen: any code is as good as another
    lam = damp
    for attempt in range(12):
        dtype = torch.float32 if attempt < 2 else torch.float64  # float64 once float32 has failed twice
        shift = dead + lam * scale
        low, info = torch.linalg.cholesky_ex((h + shift.diag()).flip(0, 1).to(dtype))
        if int(info) == 0 and bool(torch.isfinite(low).all()):
            return low.t().flip(0, 1).float().contiguous(), shift
        lam *= 10
    raise ValueError("the gradient-weighted Hessian cannot be factorised (not finite?)")


def _midpoints(lut: torch.Tensor) -> torch.Tensor:
    """float32 [K-1, out, 1] for an ascending lut [out, K]: the entry nearest x is the number of midpoints
    below x (counted with a comparison and a sum: branch-free, 2-3x faster than a binary search here)."""
    lut = lut.float()
    return (0.5 * (lut[:, 1:] + lut[:, :-1])).t().contiguous().unsqueeze(2)


def sweep_codes(weight: torch.Tensor, codes: torch.Tensor, dense: torch.Tensor, lut: torch.Tensor,
                factor: torch.Tensor, block: int = SWEEP_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New codes for ``lut`` by a GPTQ-style column sweep with error feedback: (codes [out, in] in
    codes' dtype, errors E float32 [out, in], terms E Mᵀ float32 [out, in]).

    weight float [out, in]; codes integer [out, in] (kept where ``dense`` is False); lut float32
    [out, K], ascending per row; factor M float32 [in, in] from ``sweep_factor``. Columns in order,
    for all rows at once: column k is set to the table entry nearest w_k + Σ_{j<k} M_kj e_j / M_kk
    (e_j = w_j - ŵ_j, the errors already made; sparse entries are exact, e_j = 0), which zeroes as
    nearly as the table allows the k-th term of the damped objective (Babai's nearest plane, the
    same as GPTQ's error feedback through the inverse's Cholesky factor). The errors of earlier
    blocks of columns arrive as one product per block, those within a block one column at a time.
    The terms come for free: the k-th is Σ_{j<k} M_kj e_j + M_kk e_k.
    """
    # columns are rows here ([in, out, 1] layouts): each step reads and writes contiguous memory
    w = weight.float().t().contiguous().unsqueeze(2)
    in_features, out_features, _ = w.shape
    lut = lut.float().contiguous()
    mid = _midpoints(lut)
    picks = torch.empty(in_features, out_features, 1, dtype=torch.long, device=w.device)
    errors = torch.empty(in_features, out_features, dtype=torch.float32, device=w.device)
    terms = torch.empty_like(errors)
    chosen = torch.empty(out_features, 1, dtype=torch.float32, device=w.device)
    above = torch.empty(mid.shape, dtype=torch.bool, device=w.device)
    w_rows, pick_rows, error_rows = w.unbind(0), picks.unbind(0), errors.unbind(0)
    error_columns = errors.unsqueeze(2).unbind(0)
    mask_rows = dense.t().float().contiguous().unsqueeze(2).unbind(0)
    sparse_columns = (~dense).any(0).tolist()
    diag = factor.diagonal()
    inverse_diag = (1.0 / diag).tolist()
    for c0 in range(0, in_features, block):
        c1 = min(in_features, c0 + block)
        pull = torch.mm(factor[c0:c1, :c0], errors[:c0], out=terms[c0:c1])  # Σ_j M_kj e_j, earlier blocks
        pull_rows = pull.unsqueeze(2).unbind(0)
        within = factor[c0:c1, c0:c1].t().contiguous().unbind(0)  # column c0 + i of M within the block
        for i in range(c1 - c0):
            k = c0 + i
            target = torch.add(w_rows[k], pull_rows[i], alpha=inverse_diag[k])
            torch.sum(torch.gt(target, mid, out=above), 0, out=pick_rows[k])
            torch.sub(w_rows[k], torch.gather(lut, 1, pick_rows[k], out=chosen), out=error_columns[k])
            if sparse_columns[k]:
                error_columns[k].mul_(mask_rows[k])
            pull[i + 1:].addr_(within[i][i + 1:], error_rows[k])
        pull.addcmul_(diag[c0:c1].unsqueeze(1), errors[c0:c1])  # row i is final once column c0 + i is decided
    new = picks.squeeze(2).t().to(codes.dtype)
    return torch.where(dense, new, codes).contiguous(), errors.t().contiguous(), terms.t().contiguous()


def _sorted(lut: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same decoded matrix with each row's table ascending (codes renumbered)."""
    values, order = lut.sort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(lut.shape[1], device=lut.device).expand_as(order).contiguous())
    return values, rank.gather(1, codes.long()).to(codes.dtype)


def _choose(rows: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """Per row (bool [out]), the row of each tensor in ``new`` or in ``old``."""
    if bool(rows.all()):
        return new
    if not bool(rows.any()):
        return old
    return tuple(torch.where(rows.unsqueeze(1), a, b) for a, b in zip(new, old))


def refine_rows(weight: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, dense: torch.Tensor,
                hessian: torch.Tensor, rounds: int = ROUNDS, damp: float = 0.01, tol: float = 1e-4
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Alternate code sweeps and table refits on rows that share one H (see the module docstring).

    weight float [out, in]; codes integer [out, in]; lut [out, K] (any float dtype; evaluated in
    fp16 as stored); dense bool [out, in]; hessian float32 [in, in]. A round: the sweep (columns by
    decreasing H_jj, from the weights, kept for the rows where it beats the round's start), then one
    refit step of the tables; its result, tables rounded to fp16, is kept for the rows it improves.
    Rounds stop early when the summed objective falls by less than ``tol`` of itself. Returns (codes,
    lut float16 [out, K] ascending per row, objective before float64 [out], after float64 [out],
    rounds run).
    """
    order = hessian.diagonal().argsort(descending=True)  # GPTQ's act-order: the most active inputs first
    restore = order.argsort()
    h = hessian.float()[order][:, order]
    w, dense, mask = weight.float()[:, order], dense[:, order], dense[:, order].float()
    factor, shift = sweep_factor(h, damp)
    objective = Objective(h, (factor, shift))

    best_lut, best_codes = _sorted(lut.half().float(), codes[:, order])
    best_error = (w - decode(best_lut, best_codes)) * mask
    best_terms = objective.terms(best_error)
    before = best = objective.value(best_error, best_terms)
    done = 0
    for done in range(1, rounds + 1):
        start = float(best.sum())
        swept = sweep_codes(w, best_codes, dense, best_lut, factor)
        value = objective.value(*swept[1:])
        better = value < best
        best = torch.where(better, value, best)
        best_codes, best_error, best_terms = _choose(better, swept, (best_codes, best_error, best_terms))
        c, error, terms = best_codes, best_error, best_terms
        t = refit_tables_cg(w, c, dense, best_lut, objective, CG_STEPS, gradient=objective.gradient(error, terms))
        t, c = _sorted(t.half().float(), c)
        error = (w - decode(t, c)) * mask
        terms = objective.terms(error)
        value = objective.value(error, terms)
        better = value < best
        best = torch.where(better, value, best)
        best_codes, best_lut, best_error, best_terms = _choose(better, (c, t, error, terms),
                                                               (best_codes, best_lut, best_error, best_terms))
        if start - float(best.sum()) <= tol * start:
            break
    return best_codes[:, restore].contiguous(), best_lut.half(), before, best, done


def refine_matrix(weight: torch.Tensor, fisher: torch.Tensor | None, q, hessian: torch.Tensor,
                  rounds: int = ROUNDS, damp: float = 0.01):
    """A refined copy of ``q`` (a ``core.quantize.QuantizedMatrix`` of ``weight``) and its ``RefineStats``.

    weight float [out, in]; fisher float [out, in] or None (only for the reported Fisher-weighted
    error); hessian float32 [in, in] or [G, in, in] (G groups of contiguous output rows, out % G == 0).
    The sparse part keeps its positions and its exact values (residuals recomputed for the new table).
    """
    from core.outliers import sanitize_fisher
    from core.quantize import _assemble

    t0 = time.perf_counter()
    w = weight.detach().float()
    device = w.device
    hs = hessian.to(device=device, dtype=torch.float32)
    hs = hs.unsqueeze(0) if hs.dim() == 2 else hs
    groups = hs.shape[0]
    if w.shape[0] % groups or hs.shape[1:] != (w.shape[1], w.shape[1]):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} does not fit a {tuple(w.shape)} matrix")
    mask = sparse_mask_of(q, tuple(w.shape)).to(device)
    dense = ~mask
    size = w.shape[0] // groups
    all_codes, all_luts = q.codes.to(device), q.lookup_table.to(device)
    codes, luts, before, after, rounds_run = [], [], 0.0, 0.0, 0
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        c, t, b, a, n = refine_rows(w[rows], all_codes[rows], all_luts[rows], dense[rows], hs[g], rounds, damp)
        codes.append(c)
        luts.append(t)
        before, after, rounds_run = before + float(b.sum()), after + float(a.sum()), max(rounds_run, n)
    codes_t, lut_t = torch.cat(codes), torch.cat(luts)
    f = sanitize_fisher(fisher.to(device)) if fisher is not None else torch.ones_like(w)
    refined = _assemble(w, f, mask, lut_t.float(), codes_t, q.n_outliers)
    refined = replace(refined, codes=refined.codes.to(q.codes.dtype))
    return refined, RefineStats(before, after, rounds_run, time.perf_counter() - t0)
