"""The ecosystem's conventions: scipy operators, a pure functional HVP, flat vectors as named tensors."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, vmap

import curvlab
from curvlab.curvature import build_curvature
from curvlab.functional import FunctionalModel, hvp, loss_hvp, unflatten
from curvlab.hvp import HessianOperator

from conftest import D, classification_data, dense_hessian, quadratic_problem, tiny_cnn_bn, tiny_mlp, mean_loss

sla = pytest.importorskip("scipy.sparse.linalg")


def _mlp_problem():
    model = tiny_mlp().eval()
    X, Y = classification_data(24, (5,))
    return model, (X, Y), dense_hessian(model, F.cross_entropy, X, Y)


# --------------------------------------------------------------------------- scipy

def test_to_scipy_is_a_linear_operator_of_the_hessian():
    model, data, Hd = _mlp_problem()
    H = HessianOperator(model, F.cross_entropy, data, batch_size=10)  # three batches, the last smaller
    A = H.to_scipy()
    n = H.n
    assert isinstance(A, sla.LinearOperator) and A.shape == (n, n) and A.dtype == np.float64
    assert sla.aslinearoperator(A) is A
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(n), rng.standard_normal((n, 3))
    ref = Hd.numpy()
    y = A.matvec(x)
    assert isinstance(y, np.ndarray) and y.shape == (n,) and y.dtype == np.float64
    np.testing.assert_allclose(y, ref @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.matvec(x[:, None]), (ref @ x)[:, None], rtol=1e-10, atol=1e-12)
    passes = H.cost.passes
    np.testing.assert_allclose(A.matmat(X), ref @ X, rtol=1e-10, atol=1e-12)
    assert H.cost.passes == passes + 1  # the block in one pass
    np.testing.assert_allclose(A.rmatvec(x), ref @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A @ X, ref @ X, rtol=1e-10, atol=1e-12)


def test_scipy_eigsh_and_lobpcg_find_the_extremes():
    model, data, Hd = _mlp_problem()
    ev = torch.linalg.eigvalsh(Hd)
    A = HessianOperator(model, F.cross_entropy, data).to_scipy()
    top = sla.eigsh(A, k=1, which="LA", return_eigenvectors=False, tol=1e-10)
    bottom = sla.eigsh(A, k=1, which="SA", return_eigenvectors=False, tol=1e-10)
    assert top[0] == pytest.approx(float(ev[-1]), rel=1e-7)
    assert bottom[0] == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-9)
    X0 = np.random.default_rng(1).standard_normal((A.shape[0], 2))
    vals, _ = sla.lobpcg(A, X0, largest=True, tol=1e-9, maxiter=500)
    assert max(vals) == pytest.approx(float(ev[-1]), rel=1e-6)


def test_scipy_cg_solves_with_a_positive_definite_hessian():
    model, data, Hd = quadratic_problem(np.linspace(1.0, 4.0, 8), samples=12)
    A = HessianOperator(model, mean_loss, data).to_scipy()
    b = np.arange(1.0, 9.0)
    x, info = sla.cg(A, b, rtol=1e-12, maxiter=100)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Hd.numpy(), b), rtol=1e-8)


def test_to_scipy_float32_and_other_operators():
    model, (X, Y), _ = _mlp_problem()
    model32 = tiny_mlp().float().eval()
    H32 = HessianOperator(model32, F.cross_entropy, (X.float(), Y))
    A = H32.to_scipy()
    assert A.dtype == np.float32
    x = np.ones(H32.n, dtype=np.float64)  # scipy may hand in another dtype: cast to the operator's
    y = A.matvec(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, H32.matvec(torch.ones(H32.n)).numpy(), rtol=1e-6)
    # any curvlab operator: a curvature approximation through the module-level function
    fm = FunctionalModel(model)
    C = build_curvature("kfac", fm, F.cross_entropy, (X, Y))
    AC = curvlab.to_scipy(C)
    V = torch.randn(2, C.n, dtype=D)
    np.testing.assert_allclose(AC.matmat(V.T.numpy()), C.matvec(V).T.numpy(), rtol=1e-10, atol=1e-12)


def test_to_scipy_without_scipy_says_how_to_install(monkeypatch):
    model, data, _ = _mlp_problem()
    H = HessianOperator(model, F.cross_entropy, data)
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install scipy"):
        H.to_scipy()


# --------------------------------------------------------------------------- functional hvp

def test_functional_hvp_matches_torch_func_hessian():
    g = torch.Generator().manual_seed(0)
    params = {"W": torch.randn(3, 4, generator=g, dtype=D), "b": torch.randn(3, generator=g, dtype=D)}
    x = torch.randn(4, generator=g, dtype=D)

    def f(p):
        return torch.sin(p["W"] @ x + p["b"]).pow(2).sum() + (p["W"] ** 4).sum()

    v = {"W": torch.randn(3, 4, generator=g, dtype=D), "b": torch.randn(3, generator=g, dtype=D)}
    spec = curvlab.ParamSpec.from_tensors(params)
    flat_f = lambda flat: f(spec.unflatten(flat))  # noqa: E731
    Hd = hessian(flat_f)(spec.flatten(params))
    out = hvp(f, params, v)
    assert set(out) == {"W", "b"} and out["W"].shape == (3, 4)
    torch.testing.assert_close(spec.flatten(out), Hd @ spec.flatten(v), rtol=1e-12, atol=1e-12)
    # a plain tensor works too, and so does vmap over a block of directions
    V = torch.randn(5, spec.numel, generator=g, dtype=D)
    block = vmap(lambda u: hvp(flat_f, spec.flatten(params), u))(V)
    torch.testing.assert_close(block, V @ Hd, rtol=1e-12, atol=1e-12)


def test_loss_hvp_is_the_batch_hessian_with_buffers_and_frozen_parameters(ce):
    model = tiny_cnn_bn().eval()
    model[0].bias.requires_grad_(False)  # frozen: held fixed, not in the Hessian
    X, Y = classification_data(10, (2, 6, 6))
    Hd = dense_hessian(model, ce, X, Y)
    n = Hd.shape[0]
    v = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(3))
    flat = loss_hvp(model, ce, None, (X, Y), v)
    assert flat.shape == (n,)
    torch.testing.assert_close(flat, Hd @ v, rtol=1e-10, atol=1e-12)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    as_dict = loss_hvp(model, ce, params, (X, Y), unflatten(model, v))
    assert list(as_dict) == list(params)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in as_dict.values()]), Hd @ v,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=f"shape \\({n},\\)"):
        loss_hvp(model, ce, None, (X, Y), torch.ones(n + 1, dtype=D))


def test_loss_hvp_agrees_with_the_operator_and_extremes(ce):
    model, (X, Y), _ = _mlp_problem()
    r = curvlab.extremes(model, ce, (X, Y), which="LA", tol=1e-8, floor=0.0, max_hvps=200, sampling="exact")
    assert r.converged_max
    hv = loss_hvp(model, ce, None, (X, Y), r.vector_max)  # one batch holding all data: H v
    torch.testing.assert_close(hv, r.lambda_max * r.vector_max, rtol=0, atol=1e-6 * abs(r.lambda_max))


# --------------------------------------------------------------------------- unflatten

def test_unflatten_maps_a_flat_vector_to_named_trainable_parameters():
    model = tiny_cnn_bn()
    model[1].weight.requires_grad_(False)
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in trainable])
    named = curvlab.unflatten(model, flat)
    assert list(named) == [k for k, _ in trainable]
    for k, p in trainable:
        assert named[k].shape == p.shape
        torch.testing.assert_close(named[k], p.detach(), rtol=0, atol=0)
    block = curvlab.unflatten(model, torch.stack([flat, 2 * flat]))
    for k, p in trainable:
        assert block[k].shape == (2, *p.shape)
        torch.testing.assert_close(block[k][1], 2 * p.detach(), rtol=0, atol=0)
    # a strided vector works too, and the tensors are views of it
    wide = torch.stack([flat, flat], dim=1)
    last = curvlab.unflatten(model, wide[:, 0])[trainable[-1][0]]
    torch.testing.assert_close(last, trainable[-1][1].detach())
    wide[-1, 0] = 7.0
    assert last.reshape(-1)[-1] == 7.0


def test_unflatten_rejects_a_vector_of_another_length():
    model = tiny_mlp()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"{n} trainable parameters"):
        curvlab.unflatten(model, torch.zeros(n - 1))
    with pytest.raises(ValueError, match="does not fit"):
        curvlab.unflatten(model, torch.zeros(2, n + 3))
    with pytest.raises(TypeError, match="not computed"):
        curvlab.unflatten(model, None)


def test_hvp_module_is_not_shadowed():
    import curvlab.hvp as module

    assert curvlab.hvp is module and hasattr(module, "HessianOperator")
