"""Curvature approximations (GGN, K-FAC, GGN diagonal) against dense references (float64).

Tolerances.  Quantities that are exact in exact arithmetic (GGN products, the
K-FAC matrix against its definition, the exact diagonal, K-FAC's closed-form
eigenpairs and inverse) are compared at 1e-10 relative: both sides are float64
computations of O(10^2..10^3) operations per entry on well-scaled tiny models
(rounding ~1e-14), so 1e-10 leaves four orders of margin yet catches any wrong
weight, missing term or misplaced index.  Iterative or random quantities get
tolerances derived from their error model (stated where used).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from curvlab.curvature import APPROXIMATIONS, GGN, KFAC, Diagonal, build_curvature
from curvlab.curvature.base import output_hessian_sqrt
from curvlab.data import TensorBatches
from curvlab.functional import FunctionalModel
from curvlab.hvp import Cost

from conftest import tiny_cnn_bn

D = torch.float64
RTOL = 1e-10


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 problems run fastest on one thread; on a shared, loaded machine
    several threads per process made small eigendecompositions 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny problems -------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def cnn(seed=0, **conv):
    torch.manual_seed(seed)
    c = nn.Conv2d(2, 3, 3, **conv).double()
    with torch.no_grad():
        hw = c(torch.zeros(1, 2, 6, 6, dtype=D)).shape[-1]
    return nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.Linear(3 * hw * hw, 3)).double().eval()


def cnn_bn(seed=0):
    """Conv -> BatchNorm (eval, non-trivial statistics) -> Softplus -> Linear."""
    return tiny_cnn_bn(seed).eval()


class ScaledTanh(nn.Module):
    """A module with its own parameter *and* a child: its per-sample gradients need the
    whole-network fallback (per-sample Jacobians), not the leaf-module path."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=D))
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(x * self.scale)


