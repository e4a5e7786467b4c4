"""``curvlab.extremes`` against dense Hessians, and its handling of bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
import curvlab.extremes  # noqa: F401  (must import: the public module path)

from conftest import (classification_data, dense_hessian, mean_loss, quadratic_problem,
                      tiny_cnn_bn, tiny_mlp)

D = torch.float64
TOL = 1e-8
TIGHT = dict(tol=TOL, tol_min=TOL, floor=0.0)  # no floor relative to lambda_max


def _check_against_dense(r, Hd, tol=TOL, tol_min=TOL, floor=0.0):
    ev = torch.linalg.eigvalsh(Hd)
    lmin, lmax = float(ev[0]), float(ev[-1])
    # rounding slack of a float64 Rayleigh quotient: n * eps * ||H||
    slack = Hd.shape[0] * torch.finfo(D).eps * max(abs(lmin), abs(lmax))
    assert r.converged_max and r.converged_min
    # what was asked: the relative tolerance, or the floor relative to lambda_max
    assert abs(r.lambda_max - lmax) <= max(tol * abs(lmax), floor * abs(lmax)) + slack
    assert abs(r.lambda_min - lmin) <= max(tol_min * abs(lmin), floor * abs(lmax)) + slack
    # the returned error bounds contain the true error, and the intervals the truth
    assert abs(r.lambda_max - lmax) <= r.lambda_max_error + slack
    assert abs(r.lambda_min - lmin) <= r.lambda_min_error + slack
    assert r.interval_max[0] - slack <= lmax <= r.interval_max[1] + slack
    assert r.interval_min[0] - slack <= lmin <= r.interval_min[1] + slack
    return lmin, lmax


def test_tiny_mlp_matches_dense():
    model = tiny_mlp()
    X, Y = classification_data(40, (5,))
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), **TIGHT, batch_size=16)
    _check_against_dense(r, dense_hessian(model, F.cross_entropy, X, Y))
    assert r.num_samples == 40 and r.num_params == sum(p.numel() for p in model.parameters())


def test_tiny_cnn_with_batchnorm_matches_dense_in_eval_mode():
    model = tiny_cnn_bn()
    X, Y = classification_data(24, (2, 6, 6))
    model.train()  # the caller trains; the Hessian is still the eval-mode one
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), **TIGHT, batch_size=10)
    assert model.training
    _check_against_dense(r, dense_hessian(model, F.cross_entropy, X, Y))


def test_near_zero_negative_lambda_min_100x_smaller_than_lambda_max():
    # Hessian = Q diag(ev) Q^T exactly: outliers up to 100, a bulk near zero,
    # lambda_min = -1 (100x smaller in magnitude than lambda_max)
    ev = torch.cat([torch.tensor([100., 40., 25.]), torch.linspace(-0.6, 0.8, 60), torch.tensor([-1.0])])
    model, data, H = quadratic_problem(ev, samples=16)
    r = curvlab.extremes(model, mean_loss, data, **TIGHT, batch_size=5)
    lmin, lmax = _check_against_dense(r, H)
    assert math.isclose(lmin, -1.0, rel_tol=1e-12) and math.isclose(lmax, 100.0, rel_tol=1e-12)


def test_default_tolerances_meet_their_promise():
    # the defaults: lambda_max within 1 %, lambda_min within 5 % of |lambda_min|
    ev = torch.cat([torch.tensor([100., 40.]), torch.linspace(-0.3, 0.5, 200), torch.tensor([-0.5])])
    model, data, H = quadratic_problem(ev, samples=8, seed=3)
    r = curvlab.extremes(model, mean_loss, data)
    # the default floor (1e-5 * lambda_max = 1e-3) is below 5 % of |lambda_min| = 0.025
    _check_against_dense(r, H, tol=1e-2, tol_min=5e-2)


def test_trained_mlp_with_dataloader_and_float64_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))  # float32 model
    X, Y = classification_data(60, (4,))
    X32 = X.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(X32), Y).backward()
        opt.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X32, Y), batch_size=25)
    r = curvlab.extremes(model, F.cross_entropy, loader, dtype=D, **TIGHT)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    _check_against_dense(r, dense_hessian(model.double(), F.cross_entropy, X32.double(), Y))


def test_which_one_end():
    model = tiny_mlp()
    X, Y = classification_data(20, (5,))
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), which="LA", **TIGHT)
    ev = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, X, Y))
    assert abs(r.lambda_max - float(ev[-1])) <= 1e-7 * abs(float(ev[-1]))
    assert math.isnan(r.lambda_min) and r.vector_min is None and r.converged


def test_warm_start_reuses_vectors_at_little_extra_cost():
    model = tiny_mlp()
    X, Y = classification_data(40, (5,))
    cold = curvlab.extremes(model, F.cross_entropy, (X, Y), tol=1e-6, tol_min=1e-6)
    with torch.no_grad():  # a small training step: the next epoch's Hessian
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    warm = curvlab.extremes(model, F.cross_entropy, (X, Y), tol=1e-6, tol_min=1e-6, init=cold)
    fresh = curvlab.extremes(model, F.cross_entropy, (X, Y), tol=1e-6, tol_min=1e-6)
    assert warm.options["warm_start"] and not fresh.options["warm_start"]
    # a warm start is the previous vectors plus a random one (never the previous vectors
    # alone, which can hide the extreme), and each end also needs its guard pair: on a
    # 57-dimensional problem at tol 1e-6 it saves nothing, but costs at most a few products
    assert warm.cost.hvps <= fresh.cost.hvps + 4
    assert math.isclose(warm.lambda_max, fresh.lambda_max, rel_tol=1e-5)


def spy_products(monkeypatch):
    """Record each product made through a ``HessianOperator`` (``matvec`` and
    ``holdout_statistics``) as ``(vectors, samples of that operator)``, observed at the
    call, independently of the operator's own ``Cost`` bookkeeping."""
    from curvlab.hvp import HessianOperator

    calls = _Calls()
    calls.forms = 0  # per-sample Gauss-Newton forms (forward-mode passes), observed likewise
    for name in ("matvec", "holdout_statistics"):
        def wrapped(self, V, *args, _orig=getattr(HessianOperator, name), **kwargs):
            calls.append((1 if V.dim() == 1 else V.shape[0], self.num_samples))
            mask = kwargs.get("gauss_newton")
            calls.forms += 0 if mask is None else int(mask.sum()) * self.num_samples
            return _orig(self, V, *args, **kwargs)
        monkeypatch.setattr(HessianOperator, name, wrapped)

    def forms(self, V, _orig=HessianOperator.gauss_newton_forms):
        calls.forms += V.shape[0] * self.num_samples
        return _orig(self, V)
    monkeypatch.setattr(HessianOperator, "gauss_newton_forms", forms)

    def losses(self, _orig=HessianOperator.per_sample_losses):  # the stratifying forward pass
        calls.forms += self.num_samples // 3  # a third of a gradient per sample
        return _orig(self)
    monkeypatch.setattr(HessianOperator, "per_sample_losses", losses)
    return calls


