"""Shared pieces of the curvature approximations.

Every approximation ``C`` stands for the Hessian of the full-data mean loss

    f(x) = (1/N) * sum_d loss(x, d),

so each is normalised like ``f``: a sum over samples divided by the number of
samples used (batch ``b`` of ``n_b`` samples enters with weight ``n_b / m``,
``m`` the samples used, so a smaller last batch counts right).

This module holds what all of them need:

* :class:`CurvatureApprox`, the base class with the operator interface
  (``matvec``, ``top_eigenpairs``, ``inverse``) and its input checks;
* :func:`sample_batches`, the data pass that honours ``max_samples``;
* :func:`data_loop`, the :class:`~curvlab.loop.DataLoop` (casting, checks, cost)
  over the batches an approximation keeps, for its passes over them;
* :func:`output_hessian_sqrt`, a factor ``S_d`` with ``S_d S_d^T`` the Hessian of
  one sample's loss with respect to the network's output, exact (any per-sample
  loss) or Monte-Carlo (softmax cross-entropy);
* the layer probes that K-FAC and the diagonal share live in
  :mod:`curvlab.curvature.probes`.
"""

from __future__ import annotations

import math
import operator
import time
from typing import Callable, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import hessian, vmap
from torch.utils._pytree import tree_map

from ..data import Batches, as_batches
from ..functional import FunctionalModel, batch_size_of
from ..distributed import DataParallel
from ..hvp import Cost
from ..loop import DataLoop, OnParameters, cast_batches, check_scalar

__all__ = ["CurvatureApprox", "sample_batches", "collect_batches", "data_loop", "approximation_loop",
           "output_hessian_sqrt",
           "per_sample_losses", "check_damping", "unsqueeze_input"]


