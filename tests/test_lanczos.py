"""Thick-restart block Lanczos on explicit matrices with prescribed spectra."""

import pytest
import torch

from curvlab.lanczos import lanczos, orthonormalize

D = torch.float64


def sym_with_spectrum(ev, seed=0):
    ev = torch.as_tensor(ev, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=D))
    return (Q * ev) @ Q.T, Q


def outliers_and_bulk(n=600, lam_min=-0.5, seed=0):
    """The shape of a network Hessian: 10 outliers up to 100, a dense bulk near zero.

    The bulk fills [0.6 lam_min, 0.6]; lam_min itself is separated from it by
    0.4 |lam_min|, so residual norms (the bound the solver stops on) can reach
    1e-9 relative in a few hundred products.
    """
    g = torch.Generator().manual_seed(seed)
    edge = 0.6 * lam_min
    bulk = edge + (0.6 - edge) * torch.rand(n - 11, generator=g, dtype=D) ** 3
    top = torch.tensor([100., 60, 40, 30, 20, 15, 12, 10, 9, 8], dtype=D)
    return torch.cat([top, bulk, torch.tensor([lam_min], dtype=D)])


def op(A):
    return lambda V: V @ A


@pytest.mark.parametrize("max_basis", [12, 30, 200])
def test_both_ends_match_eigvalsh(max_basis):
    ev = outliers_and_bulk()
    A, _ = sym_with_spectrum(ev)
    r = lanczos(op(A), A.shape[0], tol=1e-9, dtype=D, max_matvecs=5000, max_basis=max_basis)
    true = torch.linalg.eigvalsh(A)
    assert r.all_converged
    assert abs(float(r.values[0] - true[0])) <= 1e-9 * abs(float(true[0]))
    assert abs(float(r.values[-1] - true[-1])) <= 1e-9 * abs(float(true[-1]))
    if max_basis == 12:
        assert r.restarts > 0  # the restart path was exercised


def test_residual_bounds_contain_error_and_ritz_values_err_inward():
    ev = outliers_and_bulk(lam_min=-0.4)
    A, _ = sym_with_spectrum(ev, seed=1)
    true = torch.linalg.eigvalsh(A)
    # float64 rounding in a Rayleigh quotient is about n * eps * ||A||: allow that much
    slack = A.shape[0] * torch.finfo(D).eps * float(true.abs().max())
    for tol in (1e-1, 1e-2, 1e-4):
        r = lanczos(op(A), A.shape[0], tol=tol, dtype=D, max_matvecs=3000, max_basis=40)
        lo, hi = float(r.values[0]), float(r.values[-1])
        assert lo >= float(true[0]) - slack and hi <= float(true[-1]) + slack  # Courant-Fischer
        assert lo - float(true[0]) <= float(r.residual_norms[0]) + slack
        assert float(true[-1]) - hi <= float(r.residual_norms[-1]) + slack


def test_stopping_rule_is_relative_to_lambda_min_not_to_spread():
    ev = outliers_and_bulk(lam_min=-0.5)
    A, _ = sym_with_spectrum(ev, seed=2)
    r = lanczos(op(A), A.shape[0], tol=0.05, dtype=D, max_matvecs=3000)
    # the bound is 5% of |lambda_min| = 0.025, far below 5% of the spread (5.0)
    assert r.converged[0] and float(r.residual_norms[0]) <= 0.05 * abs(float(r.values[0]))
    assert abs(float(r.values[0]) + 0.5) <= 0.025


def test_per_end_tolerances():
    A, _ = sym_with_spectrum(outliers_and_bulk(), seed=3)
    r = lanczos(op(A), A.shape[0], tol=(1e-1, 1e-10), dtype=D, max_matvecs=3000)
    assert float(r.residual_norms[-1]) <= 1e-10 * abs(float(r.values[-1]))
    assert float(r.residual_norms[0]) <= 1e-1 * abs(float(r.values[0]))


def test_k_pairs_per_end():
    ev = torch.cat([torch.arange(1., 201.), -torch.arange(1., 4.)]).to(D)
    A, _ = sym_with_spectrum(ev, seed=4)
    r = lanczos(op(A), A.shape[0], which="both", k=3, tol=1e-10, dtype=D, max_matvecs=3000)
    assert torch.allclose(r.values, torch.tensor([-3., -2., -1., 198., 199., 200.], dtype=D), atol=1e-8)
    # Ritz vectors are orthonormal eigenvectors
    assert torch.allclose(r.vectors @ r.vectors.T, torch.eye(6, dtype=D), atol=1e-10)
    assert torch.allclose(r.vectors @ A, r.values[:, None] * r.vectors, atol=1e-7)


