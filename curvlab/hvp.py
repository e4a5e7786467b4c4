"""Hessian-vector products of a full-data mean loss, on ``torch.func``.

The operator is the Hessian of

    f(x) = (1/N) * sum_d loss(x, d) = sum_b (n_b / N) * L_b(x),

where ``L_b`` is ``loss_fn(model(x_b), y_b)``, the *mean* loss over batch ``b``
of ``n_b`` samples (the default ``reduction='mean'`` of torch's losses).  Each
product is one pass over the data, weighted by batch size so that a smaller
last batch counts right.  The Hessian is taken with the model in eval mode
(BatchNorm uses its running statistics, dropout is off): that is the loss the
network is evaluated on, and it is a sum of independent per-sample terms.

Two ways to apply ``H_b`` to a block ``V`` of ``k`` vectors are offered:

``"rev-rev"``
    one forward and one backward pass with ``create_graph=True`` give the
    gradient as a differentiable graph; each vector then costs one more
    backward pass through that *retained* graph (``k`` double-backward passes).
``"fwd-rev"``
    forward-over-reverse ``jvp(grad(L_b))``, ``vmap``-ed over the block: the
    primal work is done once and the tangents of all ``k`` vectors travel
    together through batched kernels.

``method="auto"`` picks ``"rev-rev"`` on CPU, where we measured it faster per
vector (``experiments/bench_hvp.py``, BENCHMARKS.md: vmap over tangents makes
convolution tangents run as a batch of small, poorly-vectorised convolutions),
and ``"fwd-rev"`` on CUDA, where one batched kernel over ``k`` tangents keeps the
device busy while ``k`` sequential backward passes each launch the full kernel
sequence (run the benchmark on your GPU to check; both give the same numbers).

Inside a ``torch.distributed`` job of several processes (``torchrun``) the
operator is data-parallel: each rank passes over its shard of the data and the
sums are all-reduced, so every rank gets the same full-data product
(:mod:`curvlab.distributed`; ``distributed=False`` opts out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .data import Batches, as_batches
from .distributed import DataParallel
from .functional import FunctionalModel, batch_size_of

__all__ = ["Cost", "HessianOperator", "METHODS"]

METHODS = ("auto", "rev-rev", "fwd-rev")


@dataclass
class Cost:
    """Work done so far (mutable counter; results carry a frozen copy).

    Attributes:
        hvps: Hessian-vector products, counted in full-data equivalents: a block
            of ``k`` vectors over ``m`` of ``N`` samples adds ``k * m / N``.
        samples: per-sample HVP evaluations (a block of ``k`` over ``m``
            samples adds ``k * m``).
        passes: data passes made for HVP blocks (a block counts once).
        grad_samples: per-sample gradient evaluations (statistics, gradients).
        seconds: wall time spent inside the operator.
    """

    hvps: float = 0.0
    samples: int = 0
    passes: int = 0
    grad_samples: int = 0
    seconds: float = 0.0

    def copy(self) -> "Cost":
        return Cost(self.hvps, self.samples, self.passes, self.grad_samples, self.seconds)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.hvps + other.hvps, self.samples + other.samples, self.passes + other.passes,
                    self.grad_samples + other.grad_samples, self.seconds + other.seconds)


def _check_scalar(loss: Tensor, index: int) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn returned {shape} on batch {index}, not a scalar: it must return the "
            "mean loss over the batch (e.g. reduction='mean', the default of torch losses)")


class HessianOperator:
    """The Hessian of the full-data mean loss as a linear operator on ``R^n``.

    Args:
        model: the network; only read (see :class:`~curvlab.functional.FunctionalModel`).
        loss_fn: ``loss_fn(output, target) -> scalar``, the batch *mean* loss.
        data: a DataLoader, an iterable of ``(x, y)`` batches or a tuple ``(X, Y)``
            (see :func:`curvlab.data.as_batches`).
        dtype, device: of the computation (default: the model's).
        batch_size: batch size used when ``data`` is ``(X, Y)``.
        method: ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"`` (module docstring).
        fmodel: an existing :class:`FunctionalModel` to share (then ``model``,
            ``dtype`` and ``device`` are taken from it).
        distributed: ``None`` (default): data-parallel over the ranks when
            ``torch.distributed`` is initialised with more than one process; pass
            the *full* data on every rank, curvlab shards it.  ``False``: this
            process alone, on the data it is given.  ``True``: require an
            initialised process group.  See :mod:`curvlab.distributed`.
        process_group: the group to reduce over (default: all processes).

    Distributed, every rank returns the same (all-reduced) results, and
    :attr:`cost` and :attr:`num_samples` count the work and samples of all
    ranks together.

    The model must already be in the mode the Hessian is wanted in (use
    :func:`curvlab.functional.evaluation_mode`); the operator never changes it.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> X, Y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> H = HessianOperator(model.eval(), torch.nn.functional.cross_entropy, (X, Y))
        >>> H.matvec(torch.randn(4, H.n)).shape
        torch.Size([4, 8])
    """

    def __init__(self, model: nn.Module | None, loss_fn: Callable, data, *,
                 dtype: torch.dtype | None = None, device=None, batch_size: int = 256,
                 method: str = "auto", fmodel: FunctionalModel | None = None,
                 distributed: bool | None = None, process_group=None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.fmodel = fmodel if fmodel is not None else FunctionalModel(model, dtype=dtype, device=device)
        self.loss_fn = loss_fn
        self.parallel = DataParallel(as_batches(data, batch_size), enabled=distributed,
                                     process_group=process_group, fmodel=self.fmodel)
        self.batches: Batches = self.parallel.batches
        self.num_samples = self.parallel.num_samples
        if method == "auto":
            method = "fwd-rev" if self.fmodel.device.type == "cuda" else "rev-rev"
        self.method = method
        self.cost = Cost()

    # -- shapes -------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.fmodel.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.fmodel.dtype

    @property
    def device(self) -> torch.device:
        return self.fmodel.device

    def __call__(self, V: Tensor) -> Tensor:
        return self.matvec(V)

    # -- the batch loss as a pure function ------------------------------------
    def batch_loss(self, params: Dict[str, Tensor], x, y, index: int = 0) -> Tensor:
        loss = self.loss_fn(self.fmodel(params, x), y)
        _check_scalar(loss, index)
        return loss

    def _batch_hvp_revrev(self, x, y, index: int, V: Tensor) -> Tensor:
        params = {k: p.detach().requires_grad_(True) for k, p in self.fmodel.params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(params, x, y, index)
            _check_finite_loss(loss, index)
            names = list(params)
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True,
                                        materialize_grads=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            spec = self.fmodel.spec
            out = torch.zeros_like(V)
            if not live:
                return out
            for j in range(V.shape[0]):
                v = spec.unflatten(V[j])
                hv = torch.autograd.grad([grads[i] for i in live], [params[k] for k in names],
                                         grad_outputs=[v[names[i]] for i in live],
                                         retain_graph=j < V.shape[0] - 1, materialize_grads=True)
                out[j] = torch.cat([h.reshape(-1) for h in hv])
        return out

    def _batch_hvp_fwdrev(self, x, y, index: int, V: Tensor) -> Tensor:
        spec = self.fmodel.spec
        params = self.fmodel.params

        def g(p):
            loss = self.batch_loss(p, x, y, index)
            return loss, loss

        grad_fn = grad(g, has_aux=True)

        def hv_one(v_flat):
            _, hv, loss = jvp(grad_fn, (params,), (spec.unflatten(v_flat),), has_aux=True)
            return spec.flatten(hv), loss

        if V.shape[0] == 1:
            hv, loss = hv_one(V[0])
            hv = hv[None]
        else:
            hv, loss = vmap(hv_one, out_dims=(0, None))(V)
        _check_finite_loss(loss, index)
        return hv

    # -- products over the full data ------------------------------------------
    def matvec(self, V: Tensor) -> Tensor:
        """``H @ v`` for ``V`` of shape ``(n,)``, or ``H V^T`` row-wise for ``(k, n)``.

        Cost: one pass over the data (``k`` HVPs, ``k * N`` per-sample products).
        """
        single = V.dim() == 1
        V = V[None] if single else V
        if V.dim() != 2 or V.shape[1] != self.n:
            raise ValueError(f"V must have shape (n,) or (k, n) with n={self.n}, got {tuple(V.shape)}")
        V = V.to(self.device, self.dtype)
        t0 = time.perf_counter()
        batch_hvp = self._batch_hvp_revrev if self.method == "rev-rev" else self._batch_hvp_fwdrev
        total = torch.zeros_like(V)

        def local_sum():  # sum_b n_b H_b V over this rank's batches
            for index, (x, y) in enumerate(self.parallel.local):
                x, y = self.fmodel.to_input(x), self.fmodel.to_target(y)
                nb = batch_size_of(x)
                if nb == 0:
                    continue
                hv = batch_hvp(x, y, index, V)
                if not torch.isfinite(hv).all():
                    raise ValueError(
                        f"Hessian-vector product is not finite on batch {index}: the loss is finite "
                        "there but its curvature overflows; check the model/inputs or use dtype=torch.float64")
                total.add_(hv, alpha=nb)

        self.parallel.sum_(local_sum, total)
        total.div_(self.num_samples)
        self.cost.hvps += V.shape[0]
        self.cost.samples += V.shape[0] * self.num_samples
        self.cost.passes += 1
        self.cost.seconds += time.perf_counter() - t0
        return total[0] if single else total

    def holdout_statistics(self, V: Tensor, group_size: int = 64):
        """Products ``H_g V`` over groups ``g`` of about ``group_size`` samples, as sums.

        Returns a :class:`curvlab.sampling.HoldoutAccumulator` for the ``k`` rows of
        ``V`` (unit vectors): the mean product ``H V`` over this operator's data and
        the groups' spread, from which the standard error of each Rayleigh quotient
        and a noise-free estimate of its residual follow (no per-sample backward
        passes: each group is one block HVP).  Batches are cut into groups when
        their inputs are tensors; other batches are one group each.

        Cost: the same as :meth:`matvec` on ``V`` (``k * N`` per-sample products).
        """
        from .sampling import HoldoutAccumulator

        single = V.dim() == 1
        V = (V[None] if single else V).to(self.device, self.dtype)
        if V.dim() != 2 or V.shape[1] != self.n:
            raise ValueError(f"V must have shape (n,) or (k, n) with n={self.n}, got {tuple(V.shape)}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        t0 = time.perf_counter()
        batch_hvp = self._batch_hvp_revrev if self.method == "rev-rev" else self._batch_hvp_fwdrev
        acc = HoldoutAccumulator(V)
        scalars = torch.zeros(3, dtype=torch.float64, device=self.device)

        def local_sum():
            for index, (x, y) in enumerate(self.parallel.local):
                x, y = self.fmodel.to_input(x), self.fmodel.to_target(y)
                nb = batch_size_of(x)
                if nb == 0:
                    continue
                cuts = range(0, nb, group_size) if isinstance(x, Tensor) and isinstance(y, Tensor) else [0]
                for start in cuts:
                    xs, ys = (x[start:start + group_size], y[start:start + group_size]) if len(cuts) > 1 else (x, y)
                    hv = batch_hvp(xs, ys, index, V)
                    if not torch.isfinite(hv).all():
                        raise ValueError(f"Hessian-vector product is not finite on batch {index}")
                    acc.add(hv, batch_size_of(xs))
            scalars.copy_(torch.tensor([acc.W1, acc.W2, acc.groups], dtype=torch.float64))

        self.parallel.sum_(local_sum, acc.P1, acc.P2, acc.S2, acc.Q1, acc.Q2, scalars)
        acc.W1, acc.W2, acc.groups = float(scalars[0]), float(scalars[1]), int(scalars[2])
        self.cost.hvps += V.shape[0]
        self.cost.samples += V.shape[0] * self.num_samples
        self.cost.passes += 1
        self.cost.seconds += time.perf_counter() - t0
        return acc

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Full-data mean loss and its gradient ``(n,)`` (one pass)."""
        t0 = time.perf_counter()
        total_grad = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_fn = grad(lambda p, x, y, i: (lambda l: (l, l))(self.batch_loss(p, x, y, i)), has_aux=True)

        def local_sum():
            for index, (x, y) in enumerate(self.parallel.local):
                x, y = self.fmodel.to_input(x), self.fmodel.to_target(y)
                nb = batch_size_of(x)
                g, loss = grad_fn(self.fmodel.params, x, y, index)
                _check_finite_loss(loss, index)
                total_grad.add_(self.fmodel.spec.flatten(g), alpha=nb)
                total_loss.add_(loss.detach().double() * nb)

        self.parallel.sum_(local_sum, total_grad, total_loss)
        count = self.num_samples
        self.cost.grad_samples += count
        self.cost.seconds += time.perf_counter() - t0
        return float(total_loss) / count, total_grad / count

    def per_sample_curvature(self, v: Tensor) -> Tensor:
        """Per-sample second directional derivatives ``v^T H_d v``, shape ``(N,)``.

        ``H_d`` is the Hessian of sample ``d``'s own loss, so that
        ``mean(per_sample_curvature(v)) == v @ H @ v``.  Computed by
        forward-over-forward differentiation of the vector of per-sample losses
        (``loss_fn`` applied to each sample as a batch of one) along ``v``: one
        batched forward pass with two tangent levels per batch, no backward pass.
        Their spread gives the sampling variance of a Rayleigh quotient.
        """
        v = v.to(self.device, self.dtype)
        if v.shape != (self.n,):
            raise ValueError(f"v must have shape ({self.n},), got {tuple(v.shape)}")
        t0 = time.perf_counter()
        vd = self.fmodel.spec.unflatten(v)

        def local_values():
            out = []
            for index, (x, y) in enumerate(self.parallel.local):
                x, y = self.fmodel.to_input(x), self.fmodel.to_target(y)

                def losses(p):
                    outputs = self.fmodel(p, x)
                    per = vmap(lambda o, t: self.loss_fn(o[None], t[None]))(outputs, y)
                    if per.dim() != 1:
                        _check_scalar(per[0], index)
                    return per

                def first(p):
                    return jvp(losses, (p,), (vd,))[1]

                d2 = jvp(first, (self.fmodel.params,), (vd,))[1]
                if not torch.isfinite(d2).all():
                    raise ValueError(f"per-sample curvature is not finite on batch {index}")
                out.append(d2.detach())
            return out

        d2 = self.parallel.gather(local_values, self.dtype)  # (N,), all ranks, global order
        self.cost.grad_samples += 2 * len(d2)  # two forward tangents ~ one backward each
        self.cost.seconds += time.perf_counter() - t0
        return d2


def _check_finite_loss(loss: Tensor, index: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(
            f"loss is not finite ({float(loss.detach()):g}) on batch {index}: check that batch's inputs "
            "and targets, and the model's parameters")