class _Calls(list):
    pass


def _classifier(N, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, classification_data(N, (6,), seed=seed + 1)


@pytest.mark.parametrize("regime, curvature", [("exact", "none"), ("exact", "kfac"),
                                               ("multilevel", "none")])
def test_cost_record_counts_the_products_made(monkeypatch, regime, curvature):
    # the record is checked against the products observed through the operator, not
    # against its own definition: vectors multiplied, per-sample products, passes.
    # "kfac" multiplies blocks of several vectors (LOBPCG, the approximation's top
    # eigenvectors as a Lanczos start block); its building cost (gradient work, half of
    # it counted as samples) is read from the Cost the approximation was given
    calls = spy_products(monkeypatch)
    built = []
    import curvlab.curvature as cc
    build = cc.build_curvature
    monkeypatch.setattr(cc, "build_curvature",
                        lambda *a, **k: built.append(k["cost"]) or build(*a, **k))
    if regime == "exact":
        model, N = tiny_mlp(), 30
        r = curvlab.extremes(model, F.cross_entropy, classification_data(N, (5,)), batch_size=7,
                             curvature=curvature)
    else:  # subsample levels and holdouts: operators over parts of the data
        model, (X, Y) = _classifier(N := 1200)
        r = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="multilevel",
                             sample_size=100, tol=0.05, tol_min=0.2, batch_size=300)
        assert r.levels and any(m < N for _, m in calls)
    assert len(built) == (curvature != "none")
    # building an approximation and the holdout's Gauss-Newton forms: gradient work, half
    # of it counted as samples
    extra = (sum(c.grad_samples for c in built) + calls.forms) / 2
    if curvature != "none":
        assert extra > 0
    assert r.options["sampling"] == regime and r.num_samples == N and calls
    vectors = sum(k for k, _ in calls)
    samples = sum(k * m for k, m in calls)
    assert r.cost.products == vectors
    assert r.cost.samples == int(samples + extra)
    assert math.isclose(r.cost.hvps, (samples + extra) / N, rel_tol=1e-12)
    assert r.cost.passes == len(calls)
    if regime == "exact":  # every product over all N samples
        assert all(m == N for _, m in calls)
        assert math.isclose(r.cost.hvps, vectors + extra / N, rel_tol=1e-12)
    assert r.cost.seconds > 0
    # the trace agrees: each step follows at least one pass, its running total of
    # full-data products never decreases and ends within what the record says
    hvps = [e["hvps"] for e in r.history]
    assert 0 < len(hvps) <= r.cost.passes
    assert hvps == sorted(hvps) and 0 < hvps[-1] <= r.cost.hvps * (1 + 1e-12)


