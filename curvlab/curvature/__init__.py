"""Curvature approximations of the loss Hessian, as linear operators on the flat parameter vector.

Each approximates the Hessian of the full-data mean loss ``f = (1/N) sum_d loss_d``
(normalised the same way) by a positive semi-definite matrix ``C`` that is cheap to
apply, invert (with damping) and whose top eigenvectors are cheap to get:

* ``"ggn"`` (:class:`GGN`): the generalised Gauss-Newton matrix ``J^T H_out J``, exact
  matrix-free products (one data pass per block); eigenpairs by Lanczos.
* ``"kfac"`` (:class:`KFAC`): Kronecker factors ``A (x) G`` per ``nn.Linear`` /
  ``nn.Conv2d`` layer plus the exact GGN diagonal for every other parameter;
  products, inverse and eigenpairs in closed form, no data pass after building.
* ``"diag"`` (:class:`Diagonal`): the GGN diagonal.

All share the interface of :class:`CurvatureApprox`: ``matvec(V)``,
``inverse(V, damping)``, ``top_eigenpairs(k)``, for ``V`` of shape ``(n,)`` or ``(k, n)``.
"""

from __future__ import annotations

from typing import Callable

from ..functional import FunctionalModel
from ..hvp import Cost
from .base import CurvatureApprox
from .diag import Diagonal, ggn_diagonal
from .ggn import GGN
from .kfac import KFAC, KFACBlock

__all__ = ["APPROXIMATIONS", "build_curvature", "CurvatureApprox", "GGN", "KFAC", "KFACBlock",
           "Diagonal", "ggn_diagonal"]

APPROXIMATIONS = ("diag", "ggn", "kfac")

_CLASSES = {"diag": Diagonal, "ggn": GGN, "kfac": KFAC}


def build_curvature(name: str, fmodel: FunctionalModel, loss_fn: Callable, batches, *,
                    max_samples: int | None = None, seed: int = 0, cost: Cost | None = None,
                    **options) -> CurvatureApprox:
    """Build the curvature approximation ``name`` of the full-data mean loss's Hessian.

    Args:
        name: one of :data:`APPROXIMATIONS`: ``"diag"``, ``"ggn"``, ``"kfac"``.
        fmodel: the model (in the mode wanted, normally eval).
        loss_fn: ``loss_fn(output, target) -> scalar`` batch-mean loss.
        batches: :class:`~curvlab.data.Batches` (or what :func:`~curvlab.data.as_batches` takes),
            or an operator's :class:`~curvlab.distributed.DataParallel` (``H.parallel``) or a
            :class:`~curvlab.loop.DataLoop`: in a torch.distributed job the build is then
            divided over the ranks (:func:`~curvlab.curvature.base.approximation_loop`), on the
            same samples as in one process.  Monte-Carlo Fisher labels (``fisher="mc"``) are
            then drawn per rank from the same seed, so they differ from one process's draws.
        max_samples: build from the first batches holding at least this many
            samples (an estimate of the full-data approximation); ``None``: all data.
        seed: seeds everything random (Lanczos starts, probes, sampled labels).
        cost: a :class:`~curvlab.hvp.Cost` the work is added to (``grad_samples``, ``seconds``).
        **options: passed to the class: :class:`GGN` (``method``, ``rank``, ``tol``,
            ``max_matvecs``), :class:`KFAC` (``fisher``, ``mc_samples``, ``diag_method``,
            ``probes``, ``conv``), :class:`Diagonal` (``method``, ``probes``, ``fisher``,
            ``mc_samples``).

    Raises:
        ValueError: ``name`` is not one of :data:`APPROXIMATIONS`.
        TypeError: an option the chosen class does not take.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown curvature approximation {name!r}: valid ones are {APPROXIMATIONS}")
    return _CLASSES[name](fmodel, loss_fn, batches, max_samples=max_samples, seed=seed, cost=cost,
                          **options)
