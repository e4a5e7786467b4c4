"""Chebyshev filters against dense polynomials, and filtered subspace iteration on explicit spectra."""

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as npcheb

from curvlab.chebyshev import chebyshev_filter, chebyshev_subspace

D = torch.float64
TOP = torch.tensor([100., 60, 40, 30, 20, 15, 12, 10, 9, 8], dtype=D)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sym_with_spectrum(ev, seed=0):
    ev = torch.as_tensor(ev, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=D))
    return (Q * ev) @ Q.T, Q


def near_zero_spectrum(n=600, lam_min=-0.5):
    """10 outliers up to 100 and a bulk in [lam_min, 0.5] with a square-root edge at lam_min."""
    n_bulk = n - len(TOP)
    n_neg = n_bulk // 3
    neg = lam_min * (1 - (torch.arange(n_neg, dtype=D) / n_neg) ** (2 / 3))
    pos = 0.5 * (torch.arange(1, n_bulk - n_neg + 1, dtype=D) / (n_bulk - n_neg)) ** 2
    return torch.cat([TOP, neg, pos])


def op(A):
    return lambda V: V @ A


@pytest.fixture(scope="module")
def small():
    """n = 200, eigenvalues spread over [-3, 5]: partly inside, partly outside the filter interval."""
    ev = torch.linspace(-3, 5, 200, dtype=D)
    A, Q = sym_with_spectrum(ev, seed=1)
    V = torch.randn(4, 200, generator=torch.Generator().manual_seed(2), dtype=D)
    return A, Q, ev, V


def dense_filter(Q, ev, V, degree, lower, upper):
    """``Q diag(T_m(x(ev))) Q^T V^T`` with ``T_m`` evaluated by numpy (Clenshaw), rows of ``V``."""
    c, e = (upper + lower) / 2, (upper - lower) / 2
    p = npcheb.chebval((ev.numpy() - c) / e, np.eye(degree + 1)[degree])
    return ((Q * torch.from_numpy(p)) @ Q.T @ V.T).T, torch.from_numpy(p)


@pytest.mark.parametrize("degree", [0, 1, 2, 7, 15])
def test_filter_equals_dense_chebyshev_polynomial(small, degree):
    A, Q, ev, V = small
    lower, upper = -1.0, 2.0
    got = chebyshev_filter(op(A), V, degree, lower, upper)
    want, p = dense_filter(Q, ev, V, degree, lower, upper)
    # both sides are float64; the recurrence loses about degree * eps relative to
    # the largest |p(lambda)| (up to 2e8 here), far below 1e-10
    scale = float(p.abs().max()) * float(V.norm(dim=1).max())
    assert float((got - want).abs().max()) <= 1e-10 * scale


def test_filter_damps_inside_and_amplifies_outside(small):
    A, Q, ev, V = small
    _, p = dense_filter(Q, ev, V, 10, -1.0, 2.0)
    inside = (ev >= -1) & (ev <= 2)
    assert float(p[inside].abs().max()) <= 1 + 1e-12
    assert float(p[~inside].abs().min()) > 1
    assert float(p[0].abs()) > 1e6  # at -3, i.e. x = -7/3: cosh(10 arccosh(7/3)) ~ 1e6


@pytest.mark.parametrize("scale_at", [-3.0, 4.5])
def test_scaled_filter_is_normalised_at_the_point(small, scale_at):
    A, Q, ev, V = small
    degree, lower, upper = 12, -1.0, 2.0
    got = chebyshev_filter(op(A), V, degree, lower, upper, scale_at=scale_at)
    want, p = dense_filter(Q, ev, V, degree, lower, upper)
    c, e = (upper + lower) / 2, (upper - lower) / 2
    p_at = npcheb.chebval((scale_at - c) / e, np.eye(degree + 1)[degree])
    scale = float(p.abs().max()) / abs(p_at) * float(V.norm(dim=1).max())
    assert float((got - want / p_at).abs().max()) <= 1e-10 * scale


