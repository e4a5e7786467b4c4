"""Shared tiny problems and dense references (float64 throughout)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from experiments import synthetic


D = torch.float64
# the tests are many tiny problems: one thread avoids spin-wait overhead (and a loaded CI box)
torch.set_num_threads(1)

def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_cnn_bn(seed=0):
    """Conv -> BatchNorm -> ReLU -> Linear, with non-trivial running statistics."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten(),
                      nn.Linear(3 * 4 * 4, 3)).double()
    m[1].running_mean.normal_(0, 0.3)
    m[1].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.normal_(0, 0.2)
    return m


def classification_data(n, shape, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=D)
    Y = torch.randint(0, classes, (n,), generator=g)
    return X, Y


# problems with a prescribed spectrum (shared with experiments/bench_traps.py)
Quadratic, mean_loss, quadratic_problem = synthetic.Quadratic, synthetic.mean_loss, synthetic.quadratic_problem


def dense_hessian(model, loss_fn, X, Y):
    """Dense Hessian of the mean loss over all of (X, Y), trainable params, model in eval mode."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    others = {**{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad},
              **dict(model.named_buffers())}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, {**p, **others}, (X,)), Y)

    return hessian(f)(flat0)


@pytest.fixture
def ce():
    return F.cross_entropy


def per_sample_curvature(model, per_sample_loss, X, Y, v):
    """``q_d = v^T H_d v`` for every sample ``d``, exactly (second derivative of each
    sample's loss along ``v``, by forward mode twice), model in eval mode.

    ``per_sample_loss(output, Y)`` returns the ``(N,)`` losses; ``v`` is flat, in the
    order of the trainable parameters.  ``q.mean()`` is the full-data Rayleigh
    quotient ``v^T H v`` (for unit ``v``); ``q.std()`` the per-sample spread that a
    holdout estimate's standard error comes from.
    """
    from torch.func import jvp

    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    others = {**{n: p.detach() for n, p in model.named_parameters() if not p.requires_grad},
              **dict(model.named_buffers())}
    chunks = torch.split(v.detach().to(D), [params[n].numel() for n in names])
    dirs = {n: c.view(params[n].shape) for n, c in zip(names, chunks)}
    one = torch.ones((), dtype=D)

    def f(t):
        p = {n: params[n] + t * dirs[n] for n in names}
        return per_sample_loss(functional_call(model, {**p, **others}, (X,)), Y)

    def df(t):
        return jvp(f, (t,), (one,))[1]

    return jvp(df, (torch.zeros((), dtype=D),), (one,))[1]