def mixed(seed=0):
    """Linear, LayerNorm (a leaf without closed form: vmap path), ScaledTanh, Linear."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), ScaledTanh(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_(0, 0.2)
    return m.eval()


def data(n, shape, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)


def regression_data(n, shape, outputs=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randn(n, outputs, generator=g, dtype=D)


def batches(X, Y, size=4):
    # 11 samples in batches of 4: 4, 4, 3, so the batch weights n_b / N matter
    return TensorBatches(X, Y, size)


PROBLEMS = {"mlp": (mlp, (5,)), "cnn_bn": (cnn_bn, (2, 6, 6))}
DIAG_PROBLEMS = {**PROBLEMS, "mixed": (mixed, (5,))}


# -- dense references -------------------------------------------------------------------
def _flat_model(model):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    others = dict(model.named_buffers())
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def out_fn(flat, X):
        p = {k: c.view(s) for k, c, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(model, {**p, **others}, (X,))

    offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
    return out_fn, flat0, offsets


def dense_ggn(model, loss_fn, X, Y):
    """``J^T H J`` with ``J`` the Jacobian of all outputs and ``H`` the Hessian of the
    full-data mean loss w.r.t. them: the GGN of (1/N) sum_d loss_d."""
    out_fn, flat0, _ = _flat_model(model)
    J = jacrev(out_fn)(flat0, X).reshape(-1, flat0.numel())
    O = out_fn(flat0, X).detach()
    H = hessian(lambda o: loss_fn(o, Y))(O).reshape(O.numel(), O.numel())
    return J.T @ H @ J


def per_sample_output_hessians(loss_fn, O, Y):
    """``H_d``: closed form ``diag(p) - p p^T`` for cross-entropy, else torch.func.hessian."""
    if loss_fn is F.cross_entropy:
        p = torch.softmax(O, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.stack([hessian(lambda o: loss_fn(o[None], y[None]))(o) for o, y in zip(O, Y)])


def patches_by_loops(x, conv):
    """Conv input patches ``(N, T, c kh kw)`` by explicit slicing (independent of unfold)."""
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ph, pw = conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            win = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(win.reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def kfac_reference(model, loss_fn, X, Y, conv="reduce"):
    """Dense K-FAC matrix of a Sequential model from the definition (module docstring of
    curvlab.curvature.kfac): per layer ``A = mean_{d,t} a a^T``, ``G = mean_d sum_t
    J_dt^T H_d J_dt`` (``J_dt``: Jacobian of the output w.r.t. the layer's output at
    location t) for ``conv="expand"``; for a convolution with ``conv="reduce"``,
    ``A = mean_d abar abar^T`` with ``abar = mean_t a_dt`` and ``G = mean_d (sum_t J_dt)^T
    H_d (sum_t J_dt)``; block ``kron(G, A)`` in [W | b] row-major order; the GGN diagonal
    for every other parameter.  Returns ``(dense, {layer index: (A, G)})``."""
    out_fn, flat0, offsets = _flat_model(model)
    n = flat0.numel()
    N = X.shape[0]
    O = model(X).detach()
    Hd = per_sample_output_hessians(loss_fn, O, Y)
    ref = torch.diag(torch.diagonal(dense_ggn(model, loss_fn, X, Y)))
    factors = {}
    h = X
    for i, layer in enumerate(model):
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and getattr(layer, "groups", 1) == 1:
            tail = model[i + 1:]
            s = layer(h).detach()
            Js = vmap(jacrev(lambda si: tail(si[None])[0]))(s)        # (N, C, *s_shape[1:])
            if isinstance(layer, nn.Conv2d):
                a = patches_by_loops(h, layer)                         # (N, T, f)
                Js = Js.flatten(3)                                     # (N, C, out, T)
            else:
                a = h[:, None, :]
                Js = Js[..., None]
            if layer.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
            if isinstance(layer, nn.Conv2d) and conv == "reduce":
                a, Js = a.mean(1, keepdim=True), Js.sum(-1, keepdim=True)
            T = a.shape[1]
            A = torch.einsum("dti,dtj->ij", a, a) / (N * T)
            G = torch.einsum("dcot,dce,dept->op", Js, Hd, Js) / N
            factors[i] = (A, G)
            out_dim = G.shape[0]
            w0 = offsets[f"{i}.weight"]
            idx = torch.arange(w0, w0 + layer.weight.numel()).view(out_dim, -1)
            if layer.bias is not None:
                b0 = offsets[f"{i}.bias"]
                idx = torch.cat([idx, torch.arange(b0, b0 + out_dim)[:, None]], 1)
            idx = idx.reshape(-1)
            ref[idx[:, None], idx[None, :]] = torch.kron(G, A)
        h = layer(h).detach()
    assert ref.shape == (n, n)
    return ref, factors


def dense_of(op):
    return op.matvec(torch.eye(op.n, dtype=D))


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# -- GGN ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_block_products_match_dense(name, method):
    make, shape = PROBLEMS[name]
    model = make()
    X, Y = data(11, shape)
    G = GGN(FunctionalModel(model), F.cross_entropy, batches(X, Y), method=method)
    V = torch.randn(4, G.n, dtype=D, generator=torch.Generator().manual_seed(2))
    assert rel(G.matvec(V), V @ dense_ggn(model, F.cross_entropy, X, Y)) < RTOL


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
def test_ggn_single_vector_with_non_ce_loss(method):
    model = mlp()
    X, Y = regression_data(11, (5,))
    G = GGN(FunctionalModel(model), F.mse_loss, batches(X, Y), method=method)
    v = torch.randn(G.n, dtype=D, generator=torch.Generator().manual_seed(3))
    out = G.matvec(v)
    assert out.shape == (G.n,)
    assert rel(out, dense_ggn(model, F.mse_loss, X, Y) @ v) < RTOL


class _LoggedDataset(torch.utils.data.Dataset):
    """``(X[i], Y[i])``, logging every index read (in order)."""

    def __init__(self, X, Y):
        self.X, self.Y, self.log = X, Y, []

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        self.log.append(i)
        return self.X[i], self.Y[i]


def test_ggn_max_samples_uses_first_batches_and_stays_fixed():
    model = mlp()
    X, Y = data(11, (5,))
    ds = _LoggedDataset(X, Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    G = GGN(FunctionalModel(model), F.cross_entropy, loader, max_samples=7)
    assert G.num_samples == 8  # whole batches: 4 + 4 >= 7
    # the kept samples: the first two batches of the pass that read them, i.e. the last
    # 8 indices read while building (a shuffled order, so not simply X[:8])
    kept = ds.log[-8:]
    assert len(set(kept)) == 8
    v = torch.randn(G.n, dtype=D, generator=torch.Generator().manual_seed(4))
    ref = dense_ggn(model, F.cross_entropy, X[kept], Y[kept]) @ v  # independent, dense
    reads = len(ds.log)
    assert rel(G.matvec(v), ref) < RTOL
    list(loader)  # the loader moves on to another shuffle
    # the kept batches are held, not re-read: the same operator after the loader moved on
    assert rel(G.matvec(v), ref) < RTOL
    assert len(ds.log) == reads + len(X)  # only the list(loader) pass read the data
    G2 = GGN(FunctionalModel(model), F.cross_entropy, batches(X, Y), max_samples=7)
    assert rel(G2.matvec(v), dense_ggn(model, F.cross_entropy, X[:8], Y[:8]) @ v) < RTOL


def test_ggn_top_eigenpairs_match_dense_spectrum():
    model = mlp()
    X, Y = data(11, (5,))
    G = GGN(FunctionalModel(model), F.cross_entropy, batches(X, Y), tol=1e-10)
    values, vectors = G.top_eigenpairs(4)
    ref = torch.linalg.eigvalsh(dense_ggn(model, F.cross_entropy, X, Y)).flip(0)[:4]
    # Lanczos converged to residual <= 1e-10 * theta bounds the eigenvalue error by that
    assert torch.allclose(values, ref, rtol=1e-8)
    assert torch.allclose(vectors @ vectors.T, torch.eye(4, dtype=D), atol=1e-12)


def test_ggn_inverse_is_damped_low_rank_inverse():
    model = mlp()
    X, Y = data(11, (5,))
    G = GGN(FunctionalModel(model), F.cross_entropy, batches(X, Y), rank=3, tol=1e-10)
    values, U = G.top_eigenpairs(3)
    d = 0.1
    dense = (U.T * values) @ U + d * torch.eye(G.n, dtype=D)
    V = torch.randn(2, G.n, dtype=D)
    assert rel(G.inverse(V, d), torch.linalg.solve(dense, V.T).T) < RTOL


def test_ggn_adds_to_given_cost():
    model = mlp()
    X, Y = data(11, (5,))
    cost = Cost()
    G = build_curvature("ggn", FunctionalModel(model), F.cross_entropy, batches(X, Y), cost=cost)
    G.matvec(torch.randn(3, G.n, dtype=D))
    assert cost.grad_samples == 2 * 3 * 11 and cost.seconds > 0
    assert cost.hvps == 0  # GGN products are not Hessian products


# -- K-FAC -------------------------------------------------------------------------------
CONV_CONFIGS = {
    "plain": {},
    "stride_pad_dilation": dict(stride=2, padding=1, dilation=2),
    "circular_no_bias": dict(padding=1, padding_mode="circular", bias=False),
}


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.mse_loss], ids=["ce", "mse"])
def test_kfac_linear_matches_definition(loss_fn):
    model = mlp()
    X, Y = data(11, (5,)) if loss_fn is F.cross_entropy else regression_data(11, (5,))
    K = KFAC(FunctionalModel(model), loss_fn, batches(X, Y))
    ref, factors = kfac_reference(model, loss_fn, X, Y)
    assert rel(dense_of(K), ref) < RTOL
    for i, (A, G) in factors.items():
        A_k, G_k = K.factors[f"{i}.weight"]
        assert rel(A_k, A) < RTOL and rel(G_k, G) < RTOL


@pytest.mark.parametrize("conv", ["reduce", "expand"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_kfac_conv_matches_definition(config, conv):
    model = cnn(**CONV_CONFIGS[config])
    X, Y = data(11, (2, 6, 6))
    K = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y), conv=conv)
    ref, _ = kfac_reference(model, F.cross_entropy, X, Y, conv=conv)
    assert rel(dense_of(K), ref) < RTOL
    other, _ = kfac_reference(model, F.cross_entropy, X, Y, conv={"reduce": "expand", "expand": "reduce"}[conv])
    assert rel(dense_of(K), other) > 100 * RTOL  # the two factorisations differ here


def test_kfac_reduce_is_the_exact_conv_block_when_patches_do_not_vary():
    # one sample whose input is constant over space, no padding: every output location sees
    # the same patch a, so the block's per-sample Jacobian sum_t g_t a^T = (sum_t g_t) a^T is
    # what "reduce" factors, exactly; "expand" drops the correlation of g_t across locations
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double().eval()
    X = torch.randn(1, 2, 1, 1, dtype=D).expand(1, 2, 6, 6).contiguous()
    Y = torch.tensor([1])
    Gd = dense_ggn(model, F.cross_entropy, X, Y)
    for conv, exact in (("reduce", True), ("expand", False)):
        K = KFAC(FunctionalModel(model), F.cross_entropy, (X, Y), conv=conv)
        idx = K.blocks[0].index.reshape(-1)
        block = (idx[:, None], idx[None, :])
        assert (rel(dense_of(K)[block], Gd[block]) < RTOL) == exact, conv


def test_kfac_conv_option_is_checked():
    model = cnn()
    X, Y = data(4, (2, 6, 6))
    with pytest.raises(ValueError, match="conv must be one of"):
        KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y), conv="sum")


def grouped_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).double().eval()


@pytest.mark.parametrize("name,diag_names", [
    ("cnn_bn", ["1.weight", "1.bias"]),                      # BatchNorm: closed-form leaf path
    ("mixed", ["1.weight", "1.bias", "2.scale"]),            # LayerNorm: vmap; scale: fallback
    ("grouped", ["0.weight", "0.bias"]),                     # grouped conv: not factored, vmap
])
def test_kfac_other_parameters_get_exact_ggn_diagonal(name, diag_names):
    make, shape = {**DIAG_PROBLEMS, "grouped": (grouped_cnn, (2, 6, 6))}[name]
    model = make()
    X, Y = data(11, shape)
    K = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y))
    assert K.diag_names == diag_names
    ref, _ = kfac_reference(model, F.cross_entropy, X, Y)
    assert rel(dense_of(K), ref) < RTOL


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.mse_loss], ids=["ce", "mse"])
def test_kfac_single_linear_one_sample_is_exact_ggn(loss_fn):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double().eval()
    X, Y = data(1, (5,)) if loss_fn is F.cross_entropy else regression_data(1, (5,))
    K = KFAC(FunctionalModel(model), loss_fn, (X, Y))
    assert rel(dense_of(K), dense_ggn(model, loss_fn, X, Y)) < RTOL


def test_kfac_layer_blocks_exact_for_one_sample_in_deeper_net():
    model = mlp()
    X, Y = data(1, (5,))
    K = KFAC(FunctionalModel(model), F.cross_entropy, (X, Y))
    Gd, Kd = dense_ggn(model, F.cross_entropy, X, Y), dense_of(K)
    for blk in K.blocks:
        idx = blk.index.reshape(-1)
        block = (idx[:, None], idx[None, :])
        assert rel(Kd[block], Gd[block]) < RTOL


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_kfac_top_eigenpairs_are_eigenpairs(name):
    make, shape = PROBLEMS[name]
    X, Y = data(11, shape)
    K = KFAC(FunctionalModel(make()), F.cross_entropy, batches(X, Y))
    k = 6
    values, vectors = K.top_eigenpairs(k)
    assert values.dtype == torch.float64 and vectors.shape == (k, K.n)
    assert torch.all(values[:-1] >= values[1:])
    assert torch.allclose(vectors @ vectors.T, torch.eye(k, dtype=D), atol=1e-12)
    residual = (K.matvec(vectors) - values[:, None] * vectors).norm(dim=1)
    assert float(residual.max()) < RTOL * float(values[0])
    dense = dense_of(K)
    assert torch.allclose(values, torch.linalg.eigvalsh(dense).flip(0)[:k], rtol=RTOL,
                          atol=RTOL * float(values[0]))


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_kfac_inverse_inverts_damped_operator(name):
    make, shape = PROBLEMS[name]
    X, Y = data(11, shape)
    K = KFAC(FunctionalModel(make()), F.cross_entropy, batches(X, Y))
    V = torch.randn(3, K.n, dtype=D, generator=torch.Generator().manual_seed(5))
    d = 1e-2
    # (C + dI)^{-1} (C + dI) V = V; the error is amplified by cond(C + dI) <= (||C|| + d) / d
    cond = (float(K.top_eigenpairs(1)[0]) + d) / d
    assert rel(K.inverse(K.matvec(V) + d * V, d), V) < RTOL * cond
    assert rel(K.inverse(V, d), torch.linalg.solve(dense_of(K) + d * torch.eye(K.n, dtype=D), V.T).T) \
        < RTOL * cond


def test_kfac_mc_fisher_converges_to_exact():
    model = mlp()
    X, Y = data(11, (5,))
    exact = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y))
    mc = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y), fisher="mc", mc_samples=1000,
              seed=3)
    # each G entry is a mean of 11 * 1000 draws; (p - e)(p - e)^T has entries of size <= 1, so the
    # Monte-Carlo error is about 1 / sqrt(11000) ~ 1e-2 relative: 5e-2 is a loose bound that
    # still fails for a wrong sign, scale or distribution
    for w, (_, G) in exact.factors.items():
        assert rel(mc.factors[w][1], G) < 5e-2
        assert rel(mc.factors[w][0], exact.factors[w][0]) < RTOL  # A does not depend on labels
    again = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y), fisher="mc", mc_samples=3, seed=3)
    same = KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y), fisher="mc", mc_samples=3, seed=3)
    assert all(torch.equal(again.factors[w][1], same.factors[w][1]) for w in again.factors)


def test_mc_output_hessian_factor_is_unbiased():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 5, dtype=D, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    S = output_hessian_sqrt(F.cross_entropy, out, y, fisher="mc", mc_samples=20000, generator=g)
    H = per_sample_output_hessians(F.cross_entropy, out, y)
    # entries of (p - e)(p - e)^T lie in [-1, 1]: standard error <= 1 / sqrt(20000) = 7e-3
    assert float((S @ S.transpose(1, 2) - H).abs().max()) < 5 * 7.1e-3


def test_kfac_hooks_removed_and_model_untouched():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = data(11, (5,))
    KFAC(FunctionalModel(model), F.cross_entropy, batches(X, Y))
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- diagonal ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DIAG_PROBLEMS))
def test_exact_diagonal_matches_dense_ggn(name):
    make, shape = DIAG_PROBLEMS[name]
    model = make()
    X, Y = data(11, shape)
    Dg = Diagonal(FunctionalModel(model), F.cross_entropy, batches(X, Y), method="exact")
    ref = torch.diagonal(dense_ggn(model, F.cross_entropy, X, Y))
    assert rel(Dg.diagonal, ref) < RTOL
    V = torch.randn(2, Dg.n, dtype=D)
    assert rel(Dg.matvec(V), V * ref) < RTOL
    assert rel(Dg.inverse(V, 0.5), V / (ref + 0.5)) < RTOL


def test_exact_diagonal_with_mse():
    model = mlp()
    X, Y = regression_data(11, (5,))
    Dg = Diagonal(FunctionalModel(model), F.mse_loss, batches(X, Y))
    assert Dg.method == "exact"
    assert rel(Dg.diagonal, torch.diagonal(dense_ggn(model, F.mse_loss, X, Y))) < RTOL


def test_hutchinson_diagonal_is_unbiased():
    model = mlp()
    X, Y = data(11, (5,))
    P = 100
    Dg = Diagonal(FunctionalModel(model), F.cross_entropy, batches(X, Y, size=11), method="hutchinson",
                  probes=P, seed=1)
    G = dense_ggn(model, F.cross_entropy, X, Y)
    ref = torch.diagonal(G)
    # z_p (G z)_p = G_pp + sum_{q != p} z_p z_q G_pq: variance sigma_p^2 = sum_{q != p} G_pq^2 per
    # probe; the mean of P probes is within 5 sigma_p / sqrt(P) (Gaussian-tail 6e-7 per entry);
    # clamping negative estimates to 0 can only move an entry towards ref >= 0
    sigma = ((G ** 2).sum(1) - ref ** 2).clamp_min(0).sqrt()
    err = (Dg.diagonal - ref).abs()
    assert torch.all(err <= 5 * sigma / math.sqrt(P) + 1e-12)
    assert float(err.max()) > 0  # an estimate, not the exact diagonal


def test_diagonal_top_eigenpairs_are_largest_entries():
    X, Y = data(11, (5,))
    Dg = Diagonal(FunctionalModel(mlp()), F.cross_entropy, batches(X, Y))
    values, vectors = Dg.top_eigenpairs(5)
    assert torch.equal(values, torch.sort(Dg.diagonal, descending=True).values[:5])
    assert torch.equal(vectors.abs().sum(1), torch.ones(5, dtype=D))
    assert torch.allclose(Dg.matvec(vectors), values[:, None] * vectors, rtol=0, atol=0)


# -- the factory and bad inputs --------------------------------------------------------------
@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_build_curvature_builds_each(name):
    X, Y = data(11, (5,))
    C = build_curvature(name, FunctionalModel(mlp()), F.cross_entropy, batches(X, Y), max_samples=5)
    assert C.n == 5 * 6 + 6 + 6 * 3 + 3 and C.num_samples == 8  # whole batches: 4 + 4 >= 5
    assert C.matvec(torch.randn(C.n, dtype=D)).shape == (C.n,)


def test_unknown_name_lists_valid_ones():
    X, Y = data(4, (5,))
    with pytest.raises(ValueError, match=r"'diag', 'ggn', 'kfac'"):
        build_curvature("hessian", FunctionalModel(mlp()), F.cross_entropy, (X, Y))


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5, 3, dtype=D))

    def forward(self, x):
        return x @ self.scale


def test_kfac_without_linear_or_conv_raises():
    X, Y = data(4, (5,))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        KFAC(FunctionalModel(NoLayers().eval()), F.cross_entropy, (X, Y))


class TiedHead(nn.Module):
    """Owns the first layer's weight as well (weight tying with another kind of module)."""

    def __init__(self, lin):
        super().__init__()
        self.weight = lin.weight

    def forward(self, h):
        return h[:, :3] + h[:, :3] @ self.weight[:3, :3]