def test_result_is_frozen():
    model = tiny_mlp()
    r = curvlab.extremes(model, F.cross_entropy, classification_data(10, (5,)))
    with pytest.raises(AttributeError):
        r.lambda_max = 0.0


# ----------------------------------------------------------------- state kept

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [m.training for m in model.modules()], [p.grad for p in model.parameters()])


def _assert_same(model, snap):
    state, flags, modes, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in grads)


def test_model_state_unchanged_after_call():
    model = tiny_cnn_bn()
    model.train()
    model[1].eval()  # a mixed mode the caller chose: it must come back exactly
    model[0].bias.requires_grad_(False)
    snap = _snapshot(model)
    curvlab.extremes(model, F.cross_entropy, classification_data(12, (2, 6, 6)))
    _assert_same(model, snap)


def test_model_state_unchanged_when_call_raises():
    model = tiny_cnn_bn().train()
    snap = _snapshot(model)
    X, Y = classification_data(12, (2, 6, 6))
    X[7] = float("nan")
    with pytest.raises(ValueError):
        curvlab.extremes(model, F.cross_entropy, (X, Y), batch_size=4)
    _assert_same(model, snap)


# ----------------------------------------------------------------- bad input

def test_no_trainable_parameters():
    model = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad"):
        curvlab.extremes(model, F.cross_entropy, classification_data(10, (5,)))


@pytest.mark.parametrize("empty", [[], (torch.zeros(0, 5, dtype=D), torch.zeros(0, dtype=torch.long))])
def test_empty_data(empty):
    with pytest.raises(ValueError, match="data is empty"):
        curvlab.extremes(tiny_mlp(), F.cross_entropy, empty)


def test_non_finite_loss_names_the_batch():
    X, Y = classification_data(12, (5,))
    X[9, 0] = float("nan")
    with pytest.raises(ValueError, match="loss is not finite.*batch 2"):
        curvlab.extremes(tiny_mlp(), F.cross_entropy, (X, Y), batch_size=4)


def test_non_finite_hvp_names_the_batch():
    # loss finite but its curvature infinite: sqrt(|w|) at w = 0 has an infinite second derivative
    class Cusp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=D))

        def forward(self, x):
            return x * torch.sqrt(self.w.abs() + x.abs() * 0)

    X = torch.ones(6, 1, dtype=D)
    with pytest.raises(ValueError, match="not finite on batch 0"):
        curvlab.extremes(Cusp(), mean_loss, (X, torch.zeros(6, dtype=D)))


def test_loss_that_is_not_a_scalar():
    def per_sample(out, y):
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(ValueError, match="not a scalar.*reduction='mean'"):
        curvlab.extremes(tiny_mlp(), per_sample, classification_data(10, (5,)))


@pytest.mark.parametrize("data", [42, torch.randn(10, 5), "data.pt", [(torch.randn(3, 5),)]])
def test_data_of_the_wrong_kind(data):
    with pytest.raises(TypeError, match="DataLoader|pair"):
        curvlab.extremes(tiny_mlp(), F.cross_entropy, data)


def test_model_of_the_wrong_kind():
    with pytest.raises(TypeError, match="nn.Module"):
        curvlab.extremes(lambda x: x, F.cross_entropy, classification_data(4, (5,)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(which="max"), "which"), (dict(curvature="hessian-free"), "curvature must be one of"),
    (dict(tol=0), "tol"), (dict(max_hvps=-1), "max_hvps"), (dict(method="x"), "method"),
    (dict(init="previous"), "init"),
])
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        curvlab.extremes(tiny_mlp(), F.cross_entropy, classification_data(4, (5,)), **kwargs)


def test_init_from_another_architecture():
    r = curvlab.extremes(tiny_mlp(), F.cross_entropy, classification_data(8, (5,)))
    other = nn.Linear(5, 3).double()
    with pytest.raises(ValueError, match="same architecture"):
        curvlab.extremes(other, F.cross_entropy, classification_data(8, (5,)), init=r)


