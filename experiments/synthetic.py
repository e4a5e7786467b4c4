"""Problems whose Hessian has a prescribed spectrum (the tests' traps and their benchmark).

:class:`Quadratic` outputs ``0.5 * w^T S_d w`` per sample; with :func:`mean_loss` the loss's
Hessian is ``mean_d S_d`` exactly, so a test or benchmark chooses every eigenvalue.
"""
import torch
from torch import nn

D = torch.float64

# spectra built to trap a solver at the bottom (tests/test_traps.py, experiments/bench_traps.py):
# outliers, a bulk, and a bottom that a loose stopping rule passes at an interior Ritz value
TRAP_SPECTRA = {
    # a bottom pair -1.0, -0.93 under a bulk from -0.8 (7 % apart)
    "cluster": torch.cat([torch.tensor([50.0, 20.0]), torch.linspace(-0.8, 0.5, 150),
                          torch.tensor([-0.93, -1.0])]),
    # one eigenvalue -1.0 well below a bulk from -0.3
    "deep": torch.cat([torch.tensor([50.0, 20.0]), torch.linspace(-0.3, 0.5, 150), torch.tensor([-1.0])]),
    # a geometric tail -2.0 ... -0.5 under a bulk from -0.5
    "tail": torch.cat([torch.tensor([100.0, 30.0, 10.0]), torch.linspace(-0.5, 1.0, 100),
                       -torch.logspace(-0.3, 0.3, 6)]),
    # a bottom at -0.05 against lambda_max 100: zero at the scale of a floor
    "near zero": torch.cat([torch.tensor([100.0, 40.0]), torch.linspace(-0.05, 0.5, 150)]),
}


class Quadratic(nn.Module):
    """``output_d = 0.5 * w^T S_d w``: with a mean loss the Hessian is ``mean_d S_d``.

    Lets a test prescribe the Hessian's spectrum exactly.
    """

    def __init__(self, n, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=D))

    def forward(self, S):
        return 0.5 * torch.einsum("i,bij,j->b", self.w, S, self.w)


def mean_loss(out, y):
    return out.mean()


def quadratic_problem(eigenvalues, samples=20, seed=0):
    """Per-sample symmetric ``S_d`` with ``mean_d S_d = Q diag(eigenvalues) Q^T``."""
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64)
    n = len(ev)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    H = (Q * ev) @ Q.T
    noise = torch.randn(samples, n, n, generator=g, dtype=D)
    noise = noise + noise.transpose(1, 2)
    noise = noise - noise.mean(0)  # sample noise that averages out exactly
    S = H + noise
    return Quadratic(n, seed), (S, torch.zeros(samples, dtype=D)), H
