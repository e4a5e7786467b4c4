"""One loop over the data, shared by everything that reads it.

Every quantity curvlab computes from the data (Hessian products, holdout
statistics, the gradient, per-sample curvatures) is a sum over batches of a
per-batch value weighted by the batch size,

    f(x) = (1/N) * sum_d loss(x, d) = sum_b (n_b / N) * L_b(x),

reduced over the ranks of a data-parallel job.  :class:`DataLoop` owns what
all of them share, so that an operator writes only its per-batch computation:

* the batch loss as a pure function of the parameters (:meth:`DataLoop.batch_loss`),
  with errors from the model or the loss re-raised naming the batch, the shapes
  and dtypes and the likely fix, and the checks that it is a finite scalar;
* the check, once per model view and loss, that the loss is a batch *mean*
  (:meth:`DataLoop.check_mean_loss`);
* the iteration (:meth:`DataLoop.local_batches`): this rank's batches cast to the
  model's device and dtype, empty ones skipped, optionally cut into groups;
* the reduction over ranks with timing and cost accounting
  (:meth:`DataLoop.reduce_`, :meth:`DataLoop.gather`), through the
  :class:`~curvlab.distributed.DataParallel` it is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor
from torch.func import grad, vjp

from .distributed import DataParallel
from .functional import FunctionalModel, batch_size_of
from .trees import _rows_or_none, _tree_rows

__all__ = ["Cost", "DataLoop", "OnParameters", "cast_batches", "output_hessian"]


@dataclass
class Cost:
    """Work done so far (mutable counter; results carry a frozen copy).

    Attributes:
        hvps: vectors multiplied by this operator (a block of ``k`` adds ``k``),
            each over the operator's own samples.  :class:`curvlab.CostRecord`'s
            ``hvps`` is the call's work in *full-data* equivalents instead
            (``samples / N``); its ``products`` is the sum of these.
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

    In a torch.distributed job, ``forward_samples`` and ``load_passes`` are this
    rank's own (the loss check runs on the rank's first batch, the counting pass
    reads the rank's shard) and may differ between ranks, while ``hvps``,
    ``samples``, ``passes`` and ``grad_samples`` count the work of all ranks
    together (the same on every rank); ``seconds`` is this rank's wall time.
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


class OnParameters:
    """``n``, ``dtype`` and ``device`` of an operator on the trainable parameters of :attr:`fmodel`."""

    fmodel: FunctionalModel

    @property
    def n(self) -> int:
        return self.fmodel.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.fmodel.dtype

    @property
    def device(self) -> torch.device:
        return self.fmodel.device


class DataLoop(OnParameters):
    """The model, the loss and this rank's data, with one loop over them.

    Args:
        fmodel: the model view; its device and dtype are the computation's.
        loss_fn: ``loss_fn(output, target) -> scalar``, the batch *mean* loss.
        parallel: the data and the reduction over ranks
            (:class:`~curvlab.distributed.DataParallel`; ``enabled=False`` for
            one process).
        cost: the counter work is booked on (default: a new one).

    Attributes:
        fmodel, loss_fn, parallel, cost: as given.
        num_samples: ``N``, over all ranks.

    A subclass writes a per-batch computation, runs it over :meth:`local_batches`
    inside a local function and hands that to :meth:`reduce_` (sums) or
    :meth:`gather` (per-sample values), which time it, reduce over the ranks
    and book its cost once.
    """

    def __init__(self, fmodel: FunctionalModel, loss_fn: Callable, parallel: DataParallel,
                 cost: Cost | None = None):
        self.fmodel = fmodel
        self.loss_fn = loss_fn
        self.parallel = parallel
        self.num_samples = parallel.num_samples
        self.cost = cost if cost is not None else Cost()

    # -- the batch loss as a pure function ------------------------------------
    def batch_loss(self, params: Dict[str, Tensor], x, y, index: int = 0) -> Tensor:
        """``loss_fn(model(x), y)`` at ``params``; errors name batch ``index``."""
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
        check_scalar(loss, index)
        return loss

    # -- the one iteration -------------------------------------------------------
    def local_batches(self, group_size: int | None = None, *, keep_empty: bool = False
                      ) -> Iterator[Tuple[int, object, object, int]]:
        """This rank's batches as ``(index, x, y, n_b)``, cast to the model's device/dtype.

        Empty batches are skipped (``keep_empty=True`` yields them too, for
        per-sample values whose order follows the batches).  With
        ``group_size``, a batch whose input and target are tensors is cut into
        groups of that many samples (each yielded with the batch's index);
        other batches are one group each.
        """
        return cast_batches(self.fmodel, self.parallel.local, group_size, keep_empty=keep_empty)

    # -- the reduction over ranks, timed and booked ----------------------------
    def reduce_(self, fn: Callable[[], None], *outputs: Tensor, **cost) -> None:
        """Run ``fn()``, which adds this rank's part into ``outputs``; sum them over the ranks.

        ``cost``: increments of :class:`Cost` fields (``hvps``, ``samples``,
        ``passes``, ``grad_samples``, ...), booked once with the wall time when
        the reduction succeeds.
        """
        t0 = time.perf_counter()
        self.parallel.sum_(fn, *outputs)
        self._book(t0, cost)

    def gather(self, fn: Callable[[], List[Tensor]], **cost) -> Tensor:
        """Per-sample values ``(N,)`` of all ranks in the global order; ``fn()`` returns
        this rank's, one 1-d tensor per batch (empty batches included).  ``cost`` as
        in :meth:`reduce_`."""
        t0 = time.perf_counter()
        out = self.parallel.gather(fn, self.dtype)
        self._book(t0, cost)
        return out

    def _book(self, t0: float, cost: Dict[str, float]) -> None:
        for name, amount in cost.items():
            setattr(self.cost, name, getattr(self.cost, name) + amount)
        self.cost.seconds += time.perf_counter() - t0

    # -- the mean-loss check -----------------------------------------------------
    def check_mean_loss(self) -> None:
        """Raise unless ``loss_fn`` is a batch mean; checked once per model view and loss.

        Compares the loss on this rank's first non-empty batch with the
        size-weighted mean of its values on the batch's two halves (skipped for
        one sample or inputs that cannot be split); all ranks raise together.
        Costs three forward passes of one batch (:attr:`Cost.forward_samples`).
        """
        checked = self.fmodel.__dict__.setdefault("_checked_losses", [])
        if any(f is self.loss_fn for f in checked):
            return
        flag = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.parallel.sum_(self._check_mean_loss, flag)
        checked.append(self.loss_fn)

    def _check_mean_loss(self) -> None:
        first = next(self.local_batches(), None)
        if first is None:
            return
        index, x, y, nb = first
        params = self.fmodel.params
        h = nb // 2
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                full = self.batch_loss(params, x, y, index)
                self.cost.forward_samples += nb
                halves = [(_rows_or_none(x, slice(0, h), nb), _rows_or_none(y, slice(0, h), nb)),
                          (_rows_or_none(x, slice(h, nb), nb), _rows_or_none(y, slice(h, nb), nb))]
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