# ----------------------------------------------------------------- curvature flag

def spy_curvature(monkeypatch):
    """Record each approximation ``extremes`` builds, and each use of its parts: the top
    eigenpairs (start vectors for lambda_max) and the damped inverse (the preconditioner
    of the lambda_min solve)."""
    import curvlab.curvature as cc

    seen = {"built": [], "top": 0, "inverse": 0}
    build = cc.build_curvature

    def spy(name, *args, **kwargs):
        approx = build(name, *args, **kwargs)
        seen["built"].append(name)
        top, inverse = approx.top_eigenpairs, approx.inverse

        def top_(*a, **k):
            seen["top"] += 1
            return top(*a, **k)

        def inverse_(*a, **k):
            seen["inverse"] += 1
            return inverse(*a, **k)

        approx.top_eigenpairs, approx.inverse = top_, inverse_
        return approx

    monkeypatch.setattr(cc, "build_curvature", spy)
    return seen


# TIGHT asks for 1e-8; the defaults for 1 % (lambda_max) and 5 % (lambda_min), or the
# default floor 1e-5 * |lambda_max| where that is larger: the check allows what was asked
@pytest.mark.parametrize("tols", [TIGHT, dict(tol=1e-2, tol_min=5e-2, floor=1e-5)],
                         ids=["tight", "default"])
@pytest.mark.parametrize("curvature, precondition", [(c, False) for c in curvlab.CURVATURES]
                         + [(c, True) for c in curvlab.CURVATURES if c != "none"])
@pytest.mark.parametrize("make, shape", [(tiny_mlp, (5,)), (tiny_cnn_bn, (2, 6, 6))])
def test_every_curvature_flag_gives_the_exact_extremes(monkeypatch, make, shape, curvature, precondition,
                                                       tols):
    # precondition: the lambda_min route of APPROX_POLICY.precondition_min (off by default)
    monkeypatch.setattr(curvlab.solve.APPROX_POLICY, "precondition_min", precondition)
    seen = spy_curvature(monkeypatch)
    model = make()
    X, Y = classification_data(40, shape)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), curvature=curvature, batch_size=16, **tols)
    assert r.options["curvature"] == curvature
    _check_against_dense(r, dense_hessian(model, F.cross_entropy, X, Y), tol=tols["tol"],
                         tol_min=tols["tol_min"], floor=tols["floor"])
    # the flag took its path: the approximation was built once, its top eigenvectors
    # were asked for and, only with precondition_min, its inverse preconditioned the
    # lambda_min solve; its building is in the cost record (samples beyond the Hessian
    # products' N per vector)
    if curvature == "none":
        assert seen == {"built": [], "top": 0, "inverse": 0}
        assert r.cost.samples == r.cost.products * r.num_samples
    else:
        assert seen["built"] == [curvature] and seen["top"] >= 1
        assert (seen["inverse"] >= 1) if precondition else (seen["inverse"] == 0)
        assert r.cost.samples > r.cost.products * r.num_samples


def test_an_approximations_top_vector_starts_the_shared_krylov_space(monkeypatch):
    # the default route: one Lanczos run for both ends, its start vector made of the
    # approximation's top eigenvector (here the Hessian's own) plus the random component
    import curvlab.curvature as cc
    import curvlab.solve as solve
    model, data, H = quadratic_problem(torch.cat([torch.tensor([30.0]), torch.linspace(-1, 1, 20)]),
                                       samples=4)
    w, U = torch.linalg.eigh(H)
    top = U[:, -1].clone()

    class Top:
        def top_eigenpairs(self, rank):
            return w[-1:].repeat(rank), top[None].repeat(rank, 1)

        def inverse(self, V, delta):
            raise AssertionError("no preconditioner on the default route")

    monkeypatch.setattr(cc, "build_curvature", lambda *a, **k: Top())
    starts = []
    lanczos = solve.lanczos
    monkeypatch.setattr(solve, "lanczos", lambda *a, **k: starts.append(k["X0"]) or lanczos(*a, **k))
    overlap = {}
    for flag in ("none", "ggn"):
        starts.clear()
        r = curvlab.extremes(model, mean_loss, data, batch_size=4, curvature=flag, approx_rank=1)
        assert len(starts) == 1 and r.converged_max and r.converged_min
        X0 = starts[0]
        overlap[flag] = None if X0 is None else abs(float(X0.reshape(-1) @ top) / float(X0.norm()))
    assert overlap["none"] is None and overlap["ggn"] > 0.99
    # a warm start has its own lambda_max vector: no approximation is built (nothing would
    # use it)
    monkeypatch.setattr(cc, "build_curvature", lambda *a, **k: pytest.fail("built on a warm start"))
    warm = curvlab.extremes(model, mean_loss, data, batch_size=4, curvature="ggn", init=r)
    assert warm.converged_max and warm.converged_min
    assert warm.cost.phases.get("approximation", 0.0) == 0.0