def test_deflation_excludes_given_vectors():
    ev = torch.tensor([50., 40., 3., 2., 1., 0.5, -0.1] + [0.2] * 50, dtype=D)
    A, Q = sym_with_spectrum(ev, seed=5)
    r = lanczos(op(A), A.shape[0], which="LA", tol=1e-10, deflate=Q[:, :2].T, dtype=D)
    assert abs(float(r.values[-1]) - 3.0) < 1e-8


def test_block_start_from_exact_eigenvectors_converges_at_once():
    ev = outliers_and_bulk()
    A, Q = sym_with_spectrum(ev, seed=6)
    imin, imax = int(ev.argmin()), int(ev.argmax())
    v0 = torch.stack([Q[:, imax], Q[:, imin]])
    r = lanczos(op(A), A.shape[0], tol=1e-8, X0=v0, dtype=D)
    assert r.calls == 1 and r.matvecs == 2 and r.all_converged


def test_small_space_is_exhausted_exactly():
    A, _ = sym_with_spectrum([3., 1., -2.], seed=7)
    r = lanczos(op(A), 3, tol=1e-12, dtype=D, max_basis=60)
    assert torch.allclose(r.values, torch.tensor([-2., 3.], dtype=D), atol=1e-12)


def test_budget_is_respected():
    A, _ = sym_with_spectrum(outliers_and_bulk(), seed=8)
    r = lanczos(op(A), A.shape[0], tol=1e-14, dtype=D, max_matvecs=10)
    assert r.matvecs <= 10 and not r.all_converged


def test_orthonormalize_drops_dependent_rows():
    g = torch.Generator().manual_seed(0)
    B = orthonormalize(torch.randn(3, 20, generator=g, dtype=D))
    W = torch.cat([B[:1] * 2 + B[1:2], torch.randn(1, 20, generator=g, dtype=D)])
    Q = orthonormalize(W, B)
    assert Q.shape[0] == 1
    assert torch.allclose(Q @ B.T, torch.zeros(1, 3, dtype=D), atol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    (dict(which="middle"), "which"),
    (dict(k=0), "k must"),
    (dict(tol=0.0), "not all zero"),
])
def test_bad_arguments(kwargs, match):
    A, _ = sym_with_spectrum([1., 2., 3.])
    with pytest.raises(ValueError, match=match):
        lanczos(op(A), 3, dtype=D, **kwargs)


def test_wrong_matvec_shape_raises():
    with pytest.raises(ValueError, match="matvec returned"):
        lanczos(lambda V: V[:, :2], 3, dtype=D)


def test_wide_start_block_from_an_approximate_subspace():
    # top eigenvalues in a tight cluster (100, 99.5, ..., 97.5) above a bulk in [0, 90]:
    # a random start needs many steps to resolve the cluster; a start from a 6-dim
    # subspace close to it (as an approximation such as the GGN would give) halves that
    g = torch.Generator().manual_seed(0)
    top = torch.tensor([100., 99.5, 99, 98.5, 98, 97.5], dtype=D)
    A, Q = sym_with_spectrum(torch.cat([top, 90 * torch.rand(594, generator=g, dtype=D)]), seed=9)
    approx = Q[:, :6].T + 0.005 * torch.randn(6, A.shape[0], generator=g, dtype=D)
    cold = lanczos(op(A), A.shape[0], which="LA", tol=1e-3, dtype=D)
    warm = lanczos(op(A), A.shape[0], which="LA", tol=1e-3, dtype=D, X0=approx, block_size=1)
    assert warm.all_converged and abs(float(warm.values[-1]) - 100.0) <= float(warm.residual_norms[-1])
    assert warm.matvecs <= 0.6 * cold.matvecs  # measured: 18 against 37


def test_one_solver_contract():
    # lanczos and lobpcg take the start block as X0, a tolerance per end, a budget in
    # products, and return the same result type; lanczos's former v0 still works and warns
    from curvlab.lanczos import EigenResult, LanczosResult
    from curvlab.lobpcg import lobpcg

    A = torch.diag(torch.arange(1.0, 41.0, dtype=D))
    x0 = torch.ones(40, dtype=D)
    common = dict(which="SA", X0=x0, tol=(1e-8, 0.5), max_matvecs=200, dtype=D)
    r1, r2 = lanczos(op(A), 40, **common), lobpcg(op(A), 40, **common)
    assert LanczosResult is EigenResult
    assert isinstance(r1, EigenResult) and isinstance(r2, EigenResult)
    for r in (r1, r2):  # the smallest end's tolerance (1e-8) was used, not the largest's
        assert abs(float(r.values[0]) - 1.0) < 1e-7 and r.converged.all()
    with pytest.warns(DeprecationWarning, match="X0"):
        r3 = lanczos(op(A), 40, which="SA", v0=x0, tol=1e-8, dtype=D)
    assert torch.equal(r3.values, lanczos(op(A), 40, which="SA", X0=x0, tol=1e-8, dtype=D).values)
    with pytest.raises(TypeError, match="X0 only"):
        lanczos(op(A), 40, v0=x0, X0=x0)


