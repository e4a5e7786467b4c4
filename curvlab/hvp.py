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
        forward_samples: per-sample forward evaluations outside products and
            gradients (the check that the loss is a batch mean: one batch and
            its two halves, twice the batch's samples).
        load_passes: passes that only loaded the data, to count its samples
            (no model evaluated; see :mod:`curvlab.data`).  Not in ``passes``.
    """

    hvps: float = 0.0
    samples: int = 0
    passes: int = 0
    grad_samples: int = 0
    seconds: float = 0.0
    forward_samples: int = 0
    load_passes: int = 0

    def copy(self) -> "Cost":
        return Cost(self.hvps, self.samples, self.passes, self.grad_samples, self.seconds,
                    self.forward_samples, self.load_passes)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.hvps + other.hvps, self.samples + other.samples, self.passes + other.passes,
                    self.grad_samples + other.grad_samples, self.seconds + other.seconds,
                    self.forward_samples + other.forward_samples, self.load_passes + other.load_passes)


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
            raise TypeError(f"loss_fn must be callable (e.g. torch.nn.functional.cross_entropy), "
                            f"got {type(loss_fn).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fmodel is not None and output_fn is not None:
            raise ValueError("pass output_fn to the FunctionalModel when you pass fmodel")
        self.fmodel = fmodel if fmodel is not None else FunctionalModel(
            model, dtype=dtype, device=device, output_fn=output_fn)
        self.loss_fn = loss_fn
        batches = as_batches(data, batch_size, input_key=input_key, target_key=target_key)
        counted = _counting_passes(batches)
        self.parallel = DataParallel(batches, enabled=distributed,
                                     process_group=process_group, fmodel=self.fmodel)
        self.batches: Batches = self.parallel.batches
        self.num_samples = self.parallel.num_samples
        if method == "auto":
            method = "fwd-rev" if self.fmodel.device.type == "cuda" else "rev-rev"
        self.method = method
        local = self.parallel.local
        self.cost = Cost(load_passes=getattr(local, "counting_passes", 0) - counted.get(id(local), 0))
        checked = self.fmodel.__dict__.setdefault("_checked_losses", [])
        if not any(f is loss_fn for f in checked):
            flag = torch.zeros(1, dtype=torch.float64, device=self.device)
            self.parallel.sum_(self._check_mean_loss, flag)  # all ranks raise together
            checked.append(loss_fn)

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
        try:
            out = self.fmodel(params, x)
        except _PASS_THROUGH:
            raise
        except _EXPLAINED as exc:
            raise _explain(exc, "the model" + (" (with output_fn)" if self.fmodel.output_fn else ""),
                           index, x, None, y) from exc
        try:
            loss = self.loss_fn(out, y)
        except _PASS_THROUGH:
            raise
        except _EXPLAINED as exc:
            raise _explain(exc, "loss_fn", index, x, out, y) from exc
        _check_scalar(loss, index)
        return loss

    def _check_mean_loss(self) -> None:
        """Raise unless ``loss_fn`` is the mean over the samples of the first non-empty batch."""
        for index, (x, y) in enumerate(self.parallel.local):
            if batch_size_of(x) > 0:
                break
        else:
            return
        x, y = self.fmodel.to_input(x), self.fmodel.to_target(y)
        nb = batch_size_of(x)
        params = self.fmodel.params
        h = nb // 2
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                full = self.batch_loss(params, x, y, index)
                self.cost.forward_samples += nb
                halves = [(_rows(x, slice(0, h), nb), _rows(y, slice(0, h), nb)),
                          (_rows(x, slice(h, nb), nb), _rows(y, slice(h, nb), nb))]
                if nb < 2 or any(part is None for half in halves for part in half):
                    return  # one sample, or inputs that cannot be split: nothing to compare
                l1 = self.batch_loss(params, *halves[0], index)
                l2 = self.batch_loss(params, *halves[1], index)
                self.cost.forward_samples += nb
        finally:
            self.cost.seconds += time.perf_counter() - t0
        full, l1, l2 = float(full), float(l1), float(l2)
        mean = (h * l1 + (nb - h) * l2) / nb
        tol = math.sqrt(torch.finfo(self.dtype).eps) * (abs(full) + abs(l1) + abs(l2))
        if abs(full - mean) > tol:  # (a non-finite loss is reported by the first product)
            ratio = f", {full / mean:.3g} times that" if mean else ""
            raise ValueError(
                f"loss_fn is not a mean over the batch's samples: on batch {index} ({nb} samples) it "
                f"gives {full:.6g}, but the size-weighted mean of its values on the batch's two halves "
                f"is {mean:.6g}{ratio} (a sum over the samples gives about 2 times). curvlab combines "
                "batches of different sizes into the full-data mean loss and needs loss_fn(output, "
                "target) to be the mean over the batch: use reduction='mean' (the default of torch "
                "losses), or divide a summed loss by the batch size (loss.sum() / len(target)). "
                "Class weights with reduction='mean' divide by the batch's sum of weights instead: "
                "use reduction='sum' divided by the batch size. A model that mixes samples (batch "
                "statistics in eval mode) fails this check too")

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


def _rows(tree, rows: slice, nb: int):
    """Rows of every tensor of a batch input/target; ``None`` if one has no leading ``nb`` dim."""
    if isinstance(tree, Tensor):
        return tree[rows] if tree.dim() >= 1 and tree.shape[0] == nb else None
    if isinstance(tree, dict):
        out = {k: _rows(v, rows, nb) for k, v in tree.items()}
        return None if any(v is None for v in out.values()) else out
    if isinstance(tree, (list, tuple)) and tree:
        out = [_rows(v, rows, nb) for v in tree]
        return None if any(v is None for v in out) else type(tree)(out)
    return None


# the errors torch and Python raise for wrong shapes, dtypes and types get the batch's context;
# out-of-memory, interrupts and a user's own exception classes propagate as they are
_PASS_THROUGH = (torch.OutOfMemoryError,)
_EXPLAINED = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError)


def _describe(obj) -> str:
    if isinstance(obj, Tensor):
        return f"shape {tuple(obj.shape)}, {obj.dtype}"
    if isinstance(obj, dict):
        return "dict {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} [" + ", ".join(_describe(v) for v in obj) + "]"
    return f"a {type(obj).__name__}"


def _explain(exc: Exception, who: str, index: int, x, out, y) -> Exception:
    """A ``ValueError``/``TypeError`` naming the batch, shapes, dtypes and the likely fix."""
    cls = TypeError if isinstance(exc, TypeError) else ValueError
    if out is not None and not isinstance(out, Tensor):
        cls = TypeError
        fix = (f"the model's output is a {type(out).__name__}, not a tensor: pass output_fn= to "
               "pick the tensor loss_fn takes, e.g. output_fn=lambda out: out[0] or "
               "output_fn=lambda out: out.logits")
    elif out is None and "output_fn" in who and isinstance(exc, (AttributeError, IndexError, KeyError,
                                                                     TypeError)):
        fix = "output_fn does not fit what the model returns: check it on model(x) outside curvlab"
    elif isinstance(exc, IndexError) and isinstance(y, Tensor) and not y.is_floating_point():
        fix = ("a class index in the targets is out of range for the model's outputs: check the "
               "number of classes and that labels run from 0 to classes - 1")
    elif isinstance(out, Tensor) and isinstance(y, Tensor) and y.dim() >= 1 and out.dim() >= 1 \
            and y.shape[0] != out.shape[0]:
        fix = (f"the output has {out.shape[0]} rows but the target {y.shape[0]}: each batch needs "
               "one target per input (check input_key/target_key and the collate_fn)")
    elif isinstance(out, Tensor) and isinstance(y, Tensor) and y.is_floating_point() \
            and out.dim() == y.dim() + 1:
        fix = ("the targets are floating but look like class indices: class-index losses "
               "(cross_entropy, nll_loss) need integer targets, e.g. Y.long()")
    elif isinstance(out, Tensor) and isinstance(y, Tensor) and not y.is_floating_point() \
            and out.shape == y.shape:
        fix = "regression losses (mse_loss, ...) need floating targets, e.g. Y.float()"
    else:
        fix = ("check that loss_fn(model(x), y) runs on one batch outside curvlab; if the model "
               "returns more than the loss takes, pass output_fn=")
    shapes = f"input {_describe(x)}"
    if out is not None:
        shapes += f"; output {_describe(out)}"
    shapes += f"; target {_describe(y)}"
    text = str(exc).rstrip().rstrip(".")
    return cls(f"{who} raised {type(exc).__name__} on batch {index} ({shapes}): {text}. Likely fix: {fix}")


def _check_finite_loss(loss: Tensor, index: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(
            f"loss is not finite ({float(loss.detach()):g}) on batch {index}: check that batch's inputs "
            "and targets, and the model's parameters")


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