def cast_batches(fmodel: FunctionalModel, batches, group_size: int | None = None, *,
                 keep_empty: bool = False) -> Iterator[Tuple[int, object, object, int]]:
    """``batches`` as ``(index, x, y, n_b)`` on ``fmodel``'s device/dtype (see
    :meth:`DataLoop.local_batches`, which runs it over this rank's batches)."""
    for index, (x, y) in enumerate(batches):
        x, y = fmodel.to_input(x), fmodel.to_target(y)
        nb = batch_size_of(x)
        if nb == 0 and not keep_empty:
            continue
        if group_size is None or nb <= group_size:
            yield index, x, y, nb
            continue
        # nested inputs or targets (tuples, dicts) are cut too when every leaf is a tensor
        # with one row per sample; otherwise the batch stays one group
        if _rows_or_none(x, slice(0, 1), nb) is None or _rows_or_none(y, slice(0, 1), nb) is None:
            yield index, x, y, nb
            continue
        for start in range(0, nb, group_size):
            rows = slice(start, start + group_size)
            xs, ys = _tree_rows(x, rows), _tree_rows(y, rows)
            yield index, xs, ys, batch_size_of(xs)


def output_hessian(loss_fn: Callable, out: Tensor, y, index: int) -> Callable:
    """``w -> ((d^2 L_b / d out^2) w,)``: the batch loss's Hessian in the outputs ``out``.

    ``L_b(o) = loss_fn(o, y)`` (checked to be a scalar, errors naming batch ``index``),
    differentiated by reverse-over-reverse on the loss alone (cheap: no network in it;
    forward-over-reverse fails in torch 2.14 for ``F.mse_loss``: "ZeroTensors are
    immutable").  The Gauss-Newton products and quadratic forms apply it to ``J v``.
    """
    def batch_loss(o):
        loss = loss_fn(o, y)
        check_scalar(loss, index)
        return loss

    return vjp(grad(batch_loss), out.detach())[1]


# -- checks and error messages --------------------------------------------------------------
def check_scalar(loss: Tensor, index: int) -> None:
    """Raise unless ``loss`` (the value of ``loss_fn`` on batch ``index``) is a 0-dim tensor."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn returned {shape} on batch {index}, not a scalar: it must return the "
            "mean loss over the batch (e.g. reduction='mean', the default of torch losses)")


def check_finite_loss(loss: Tensor, index: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(
            f"loss is not finite ({float(loss.detach()):g}) on batch {index}: check that batch's inputs "
            "and targets, and the model's parameters")


def check_finite(value: Tensor, index: int, what: str, hint: str = "") -> Tensor:
    """``value``, or a ``ValueError`` "<what> is not finite on batch <index><hint>"."""
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} is not finite on batch {index}{hint}")
    return value


# the errors torch and Python raise for wrong shapes, dtypes and types get the batch's context;
# out-of-memory, interrupts and a user's own exception classes propagate as they are
_PASS_THROUGH = (torch.OutOfMemoryError,)
_EXPLAINED = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError)


def _describe(obj) -> str:
    if isinstance(obj, Tensor):
        return f"shape {tuple(obj.shape)}, {obj.dtype}"
    if isinstance(obj, Mapping):
        return f"{type(obj).__name__} {{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in obj.items()) + "}"
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