def test_guard_pairs_need_only_resolve_a_distinct_neighbour():
    # k = 2 with guard=True: the second pair at an end counts as converged once its
    # residual is below a quarter of its distance to the extreme Ritz value; the extreme
    # still meets the tolerance. An isolated top end converges with fewer products; a
    # cluster tighter than the tolerance gets no relief
    from curvlab.lanczos import _guard_thresholds

    thr = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3], dtype=D)
    vals = torch.tensor([-1.0, -0.9, 50.0, 100.0], dtype=D)
    out = _guard_thresholds(thr, vals, "both", 2)
    assert torch.allclose(out, torch.tensor([1e-3, 0.025, 12.5, 1e-3], dtype=D))
    tight = _guard_thresholds(thr, torch.tensor([-1.0, -0.9999, 99.999, 100.0], dtype=D), "both", 2)
    assert torch.equal(tight[[0, 3]], thr[[0, 3]]) and float(tight[1]) == pytest.approx(1e-3)
    # under a floor, a guard's own threshold is the finer one it is given, not the floor's
    floored = torch.full((4,), 0.25, dtype=D)
    own = torch.full((4,), 0.0625, dtype=D)
    out = _guard_thresholds(floored, torch.tensor([-0.57, -0.4, 49.9, 50.0], dtype=D), "both", 2, own)
    assert torch.allclose(out, torch.tensor([0.25, 0.0625, 0.0625, 0.25], dtype=D))
    # in a basis of just 2k vectors, no relaxation by the distance: the guard's own threshold
    vals = torch.tensor([-0.57, 0.0, 20.0, 50.0], dtype=D)
    assert torch.equal(_guard_thresholds(floored, vals, "both", 2, own, relax=False), out)
    assert float(_guard_thresholds(floored, vals, "both", 2, own)[1]) == pytest.approx(0.1425)
    ev = torch.cat([torch.tensor([100.0]), torch.linspace(-1.0, 1.0, 300)])  # guard: the bulk edge
    A = torch.diag(ev).to(D)
    kw = dict(which="LA", k=2, tol=1e-6, floor=0.0, dtype=D, max_matvecs=300, max_basis=80)
    strict, relaxed = lanczos(op(A), len(ev), **kw), lanczos(op(A), len(ev), guard=True, **kw)
    assert strict.all_converged and relaxed.all_converged
    assert relaxed.matvecs < strict.matvecs
    assert abs(float(relaxed.values[-1]) - 100.0) <= 1e-6 * 100 and relaxed.residual_norms[-1] <= 1e-4


def test_guard_run_never_stops_before_it_holds_a_guard_at_each_end():
    # a start on an interior eigenvector is invariant at once: one Ritz pair, residual 0.
    # With too few pairs for an extreme and a guard per end, nothing counts as converged
    # (a "both" run stopped there, converged on 0.5); the run goes on to the true extremes
    ev = torch.linspace(-1.0, 1.0, 41).to(D)
    A = torch.diag(ev)
    start = torch.zeros(41, dtype=D)
    start[30] = 1.0
    for which in ("both", "SA", "LA"):
        r = lanczos(op(A), 41, which=which, k=2, X0=start, guard=True, tol=1e-6, floor=0.01, dtype=D,
                    max_matvecs=200)
        assert r.all_converged and r.matvecs > 1
        if which != "LA":
            assert float(r.values[0]) == pytest.approx(-1.0, abs=0.01)  # within the floor
        if which != "SA":
            assert float(r.values[-1]) == pytest.approx(1.0, abs=0.01)
    # in a basis of 2k Ritz values a guard's threshold is its tolerance with a quarter of the
    # floor, not the floor's whole term (0.01 * 1.0), and not yet relaxed by its distance
    r = lanczos(op(A), 41, which="both", k=2, guard=True, tol=1e-6, floor=0.01, dtype=D, max_matvecs=4)
    own = torch.clamp(1e-6 * r.values.abs(), min=0.25 * 0.01 * float(r.values.abs().max()))
    assert torch.allclose(r.thresholds[[1, 2]], own[[1, 2]])
    assert torch.allclose(r.thresholds[[0, 3]], torch.full((2,), 0.01 * float(r.values.abs().max()), dtype=D))