def test_kfac_weight_tied_to_another_module_raises():
    torch.manual_seed(0)
    lin = nn.Linear(5, 6).double()
    model = nn.Sequential(lin, nn.Tanh(), TiedHead(lin)).eval()
    X, Y = data(4, (5,))
    with pytest.raises(ValueError, match="weight tying"):
        KFAC(FunctionalModel(model), F.cross_entropy, (X, Y))


def test_kfac_with_frozen_linear_weights_raises():
    model = mlp()
    for p in model.parameters():
        if p.dim() == 2:
            p.requires_grad_(False)
    X, Y = data(4, (5,))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        KFAC(FunctionalModel(model), F.cross_entropy, (X, Y))


@pytest.mark.parametrize("damping", [0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_nonpositive_damping_raises(name, damping):
    X, Y = data(4, (5,))
    C = build_curvature(name, FunctionalModel(mlp()), F.cross_entropy, (X, Y))
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        C.inverse(torch.ones(C.n, dtype=D), damping)


def test_mc_fisher_with_non_ce_loss_raises():
    X, Y = regression_data(4, (5,))
    with pytest.raises(ValueError, match="fisher='mc'.*softmax cross-entropy"):
        KFAC(FunctionalModel(mlp()), F.mse_loss, (X, Y), fisher="mc")


def test_non_mean_loss_raises_for_kfac():
    X, Y = data(4, (5,))
    with pytest.raises(ValueError, match="not the mean of the per-sample losses"):
        KFAC(FunctionalModel(mlp()), lambda o, y: F.cross_entropy(o, y, reduction="sum"), (X, Y))


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_bad_shapes_and_k_raise(name):
    X, Y = data(4, (5,))
    C = build_curvature(name, FunctionalModel(mlp()), F.cross_entropy, (X, Y))
    with pytest.raises(ValueError, match="shape"):
        C.matvec(torch.ones(C.n + 1, dtype=D))
    for k in (0, C.n + 1, 2.0):
        with pytest.raises(ValueError, match="k must be an int"):
            C.top_eigenpairs(k)


def test_bad_options_raise():
    X, Y = data(4, (5,))
    fm = FunctionalModel(mlp())
    with pytest.raises(ValueError, match="fisher must be"):
        KFAC(fm, F.cross_entropy, (X, Y), fisher="empirical")
    with pytest.raises(ValueError, match="method must be"):
        Diagonal(fm, F.cross_entropy, (X, Y), method="bogus")
    with pytest.raises(ValueError, match="max_samples"):
        GGN(fm, F.cross_entropy, (X, Y), max_samples=0)
    with pytest.raises(TypeError):
        build_curvature("ggn", fm, F.cross_entropy, (X, Y), fisher="exact")


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_diagonal_from_a_factor_with_fewer_columns_than_outputs(monkeypatch, name):
    # fisher="mc" gives S_d with r = mc_samples < c columns: the diagonal is then made from
    # r per-sample backward passes (rows of S_d^T J_d) instead of the c-row Jacobian;
    # checked against (1/m) sum_d sum_r (S_d[:, r]^T J_d)^2 from dense per-sample Jacobians
    # with the same factor, and its cost is r gradients per sample
    import curvlab.curvature.diag as diag_module
    make, shape = PROBLEMS[name]
    model = make()
    X, Y = torch.randn(11, *shape, dtype=torch.float64), torch.randint(0, 3, (11,))
    g = torch.Generator().manual_seed(5)
    S = torch.randn(11, 3, 2, generator=g, dtype=torch.float64)
    seen = []

    def fixed(loss_fn, out, y, **kw):
        lo = sum(seen)
        seen.append(out.shape[0])
        return S[lo:lo + out.shape[0]]

    monkeypatch.setattr(diag_module, "output_hessian_sqrt", fixed)
    # chunks of 3 samples inside each batch of 4: S's slices past the first are used too
    monkeypatch.setattr(diag_module, "_JACOBIAN_BUDGET", 3 * 2 * FunctionalModel(model).numel)
    cost = Cost()
    d = Diagonal(FunctionalModel(model), F.cross_entropy, batches(X, Y), method="exact", fisher="mc",
                 mc_samples=2, cost=cost).diagonal
    fm = FunctionalModel(model)
    p0 = fm.spec.flatten(fm.params)
    J = vmap(jacrev(lambda p, x: fm(fm.spec.unflatten(p), x[None])[0].reshape(-1)), in_dims=(None, 0))(p0, X)
    want = torch.einsum("bcr,bcp->brp", S, J).square().sum(1).mean(0)
    assert torch.allclose(d, want.clamp_min(0), rtol=1e-10, atol=1e-12)
    assert cost.grad_samples == 2 * 11


def test_diagonal_mc_fisher_with_a_non_ce_loss_raises():
    X, Y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="fisher='mc'.*softmax cross-entropy"):
        Diagonal(FunctionalModel(mlp()), F.mse_loss, (X, Y), method="exact", fisher="mc")