class CurvatureApprox(OnParameters):
    """A symmetric positive semi-definite ``n x n`` approximation ``C`` of the Hessian.

    Subclasses set :attr:`fmodel` and implement :meth:`_matvec`, :meth:`_top_eigenpairs`
    and :meth:`_inverse` on blocks ``(k, n)`` already checked and cast to the
    model's dtype and device.

    Attributes:
        fmodel: the :class:`~curvlab.functional.FunctionalModel` the approximation was built for.
        n: number of trainable parameters (``fmodel.numel``).
        num_samples: samples ``m`` the approximation was built from.
        cost: a :class:`~curvlab.hvp.Cost` counting the data work done (building,
            and later data passes such as GGN products); the caller's, if given.
    """

    name = "base"
    fmodel: FunctionalModel
    num_samples: int
    cost: Cost

    def __call__(self, V: Tensor) -> Tensor:
        return self.matvec(V)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, num_samples={self.num_samples})"

    # -- public operator interface --------------------------------------------
    def matvec(self, V: Tensor) -> Tensor:
        """``C v`` for ``V`` of shape ``(n,)``; row-wise ``(C V^T)^T`` for ``(k, n)``."""
        V, single = self._block(V)
        out = self._matvec(V)
        return out[0] if single else out

    def inverse(self, V: Tensor, damping: float) -> Tensor:
        """``(C + damping * I)^{-1} v`` for ``V`` of shape ``(n,)`` or ``(k, n)`` (row-wise).

        Raises:
            ValueError: ``damping`` is not a finite number ``> 0``.
        """
        damping = check_damping(damping)
        V, single = self._block(V)
        out = self._inverse(V, damping)
        return out[0] if single else out

    def top_eigenpairs(self, k: int) -> Tuple[Tensor, Tensor]:
        """The ``k`` largest eigenvalues of ``C`` and orthonormal eigenvectors.

        Returns:
            ``(values, vectors)``: ``values`` ``(k,)`` float64 on the CPU, descending;
            ``vectors`` ``(k, n)`` with orthonormal rows, in the model's dtype and device.

        Raises:
            ValueError: ``k`` is not an int in ``[1, n]``.
        """
        try:
            k_int = operator.index(k) if not isinstance(k, bool) else None
        except TypeError:
            k_int = None
        if k_int is None or not 1 <= k_int <= self.n:
            raise ValueError(f"k must be an int in [1, n={self.n}], got {k!r}")
        values, vectors = self._top_eigenpairs(k_int)
        return values, vectors

    # -- to implement ---------------------------------------------------------
    def _matvec(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _inverse(self, V: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def _top_eigenpairs(self, k: int) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------
    def _block(self, V: Tensor) -> Tuple[Tensor, bool]:
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}")
        single = V.dim() == 1
        V = V[None] if single else V
        if V.dim() != 2 or V.shape[1] != self.n:
            raise ValueError(f"V must have shape (n,) or (k, n) with n={self.n}, got {tuple(V.shape)}")
        return V.to(self.device, self.dtype), single


def check_damping(damping) -> float:
    """``damping`` as a float, or a ``ValueError`` unless it is finite and ``> 0``."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
            or damping <= 0:
        raise ValueError(
            f"damping must be a finite number > 0, got {damping!r}: (C + damping*I) must be "
            "invertible, and C is only positive semi-definite")
    return float(damping)


def check_max_samples(max_samples) -> int | None:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    return max_samples


def sample_batches(fmodel: FunctionalModel, batches, max_samples: int | None
                   ) -> Iterator[Tuple[int, object, object, int]]:
    """One pass over ``batches``: ``(index, x, y, n_b)`` with ``x, y`` on the model's device/dtype.

    Stops after the batch that brings the count to ``max_samples`` or more
    (whole batches: at least ``max_samples`` samples are used, at most one
    batch more).  Empty batches are skipped.
    """
    count = 0
    for index, x, y, nb in cast_batches(fmodel, batches):
        yield index, x, y, nb
        count += nb
        if max_samples is not None and count >= max_samples:
            return


def approximation_loop(fmodel: FunctionalModel, loss_fn: Callable, data, max_samples: int | None,
                       cost: Cost) -> DataLoop:
    """The :class:`~curvlab.loop.DataLoop` an approximation reads, booking on ``cost``.

    ``data`` is either what :func:`collect_batches` takes (one process), or a
    :class:`~curvlab.distributed.DataParallel` (an operator's ``parallel``, as
    :func:`curvlab.extremes` passes it) or a :class:`~curvlab.loop.DataLoop`:
    then, in a torch.distributed job, the approximation is built data-parallel:
    each rank computes over its share of the samples used and the sums are
    reduced over the ranks.  Either way the samples used are the same: all of
    them, or with ``max_samples`` the first whole batches holding at least that
    many (read on every rank, kept in memory so every later pass sees the same
    ones, and split round-robin by batch over the ranks).
    """
    max_samples = check_max_samples(max_samples)
    if isinstance(data, DataLoop):
        data = data.parallel
    if isinstance(data, DataParallel):
        if max_samples is not None and max_samples < data.num_samples:
            if not data.enabled:  # one process: the first batches, as for any data
                return approximation_loop(fmodel, loss_fn, data.batches, max_samples, cost)
            source = data.batches
            data = data.derive(lambda: as_batches(collect_batches(fmodel, source, max_samples)[0],
                                                  check_data=False))
        return DataLoop(fmodel, loss_fn, data, cost)
    kept, _ = collect_batches(fmodel, data, max_samples)
    return data_loop(fmodel, loss_fn, kept, cost)


def absorb(cost: Cost, scratch: Cost) -> None:
    """Add ``scratch``'s counts (not its seconds: the build is timed as a whole) to ``cost``."""
    seconds = cost.seconds
    cost.__dict__.update((cost + scratch).__dict__, seconds=seconds)


def data_loop(fmodel: FunctionalModel, loss_fn: Callable, data, cost: Cost | None = None) -> DataLoop:
    """A one-process :class:`~curvlab.loop.DataLoop` over ``data`` (what :func:`collect_batches` returns)."""
    # the kept batches are in memory and fixed: no determinism fingerprint on every pass
    batches = data if isinstance(data, Batches) else as_batches(data, check_data=False)
    return DataLoop(fmodel, loss_fn, DataParallel(batches, enabled=False, fmodel=fmodel), cost)


def collect_batches(fmodel: FunctionalModel, data, max_samples: int | None
                    ) -> Tuple[Batches | List[Tuple[object, object]], int]:
    """The data an approximation reads, and its sample count ``m``.

    With ``max_samples`` the batches taken are kept in memory (at most
    ``max_samples`` plus one batch), so that every later pass (GGN products)
    sees the *same* samples, also from a shuffling DataLoader.  Without it the
    :class:`~curvlab.data.Batches` are re-iterated (every pass sums over all
    of them, so their order does not matter).

    Raises:
        ValueError: the data yields no samples.
    """
    max_samples = check_max_samples(max_samples)
    batches = as_batches(data)
    if max_samples is None:
        m = batches.num_samples
        if m == 0:
            raise ValueError("data is empty: it yielded no samples; pass at least one (x, y) batch")
        return batches, m
    kept = [(x, y) for _, x, y, _ in sample_batches(fmodel, batches, max_samples)]
    m = sum(batch_size_of(x) for x, _ in kept)
    if m == 0:
        raise ValueError("data is empty: it yielded no samples; pass at least one (x, y) batch")
    return kept, m


def unsqueeze_input(x):
    """A single sample's input (no batch dim) as a batch of one (tensors, tuples, dicts)."""
    return tree_map(lambda t: t[None] if isinstance(t, Tensor) else t, x)


def per_sample_losses(loss_fn: Callable, out: Tensor, y) -> Tensor:
    """``loss_fn`` applied to each sample as a batch of one: shape ``(b,)``."""
    def one(o, t):
        return loss_fn(o[None], unsqueeze_input(t))
    return vmap(one)(out, y)


def check_mean_of_per_sample(loss_fn: Callable, out: Tensor, y, index: int) -> None:
    """Raise unless ``loss_fn(out, y)`` is the mean of its per-sample values.

    The per-sample output Hessians used by K-FAC and the exact diagonal are
    those of ``loss_fn`` on a batch of one; they add up to the batch loss's
    Hessian only if the batch loss is the mean of those per-sample losses
    (``reduction='mean'`` of a per-sample loss such as cross-entropy or MSE).
    """
    batch = loss_fn(out, y)
    check_scalar(batch, index)
    per = per_sample_losses(loss_fn, out, y)
    if per.dim() != 1:
        raise ValueError("loss_fn on a batch of one sample did not return a scalar")
    scale = max(1.0, float(batch.abs()), float(per.abs().mean()))
    if abs(float(batch) - float(per.mean())) > math.sqrt(torch.finfo(out.dtype).eps) * scale:
        raise ValueError(
            f"loss_fn(output, target) = {float(batch):.6g} on batch {index} is not the mean of the "
            f"per-sample losses ({float(per.mean()):.6g}): K-FAC and the exact diagonal need a batch-mean "
            "loss of independent samples (reduction='mean'); use the GGN, which needs no such structure")


def output_hessian_sqrt(loss_fn: Callable, out: Tensor, y, *, fisher: str = "exact",
                        mc_samples: int = 1, generator: torch.Generator | None = None,
                        index: int = 0) -> Tensor:
    """Per-sample square roots ``S_d`` of the loss Hessian w.r.t. the network output.

    Args:
        loss_fn: batch-mean loss.
        out: network output ``(b, *out_shape)`` (detached); ``c = prod(out_shape)``.
        y: targets of the batch.
        fisher: ``"exact"``: ``S_d S_d^T = H_d``, the Hessian of sample ``d``'s loss
            w.r.t. its output, by ``eigh`` of ``H_d`` with negative eigenvalues
            (non-convex losses, rounding) clamped to zero; ``c`` columns.  For
            softmax cross-entropy ``H_d = diag(p) - p p^T``, the Fisher of the
            model's predictive distribution.  ``"mc"``: softmax cross-entropy
            only; column ``s`` is ``(p_d - onehot(yhat_s)) / sqrt(mc_samples)``
            with ``yhat_s ~ Categorical(p_d)``, so ``E[S_d S_d^T] = H_d``.
        mc_samples: labels drawn per sample for ``fisher="mc"``.
        generator: CPU generator for the draws.

    Returns:
        ``S`` of shape ``(b, c, r)`` (``r = c`` or ``mc_samples``), such that the
        output Hessian of the *batch-mean* loss is ``(1/b) blockdiag_d(S_d S_d^T)``.

    Cost: ``b`` per-sample Hessians of the loss w.r.t. ``c`` outputs and ``b``
    ``c x c`` eigendecompositions (negligible next to a network pass for ``c`` up
    to a few hundred).
    """
    b = out.shape[0]
    flat = out.reshape(b, -1)
    c = flat.shape[1]
    if fisher == "mc":
        check_cross_entropy(loss_fn, out, y, index)
        p = torch.softmax(flat, dim=1)
        draws = torch.multinomial(p.detach().double().cpu(), mc_samples, replacement=True,
                                  generator=generator).to(out.device)  # (b, mc)
        onehot = F.one_hot(draws, c).to(out.dtype).transpose(1, 2)    # (b, c, mc)
        return (p[:, :, None] - onehot) / math.sqrt(mc_samples)
    if fisher != "exact":
        raise ValueError(f"fisher must be 'exact' or 'mc', got {fisher!r}")
    check_mean_of_per_sample(loss_fn, out, y, index)

    def one(o, t):
        return loss_fn(o.view(out.shape[1:])[None], unsqueeze_input(t))

    H = vmap(hessian(one))(flat, y)                                   # (b, c, c)
    H = (H + H.transpose(1, 2)) / 2
    lam, Q = torch.linalg.eigh(H)
    return Q * lam.clamp_min(0).sqrt()[:, None, :]


class MonteCarloFisherUnsupported(ValueError):
    """``fisher="mc"`` was asked for a loss that is not softmax cross-entropy with class-index
    targets (:func:`check_cross_entropy`); ``fisher="exact"`` works for any per-sample loss."""


def check_cross_entropy(loss_fn: Callable, out: Tensor, y, index: int = 0) -> None:
    """Raise :class:`MonteCarloFisherUnsupported` unless ``loss_fn`` is softmax cross-entropy
    with class-index targets.

    Checked by value on the batch: the targets must be class indices in ``[0, c)`` (or
    cross-entropy's ``ignore_index``, -100) and ``loss_fn(out, y)`` must equal
    ``F.cross_entropy(out, y)`` (so wrappers of it pass; weights, label smoothing or
    other losses do not).
    """
    what = ("fisher='mc' samples labels from the model's softmax and supports only softmax "
            "cross-entropy (F.cross_entropy / nn.CrossEntropyLoss without class weights or label "
            "smoothing); use fisher='exact', which works for any per-sample loss")
    if out.dim() != 2 or not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point():
        raise MonteCarloFisherUnsupported(f"{what}; got outputs of shape {tuple(out.shape)} and "
                                          "targets that are not class indices")
    valid = ((y >= 0) & (y < out.shape[1])) | (y == -100)
    if not bool(valid.all()):
        raise MonteCarloFisherUnsupported(f"{what}; batch {index} has targets outside the "
                                          f"{out.shape[1]} classes of the output")
    ref = F.cross_entropy(out, y)
    val = loss_fn(out, y)
    tol = math.sqrt(torch.finfo(out.dtype).eps) * max(1.0, float(ref.abs()))
    if not isinstance(val, Tensor) or val.dim() != 0 or abs(float(val) - float(ref)) > tol:
        raise MonteCarloFisherUnsupported(f"{what}; loss_fn differs from F.cross_entropy on batch {index}")


class Timer:
    """Adds wall time to a :class:`Cost` on exit."""

    def __init__(self, cost: Cost):
        self.cost = cost

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cost.seconds += time.perf_counter() - self.t0
        return False


# -- layer probes: output gradients and per-sample parameter gradients of modules -----------