def test_filter_costs_degree_block_products_and_keeps_shape(small):
    A, _, _, V = small
    calls = []

    def counted(W):
        calls.append(W.shape)
        return W @ A
    Y = chebyshev_filter(counted, V, 9, -1.0, 2.0)
    assert Y.shape == V.shape and calls == [V.shape] * 9
    y = chebyshev_filter(op(A), V[0], 9, -1.0, 2.0)
    torch.testing.assert_close(y, Y[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(degree=-1), "degree"),
    (dict(degree=2.5), "degree"),
    (dict(lower=2.0, upper=2.0), "lower < upper"),
    (dict(lower=float("nan")), "lower < upper"),
    (dict(scale_at=0.0), "inside"),
])
def test_filter_bad_input_raises(small, kwargs, match):
    A, _, _, V = small
    args = {"degree": 3, "lower": -1.0, "upper": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        chebyshev_filter(op(A), V, **args)


@pytest.fixture(scope="module")
def near_zero():
    ev = near_zero_spectrum()
    A, Q = sym_with_spectrum(ev, seed=0)
    return A, Q, ev


def test_subspace_finds_lambda_min_with_outliers_deflated(near_zero):
    """The issue-4 recipe: deflate the outliers, filter on [cut, bulk top]."""
    A, Q, ev = near_zero
    tol = 1e-2
    r = chebyshev_subspace(op(A), A.shape[0], which="SA", upper=0.6, deflate=Q[:, :10].T,
                           tol=tol, dtype=D, max_matvecs=2000)
    assert r.all_converged
    assert abs(float(r.values[0]) + 0.5) <= tol * 0.5
    assert float(r.residual_norms[0]) <= tol * abs(float(r.values[0]))


def test_subspace_finds_lambda_min_with_outliers_in(near_zero):
    A, _, _ = near_zero
    tol = 1e-2
    r = chebyshev_subspace(op(A), A.shape[0], which="SA", upper=101.0, degree=40, tol=tol,
                           dtype=D, max_matvecs=3000)
    assert r.all_converged and abs(float(r.values[0]) + 0.5) <= tol * 0.5


def test_subspace_largest_pairs(near_zero):
    A, _, _ = near_zero
    k, tol = 2, 1e-6
    r = chebyshev_subspace(op(A), A.shape[0], which="LA", k=k, lower=-0.6, degree=10, tol=tol,
                           dtype=D, max_matvecs=2000)
    assert r.all_converged
    torch.testing.assert_close(r.values, torch.tensor([60., 100.], dtype=D), rtol=tol, atol=0)


def test_subspace_matvec_accounting(near_zero):
    A, _, _ = near_zero
    b, degree = 3, 8
    r = chebyshev_subspace(op(A), A.shape[0], which="LA", k=1, lower=-0.6, degree=degree,
                           block_size=b, tol=1e-8, dtype=D, max_matvecs=2000)
    iterations = len(r.history) - 1  # the first entry is the start block's Rayleigh-Ritz
    assert r.matvecs == b + iterations * (degree + 1) * b
    assert r.calls == 1 + iterations * (degree + 1)


def test_subspace_rejects_a_wrong_spectral_bound(near_zero):
    A, _, _ = near_zero
    # upper = 50 < lambda_max = 100: the filter amplifies the top, and a Ritz value above 50 shows it
    with pytest.raises(ValueError, match="does not bound the spectrum"):
        chebyshev_subspace(op(A), A.shape[0], which="SA", upper=50.0, tol=1e-3, dtype=D,
                           max_matvecs=2000)


@pytest.mark.parametrize("kwargs, match", [
    (dict(which="both", upper=1.0), "which must be one of"),
    (dict(which="SA"), "needs upper"),
    (dict(which="LA", upper=1.0), "needs lower"),
    (dict(upper=1.0, block_size=1), "adaptive cut needs block_size > k"),
    (dict(upper=1.0, lower=2.0), "lower < upper"),
    (dict(upper=1.0, k=0), "k must be"),
    (dict(upper=1.0, degree=0), "degree"),
    (dict(upper=1.0, tol=0.0), "not all zero"),
    (dict(upper=1.0, X0=torch.zeros(2, 51, dtype=D)), "X0 must have shape"),
])
def test_subspace_bad_input_raises(kwargs, match):
    A = torch.diag(torch.linspace(0, 1, 50, dtype=D))
    with pytest.raises(ValueError, match=match):
        chebyshev_subspace(op(A), 50, **{"dtype": D, **kwargs})
