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

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .data import Batches, as_batches
from .distributed import DataParallel
from .functional import FunctionalModel
from .loop import Cost, DataLoop, check_finite, check_finite_loss, check_scalar, output_hessian

__all__ = ["Cost", "HessianOperator", "METHODS"]

METHODS = ("auto", "rev-rev", "fwd-rev")


class HessianOperator(DataLoop):
    """The Hessian of the full-data mean loss as a linear operator on ``R^n``.

    Args:
        model: the network; only read (see :class:`~curvlab.functional.FunctionalModel`).
        loss_fn: ``loss_fn(output, target) -> scalar``, the batch *mean* loss.
        data: a DataLoader, an iterable of ``(x, y)`` batches or a tuple ``(X, Y)``
            (see :func:`curvlab.data.as_batches`).
        dtype, device: of the computation (default: the model's; float32 for a
            half-precision model).
        batch_size: batch size used when ``data`` is ``(X, Y)``.
        method: ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"`` (module docstring).
        fmodel: an existing :class:`FunctionalModel` to share (then ``model``,
            ``dtype``, ``device`` and ``output_fn`` are taken from it).
        output_fn: applied to the model's output before ``loss_fn``, e.g.
            ``lambda out: out[0]`` (see :class:`~curvlab.functional.FunctionalModel`).
        input_key, target_key: the entries of each batch that are the model's
            input and the loss's target, e.g. ``input_key="pixel_values",
            target_key="labels"`` for dict batches (see :mod:`curvlab.data`).
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

    Checked at construction, on the first non-empty batch, once per
    :class:`FunctionalModel` and loss (operators sharing ``fmodel``, such as
    the subsample operators of one :func:`curvlab.extremes` call, check once):
    that ``loss_fn`` is a batch *mean*, by comparing its value on the batch
    with the size-weighted mean of its values on the batch's two halves
    (skipped for a batch of one sample or inputs that are not tensors); and
    that the model and loss run on the batch at all (an exception from either,
    on any batch, is re-raised as ``ValueError``/``TypeError`` naming the batch,
    the shapes and dtypes, and the likely fix, when it is one of the errors
    torch and Python raise for wrong shapes, dtypes and types: ``TypeError``,
    ``ValueError``, ``RuntimeError`` (not out-of-memory), ``IndexError``,
    ``KeyError``, ``AttributeError``; other exceptions propagate unchanged).  Costs three forward passes of
    one batch (:attr:`Cost.forward_samples`).

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
                 distributed: bool | None = None, process_group=None,
                 output_fn: Callable | None = None, input_key=None, target_key=None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, loss_fn(output, target) -> scalar batch mean "
                            f"(e.g. torch.nn.functional.cross_entropy), got {type(loss_fn).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fmodel is not None and output_fn is not None:
            raise ValueError("pass output_fn to the FunctionalModel when you pass fmodel")
        fmodel = fmodel if fmodel is not None else FunctionalModel(
            model, dtype=dtype, device=device, output_fn=output_fn)
        batches = as_batches(data, batch_size, input_key=input_key, target_key=target_key)
        counted = _counting_passes(batches)
        parallel = DataParallel(batches, enabled=distributed, process_group=process_group, fmodel=fmodel)
        local = parallel.local
        super().__init__(fmodel, loss_fn, parallel, Cost(
            load_passes=getattr(local, "counting_passes", 0) - counted.get(id(local), 0)))
        self.batches: Batches = parallel.batches
        if method == "auto":
            method = "fwd-rev" if self.fmodel.device.type == "cuda" else "rev-rev"
        self.method = method
        self.check_mean_loss()

    def __call__(self, V: Tensor) -> Tensor:
        return self.matvec(V)

    def subset(self, index: Tensor) -> "HessianOperator":
        """The Hessian of the mean loss over the samples at ``index`` (positions in :attr:`batches`).

        Shares the model view, the loss and the product method, and keeps this
        operator's split over the ranks (:meth:`DataParallel.subset`): nothing
        is checked again.  Its :attr:`cost` is its own.
        """
        op = object.__new__(HessianOperator)
        DataLoop.__init__(op, self.fmodel, self.loss_fn, self.parallel.subset(index))
        op.batches, op.method = op.parallel.batches, self.method
        return op

    # -- one batch's product ----------------------------------------------------
    def _batch_hvp(self, x, y, index: int, V: Tensor) -> Tensor:
        """``H_b V^T`` row-wise for the batch ``(x, y)``, by :attr:`method`; checked finite."""
        hv = (self._batch_hvp_revrev if self.method == "rev-rev" else self._batch_hvp_fwdrev)(x, y, index, V)
        return check_finite(hv, index, "Hessian-vector product",
                            ": the loss is finite there but its curvature overflows; check the "
                            "model/inputs or use dtype=torch.float64")

    def _batch_hvp_revrev(self, x, y, index: int, V: Tensor) -> Tensor:
        params = {k: p.detach().requires_grad_(True) for k, p in self.fmodel.params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(params, x, y, index)
            check_finite_loss(loss, index)
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
        check_finite_loss(loss, index)
        return hv

    def _block(self, V: Tensor) -> tuple[Tensor, bool]:
        """``V`` as a ``(k, n)`` block in the operator's dtype/device, and whether it was ``(n,)``."""
        single = V.dim() == 1
        V = V[None] if single else V
        if V.dim() != 2 or V.shape[1] != self.n:
            raise ValueError(f"V must have shape (n,) or (k, n) with n={self.n}, got {tuple(V.shape)}")
        return V.to(self.device, self.dtype), single

    # -- passes over the full data -----------------------------------------------
    def matvec(self, V: Tensor) -> Tensor:
        """``H @ v`` for ``V`` of shape ``(n,)``, or ``H V^T`` row-wise for ``(k, n)``.

        Cost: one pass over the data (``k`` HVPs, ``k * N`` per-sample products).
        """
        V, single = self._block(V)
        total = torch.zeros_like(V)

        def local_sum():  # sum_b n_b H_b V over this rank's batches
            for index, x, y, nb in self.local_batches():
                total.add_(self._batch_hvp(x, y, index, V), alpha=nb)

        k = V.shape[0]
        self.reduce_(local_sum, total, hvps=k, samples=k * self.num_samples, passes=1)
        total.div_(self.num_samples)
        return total[0] if single else total

    def holdout_statistics(self, V: Tensor, group_size: int = 64, gauss_newton: Tensor | None = None,
                           blocks: int = 16, cross: bool = False):
        """Products ``H_g V`` over groups ``g`` of about ``group_size`` samples, as sums.

        Returns a :class:`curvlab.sampling.HoldoutAccumulator` for the ``k`` rows of
        ``V`` (unit vectors): the mean product ``H V`` over this operator's data and
        the groups' spread, from which the standard error of each Rayleigh quotient
        and an upper confidence bound on its residual follow (no per-sample backward
        passes: each group is one block HVP).  Batches are cut into groups when
        their inputs are tensors; other batches are one group each.

        ``gauss_newton``: a ``(k,)`` bool mask of the rows whose groups also get their
        Gauss-Newton quadratic forms ``v^T G_g v`` (:meth:`gauss_newton_forms`), the
        control variate of :func:`curvlab.sampling.holdout_estimate`.

        ``blocks``: the groups are dealt into at most this many blocks (fewer when there are
        fewer groups), whose spread bounds the residual
        (:func:`curvlab.sampling.residual_margin`); each costs one copy of ``V``.

        ``cross``: also keep the groups' forms between rows, ``V H_g V^T`` (``k^4`` numbers;
        :meth:`curvlab.sampling.HoldoutAccumulator.span_moments`).

        Cost: the same as :meth:`matvec` on ``V`` (``k * N`` per-sample products), plus
        one forward-mode pass per masked row (``grad_samples``).
        """
        from .sampling import HoldoutAccumulator

        V, _ = self._block(V)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        k = V.shape[0]
        mask = (torch.zeros(k, dtype=torch.bool) if gauss_newton is None
                else torch.as_tensor(gauss_newton, dtype=torch.bool).cpu())
        if mask.shape != (k,):
            raise ValueError(f"gauss_newton must be a ({k},) bool mask, got shape {tuple(mask.shape)}")
        rows = mask.nonzero().flatten().tolist()
        expected = -(-self.num_samples // group_size)  # groups, if batches can be cut
        # (fewer blocks than groups are useless; a bad ``blocks`` reaches the accumulator's check)
        acc = HoldoutAccumulator(V, blocks=min(blocks, max(2, expected)), cross=cross)
        scalars = torch.zeros(5, dtype=torch.float64, device=self.device)  # W1, W2, groups, forms, failed
        state = dict(forms=0, failed=0)

        def local_sum():
            for index, x, y, nb in self.local_batches(group_size):
                products = self._batch_hvp(x, y, index, V)  # first: its errors explain bad inputs
                forms = None
                if rows and not state["failed"]:
                    try:
                        forms = torch.full((k,), math.nan, dtype=torch.float64, device=self.device)
                        forms[rows] = self._batch_forms(x, y, index, V[rows])
                        state["forms"] += len(rows) * nb
                    except (RuntimeError, NotImplementedError) as exc:
                        # the products ran, so the model is fine: forward mode is what failed
                        # (an operation without a forward-mode rule); go on without the variate
                        warnings.warn(f"Gauss-Newton forms unavailable ({exc}); the holdout goes on "
                                      "without its control variate", RuntimeWarning, stacklevel=4)
                        state["failed"], forms = 1, None
                acc.add(products, nb, forms)
            scalars.copy_(torch.tensor([acc.W1, acc.W2, acc.groups, state["forms"], state["failed"]],
                                       dtype=torch.float64))

        sums = [getattr(acc, name) for name in acc._SUMS] + [acc.block_sums, acc.block_weights]
        self.reduce_(local_sum, *sums, scalars, hvps=k, samples=k * self.num_samples, passes=1)
        acc.W1, acc.W2, acc.groups = float(scalars[0]), float(scalars[1]), int(scalars[2])
        self.cost.grad_samples += int(scalars[3])
        acc.has_forms = mask.to(acc.has_forms.device) & (float(scalars[4]) == 0)
        return acc

    # -- the Gauss-Newton part of the quadratic form --------------------------------
    def _batch_forms(self, x, y, index: int, V: Tensor) -> Tensor:
        """``(k,)`` batch means of ``v^T G_d v = (J_d v)^T (d^2 loss_d / d out^2) (J_d v)``.

        One forward-mode pass (``J v``) per vector; the loss Hessian in the outputs is
        applied by differentiating the output gradient of ``loss_fn`` (no network in it).
        """
        spec, params = self.fmodel.spec, self.fmodel.params

        def f(p):
            return self.fmodel(p, x)

        out_forms = torch.empty(V.shape[0], dtype=torch.float64, device=self.device)
        hvp_out = None
        for j in range(V.shape[0]):
            out, Jv = jvp(f, (params,), (spec.unflatten(V[j]),))
            if hvp_out is None:
                hvp_out = output_hessian(self.loss_fn, out, y, index)
            (HJv,) = hvp_out(Jv)
            out_forms[j] = (HJv * Jv).sum().double()
        return check_finite(out_forms, index, "Gauss-Newton quadratic form")

    def gauss_newton_forms(self, V: Tensor) -> Tensor:
        """``(k,)`` full-data means of the Gauss-Newton quadratic forms ``v^T G v``.

        ``G`` is the generalised Gauss-Newton part of the Hessian
        (:class:`curvlab.curvature.GGN`); ``v^T G v`` over this operator's data is
        exact and costs one forward-mode pass per vector, about one gradient, against
        about three for the quadratic form ``v^T H v`` (an HVP).  It is the population
        mean that makes the holdout's control variate unbiased
        (:func:`curvlab.sampling.holdout_estimate`).
        """
        V, _ = self._block(V)
        total = torch.zeros(V.shape[0], dtype=torch.float64, device=self.device)

        def local_sum():
            for index, x, y, nb in self.local_batches():
                total.add_(self._batch_forms(x, y, index, V), alpha=nb)

        self.reduce_(local_sum, total, grad_samples=V.shape[0] * self.num_samples)
        return total / self.num_samples

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Full-data mean loss and its gradient ``(n,)`` (one pass)."""
        total_grad = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_fn = grad(lambda p, x, y, i: (lambda l: (l, l))(self.batch_loss(p, x, y, i)), has_aux=True)

        def local_sum():
            for index, x, y, nb in self.local_batches():
                g, loss = grad_fn(self.fmodel.params, x, y, index)
                check_finite_loss(loss, index)
                total_grad.add_(self.fmodel.spec.flatten(g), alpha=nb)
                total_loss.add_(loss.detach().double() * nb)

        self.reduce_(local_sum, total_grad, total_loss, grad_samples=self.num_samples)
        return float(total_loss) / self.num_samples, total_grad / self.num_samples

    def per_sample_losses(self) -> Tensor:
        """Per-sample losses ``loss_fn`` of each sample as a batch of one, shape ``(N,)``.

        One forward pass over the data, no derivatives: the proxy by which
        :mod:`curvlab.strata` stratifies the samples (a confidently fit sample
        carries almost no curvature).  Targets may be nested (tuples, dicts); values
        are returned as the loss gives them (``nan`` for a sample whose targets are
        all ignored, say).  Booked as a third of a gradient per sample
        (``grad_samples``; a forward pass is about a third of a gradient's FLOPs).
        """
        from .curvature.base import per_sample_losses

        def losses(x, y, index):
            with torch.no_grad():
                per = per_sample_losses(self.loss_fn, self.fmodel(self.fmodel.params, x), y)
            if per.dim() != 1:
                check_scalar(per[0], index)
            return per.detach()

        def local_values():
            return [losses(x, y, index) if nb else torch.zeros(0, dtype=self.dtype, device=self.device)
                    for index, x, y, nb in self.local_batches(keep_empty=True)]

        return self.gather(local_values, grad_samples=self.num_samples // 3)

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
        vd = self.fmodel.spec.unflatten(v)

        def curvatures(x, y, index):
            def losses(p):
                outputs = self.fmodel(p, x)
                per = vmap(lambda o, t: self.loss_fn(o[None], t[None]))(outputs, y)
                if per.dim() != 1:
                    check_scalar(per[0], index)
                return per

            d2 = jvp(lambda p: jvp(losses, (p,), (vd,))[1], (self.fmodel.params,), (vd,))[1]
            return check_finite(d2, index, "per-sample curvature").detach()

        def local_values():  # one entry per batch (the global order follows them)
            return [curvatures(x, y, index) if nb else v.new_zeros(0)
                    for index, x, y, nb in self.local_batches(keep_empty=True)]

        # two forward tangents ~ one backward each
        return self.gather(local_values, grad_samples=2 * self.num_samples)

    # -- interop ----------------------------------------------------------------
    def to_scipy(self):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (see :func:`to_scipy`).

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> H = HessianOperator(model.eval(), torch.nn.functional.cross_entropy, (X, Y))
            >>> lam = eigsh(H.to_scipy(), k=1, which="LA", return_eigenvectors=False)
        """
        return to_scipy(self)


def _counting_passes(batches) -> dict:
    """``{id: counting_passes}`` of ``batches`` and the shard it may hold."""
    return {id(b): b.counting_passes for b in (batches, getattr(batches, "part", None))
            if isinstance(b, Batches)}


def to_scipy(operator):
    """A curvlab operator as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(n, n)``.

    ``operator`` is anything with curvlab's operator interface: ``n``, ``dtype``
    (``torch.float32`` or ``torch.float64``) and ``matvec`` on blocks ``(k, n)``,
    such as :class:`HessianOperator` or a curvature approximation
    (:mod:`curvlab.curvature`).  The result takes and returns numpy arrays on
    the CPU, of dtype ``float32`` or ``float64`` as the operator's; each
    ``matvec`` is one ``operator.matvec`` (for a :class:`HessianOperator`, one
    pass over the data), and ``matmat`` on ``(n, k)`` multiplies all ``k``
    columns in one call (one pass).  The operator is symmetric, so ``rmatvec``
    and ``rmatmat`` are the same products.  Inputs are copied to the
    operator's device and dtype and results back to CPU numpy, so scipy's
    solvers (``eigsh``, ``lobpcg``, ``cg``, ``minres``) work unchanged, e.g.
    ``eigsh(to_scipy(H), k=1, which="LA")``.

    ``scipy.sparse.linalg.aslinearoperator`` returns the result as it is.

    Raises:
        ImportError: scipy is not installed (``pip install scipy``).
        TypeError: the operator's dtype is not float32 or float64.
    """
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator
    except ImportError as exc:
        raise ImportError("to_scipy() needs scipy, which curvlab does not require: "
                          "pip install scipy (or pip install 'curvlab[scipy]')") from exc
    dtypes = {torch.float32: np.float32, torch.float64: np.float64}
    if operator.dtype not in dtypes:
        raise TypeError(f"to_scipy() supports float32 and float64 operators, got {operator.dtype}")
    n, dtype = int(operator.n), dtypes[operator.dtype]

    def matmat(X):
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[0] != n:
            raise ValueError(f"expected an array of shape ({n}, k), got {X.shape}")
        block = torch.from_numpy(np.ascontiguousarray(X.T, dtype=dtype))  # (k, n)
        return operator.matvec(block).detach().cpu().numpy().T

    def matvec(x):
        x = np.asarray(x)
        return matmat(x.reshape(n, 1)).reshape(x.shape)

    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat,
                          dtype=dtype)


__all__ += ["to_scipy"]