def test_warm_guard_starts_the_exact_stage_from_the_extreme_and_guard_vectors(monkeypatch):
    # POLICY.warm_exact with warm_guard: an end that the previous call solved exactly starts
    # from the sum of its previous extreme and guard vectors (plus the random component);
    # without warm_guard, from the extreme alone; the answer is the dense one either way
    import dataclasses as dc
    import curvlab.solve as solve
    from curvlab import multilevel
    model, data, H = quadratic_problem(torch.cat([torch.tensor([-1.0, -0.97]), torch.linspace(0, 5, 30)]),
                                       samples=4)
    w, U = torch.linalg.eigh(H)
    prev = curvlab.extremes(model, mean_loss, data, batch_size=4)
    assert set(prev.guard_vectors) == {"max", "min"}
    prev = dc.replace(prev, vector_min=U[:, 0].clone(), guard_vectors={"min": U[:, 1].clone()})
    starts = []
    lanczos = solve.lanczos
    monkeypatch.setattr(solve, "lanczos", lambda *a, **k: starts.append(k["X0"]) or lanczos(*a, **k))
    overlaps = {}
    for guard in (False, True):
        monkeypatch.setattr(multilevel, "POLICY", dc.replace(multilevel.POLICY, warm_exact=True,
                                                             warm_guard=guard))
        starts.clear()
        r = curvlab.extremes(model, mean_loss, data, batch_size=4, which="SA", init=prev)
        assert len(starts) == 1 and r.converged_min
        assert abs(r.lambda_min - float(w[0])) <= 1e-3 * abs(float(w[0]))
        x = starts[0].reshape(-1) / starts[0].norm()
        overlaps[guard] = (abs(float(x @ U[:, 0])), abs(float(x @ U[:, 1])))
    assert overlaps[False][0] > 0.99 and overlaps[False][1] < 0.1, overlaps
    assert all(0.68 < o < 0.72 for o in overlaps[True]), overlaps
    # the preconditioned lambda_min route takes that two-row start as LOBPCG's block
    monkeypatch.setattr(curvlab.solve.APPROX_POLICY, "precondition_min", True)
    r = curvlab.extremes(model, mean_loss, data, batch_size=4, which="SA", init=prev, curvature="ggn")
    assert r.converged_min and abs(r.lambda_min - float(w[0])) <= 1e-3 * abs(float(w[0]))


def test_kfac_falls_back_to_the_exact_fisher_for_other_losses(monkeypatch):
    # K-FAC and the diagonal are built with a Monte-Carlo Fisher (one backward pass per
    # sample) for softmax cross-entropy, and with the exact one for any other loss
    import curvlab.curvature as cc
    built = []
    build = cc.build_curvature
    monkeypatch.setattr(cc, "build_curvature", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    model = tiny_mlp()
    X, Y = classification_data(30, (5,))
    T = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    wide = torch.randint(0, 7, (30,), generator=torch.Generator().manual_seed(3))  # not classes of 3

    def first_output(out, y):  # integer targets, not cross-entropy
        return ((out[:, 0] - y.to(out.dtype)) ** 2).mean()

    def doubled(out, y):  # class-index targets, cross-entropy times two
        return 2 * F.cross_entropy(out, y)

    cases = ((F.cross_entropy, Y, "mc"), (F.mse_loss, T, "exact"), (first_output, wide, "exact"),
             (doubled, Y, "exact"))
    for name in ("kfac", "diag"):
        for loss, target, fisher in cases:
            built.clear()
            r = curvlab.extremes(model, loss, (X, target), curvature=name, batch_size=8, **TIGHT)
            assert built[-1].fisher == fisher
            _check_against_dense(r, dense_hessian(model, loss, X, target), **TIGHT)


def test_kfac_on_a_model_without_supported_layers_says_so():
    model, data, _ = quadratic_problem(torch.linspace(-1, 1, 10), samples=4)
    with pytest.raises(ValueError, match="Linear|Conv2d"):
        curvlab.extremes(model, mean_loss, data, curvature="kfac")
