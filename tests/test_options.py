"""Options of ``curvlab.extremes`` that change what is computed or reported: ``which="SA"``,
warm starts, the ``auto`` regime switch, ``progress`` and ``callback``.

Values are checked against dense Hessians (float64, tiny models).  Tolerances: a
converged end's estimate is within the tolerance asked of the truth (exact regime:
the residual test ``||H v - theta v|| <= tol |theta|`` bounds the distance to an
eigenvalue), plus the float64 rounding slack ``n eps ||H||`` of a Rayleigh quotient.
"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import curvlab

from conftest import classification_data, dense_hessian, tiny_mlp
from test_extremes import spy_products

D = torch.float64
TOL = 1e-8
TIGHT = dict(tol=TOL, tol_min=TOL, floor=0.0)


def _dense(model, X, Y):
    Hd = dense_hessian(model, F.cross_entropy, X, Y)
    ev, U = torch.linalg.eigh(Hd)
    slack = Hd.shape[0] * torch.finfo(D).eps * float(ev.abs().max())
    return Hd, ev, U, slack


def _check_end(r, end, truth, slack, tol=TOL):
    value = getattr(r, f"lambda_{end}")
    lo, hi = getattr(r, f"interval_{end}")
    assert getattr(r, f"converged_{end}"), end
    assert abs(value - truth) <= tol * abs(truth) + slack, (end, value, truth)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo - slack <= truth <= hi + slack, (end, lo, hi, truth)
    assert (hi - lo) <= tol * abs(value) + 2 * slack  # as wide as asked, no wider


# ------------------------------------------------------------------ which="SA"

def test_which_smallest_only():
    model = tiny_mlp()
    X, Y = classification_data(20, (5,))
    Hd, ev, _, slack = _dense(model, X, Y)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), which="SA", **TIGHT)
    assert float(ev[0]) < 0  # an indefinite Hessian: the smallest end is its own search
    _check_end(r, "min", float(ev[0]), slack)
    # the vector is a unit eigenvector estimate of lambda_min (its dense Rayleigh quotient)
    v = r.vector_min.to(D)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-10)
    assert abs(float(v @ Hd @ v) - float(ev[0])) <= TOL * abs(float(ev[0])) + slack
    # the end not asked for is absent, and does not count against convergence
    assert math.isnan(r.lambda_max) and math.isnan(r.lambda_max_error)
    assert r.vector_max is None and not r.converged_max and r.converged
    assert set(r.error_parts) == {"min"} and r.options["which"] == "SA"
    assert all("lambda_max" not in e and "lambda_min" in e for e in r.history)


def test_which_smallest_only_reports_an_unconverged_end():
    # a budget of 2 products cannot meet 1e-8: `converged` must say so for "SA" too
    model = tiny_mlp()
    X, Y = classification_data(20, (5,))
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), which="SA", max_hvps=2, **TIGHT)
    assert not r.converged_min and not r.converged


# ------------------------------------------------------------------ warm starts

def test_warm_start_returns_the_dense_extremes():
    model = tiny_mlp()
    X, Y = classification_data(40, (5,))
    cold = curvlab.extremes(model, F.cross_entropy, (X, Y), **TIGHT)
    # the same model: the start vectors are already (nearly) the extreme eigenvectors
    _, ev, _, slack = _dense(model, X, Y)
    same = curvlab.extremes(model, F.cross_entropy, (X, Y), init=cold, **TIGHT)
    assert same.options["warm_start"]
    _check_end(same, "max", float(ev[-1]), slack)
    _check_end(same, "min", float(ev[0]), slack)
    # a slightly perturbed model (a training step): its own dense extremes
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    _, ev2, _, slack2 = _dense(model, X, Y)
    assert abs(float(ev2[-1]) - float(ev[-1])) > 1e3 * TOL * abs(float(ev[-1]))  # it moved
    warm = curvlab.extremes(model, F.cross_entropy, (X, Y), init=cold, **TIGHT)
    assert warm.options["warm_start"]
    _check_end(warm, "max", float(ev2[-1]), slack2)
    _check_end(warm, "min", float(ev2[0]), slack2)


def test_warm_start_from_interior_eigenvectors_still_finds_the_extremes():
    # a start built to trap: the init's vectors are exact *interior* eigenvectors, so the
    # Krylov space of their sum is (to rounding) invariant and its Ritz pairs have
    # residuals ~ 1e-16; a solver must not report those interior eigenvalues as extremes
    model = tiny_mlp()
    X, Y = classification_data(40, (5,))
    _, ev, U, slack = _dense(model, X, Y)
    cold = curvlab.extremes(model, F.cross_entropy, (X, Y), which="LA", tol=0.5)
    # two interior eigenvalues well away from zero (the zero eigenvalues' relative test
    # could never be met, which would let the solver escape the trap by accident)
    i, j = len(ev) // 4, 3 * len(ev) // 4
    assert min(abs(float(ev[i])), abs(float(ev[j]))) > 1e-3 and ev[0] < ev[i] < ev[j] < ev[-1]
    trap = replace(cold, vector_max=U[:, j].clone(), vector_min=U[:, i].clone())
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), init=trap, **TIGHT)
    _check_end(r, "max", float(ev[-1]), slack)
    _check_end(r, "min", float(ev[0]), slack)


# ------------------------------------------------------------------ auto regime

@pytest.mark.parametrize("N, regime", [(40, "exact"), (41, "multilevel")])
def test_auto_switches_to_multilevel_above_four_subsamples(N, regime):
    # "auto": exact when N <= 4 * sample_size, multilevel otherwise (sample_size = 10)
    model = tiny_mlp()
    r = curvlab.extremes(model, F.cross_entropy, classification_data(N, (5,)), sample_size=10,
                         tol=0.5, tol_min=0.5)
    assert r.options["sampling"] == regime
    assert bool(r.levels) == (regime == "multilevel")
    if regime == "multilevel":
        assert r.levels[0]["sample_size"] == 10
    else:
        assert r.sample_size == N


@pytest.mark.parametrize("N, regime", [(8192, "exact"), (8193, "multilevel")])
def test_auto_switch_at_the_default_sample_size(monkeypatch, N, regime):
    # the default first subsample is 2048: the switch is at N = 4 * 2048.  A budget of 10
    # products leaves the first level its default size (it shrinks to fit smaller budgets)
    calls = spy_products(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).double()
    X, Y = classification_data(N, (2,), classes=2)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), which="LA", max_hvps=10, batch_size=4096)
    assert r.options["sampling"] == regime
    sizes = {m for _, m in calls}
    if regime == "exact":
        assert sizes == {N}
    else:
        assert 2048 in sizes and N not in sizes


# ------------------------------------------------------------------ progress, callback

def test_progress_bar_runs_and_shows_the_estimates(capsys):
    model = tiny_mlp()
    data = classification_data(20, (5,))
    curvlab.extremes(model, F.cross_entropy, data)
    assert capsys.readouterr().err == ""  # no bar unless asked
    curvlab.extremes(model, F.cross_entropy, data, progress=True)
    err = capsys.readouterr().err
    assert "extremes" in err and "hvp" in err  # tqdm's description and unit
    assert "lambda_max=" in err and "lambda_min=" in err  # the postfix of each step


@pytest.mark.parametrize("sampling", ["exact", "multilevel"])
def test_callback_sees_every_step_once_with_the_products_spent(monkeypatch, sampling):
    calls = spy_products(monkeypatch)
    if sampling == "exact":
        model, (X, Y) = tiny_mlp(), classification_data(30, (5,))
        kw = dict(batch_size=7)
    else:
        from test_extremes import _classifier
        model, (X, Y) = _classifier(1200)
        kw = dict(sample_size=100, tol=0.05, tol_min=0.2, batch_size=300)
    N = len(X)
    seen = []

    def callback(entry):  # the entry and the products observed so far, independently
        seen.append((dict(entry), (sum(k * m for k, m in calls) + calls.forms / 2) / N))

    r = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling=sampling, callback=callback, **kw)
    assert len(seen) >= 2 and [e for e, _ in seen] == r.history
    for entry, observed in seen:
        assert {"lambda_min", "lambda_max"} & entry.keys()
        assert math.isclose(entry["hvps"], observed, rel_tol=1e-12), (entry, observed)
    # once per step: each step follows at least one new product
    hvps = [e["hvps"] for e, _ in seen]
    assert all(b > a for a, b in zip(hvps, hvps[1:])), hvps
    assert hvps[-1] <= r.cost.hvps * (1 + 1e-12)
    if sampling == "exact":  # one solver run for both ends: both keys in every step
        assert all({"lambda_min", "lambda_max"} <= e.keys() for e, _ in seen)
