"""The HVP engine against dense Hessians (float64).

Tolerance 1e-10 relative: both sides are exact in exact arithmetic and differ
only by float64 rounding over O(10^2) operations per entry (~1e-14); 1e-10
leaves four orders of margin yet catches any wrong weight or missing term.
"""

import pytest
import torch
import torch.nn.functional as F

from curvlab import HessianOperator
from curvlab.hvp import Cost

from conftest import classification_data, dense_hessian, tiny_cnn_bn, tiny_mlp

RTOL = 1e-10

PROBLEMS = {
    "mlp": (tiny_mlp, (5,)),
    "cnn_bn": (tiny_cnn_bn, (2, 6, 6)),
}


def _setup(name, n=11):
    make, shape = PROBLEMS[name]
    model = make().eval()
    X, Y = classification_data(n, shape)
    return model, X, Y, dense_hessian(model, F.cross_entropy, X, Y)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_single_hvp_matches_dense(name, method):
    model, X, Y, Hd = _setup(name)
    # batch_size 4 over 11 samples: batches of 4, 4, 3, so the weights matter
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=4, method=method)
    v = torch.randn(H.n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert _rel(H.matvec(v), Hd @ v) < RTOL


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_block_hvp_matches_dense(name, method):
    model, X, Y, Hd = _setup(name)
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=4, method=method)
    V = torch.randn(5, H.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert _rel(H.matvec(V), V @ Hd) < RTOL


def test_block_counts_cost():
    model, X, Y, _ = _setup("mlp")
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=4)
    H.matvec(torch.randn(3, H.n, dtype=torch.float64))
    assert (H.cost.hvps, H.cost.samples, H.cost.passes) == (3, 3 * 11, 1)


def test_dataloader_and_list_inputs_agree():
    model, X, Y, Hd = _setup("mlp")
    ds = torch.utils.data.TensorDataset(X, Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)
    batches = [(X[i:i + 3], Y[i:i + 3]) for i in range(0, len(X), 3)]
    v = torch.randn(Hd.shape[0], dtype=torch.float64)
    for data in (loader, batches, iter(batches)):
        H = HessianOperator(model, F.cross_entropy, data)
        assert _rel(H.matvec(v), Hd @ v) < RTOL
        assert _rel(H.matvec(v), Hd @ v) < RTOL  # a second pass sees the same data


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_per_sample_curvature_sums_to_quadratic_form(name):
    model, X, Y, Hd = _setup(name)
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=4)
    v = torch.randn(H.n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    d2 = H.per_sample_curvature(v)
    assert d2.shape == (len(X),)
    assert abs(float(d2.mean() - v @ Hd @ v)) < RTOL * float((v @ Hd).norm() * v.norm())


def test_per_sample_curvature_is_each_samples_own():
    model, X, Y, _ = _setup("mlp", n=4)
    H = HessianOperator(model, F.cross_entropy, (X, Y))
    v = torch.randn(H.n, dtype=torch.float64)
    d2 = H.per_sample_curvature(v)
    for d in range(4):
        Hs = dense_hessian(model, F.cross_entropy, X[d:d + 1], Y[d:d + 1])
        assert abs(float(d2[d] - v @ Hs @ v)) < 1e-10 * (1 + float(v @ Hs @ v).__abs__())


def test_loss_and_gradient_match_autograd():
    model, X, Y, _ = _setup("cnn_bn")
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=4)
    loss, g = H.loss_and_gradient()
    model.zero_grad()
    ref = F.cross_entropy(model(X), Y)
    ref.backward()
    gref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert abs(loss - float(ref)) < 1e-12
    assert _rel(g, gref) < RTOL


def test_frozen_parameters_are_excluded():
    model, X, Y, _ = _setup("mlp")
    model[0].weight.requires_grad_(False)
    H = HessianOperator(model, F.cross_entropy, (X, Y))
    assert H.n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    Hd = dense_hessian(model, F.cross_entropy, X, Y)
    v = torch.randn(H.n, dtype=torch.float64)
    assert _rel(H.matvec(v), Hd @ v) < RTOL


def test_wrong_vector_shape_raises():
    model, X, Y, _ = _setup("mlp")
    H = HessianOperator(model, F.cross_entropy, (X, Y))
    with pytest.raises(ValueError, match="shape"):
        H.matvec(torch.randn(H.n + 1, dtype=torch.float64))


def test_unknown_method_raises():
    model, X, Y, _ = _setup("mlp")
    with pytest.raises(ValueError, match="rev-rev"):
        HessianOperator(model, F.cross_entropy, (X, Y), method="magic")


def test_cost_addition():
    a, b = Cost(1, 2, 3, 4, 5.0), Cost(1, 1, 1, 1, 1.0)
    assert (a + b) == Cost(2, 3, 4, 5, 6.0)
