"""``curvlab.extremes``: the largest and smallest Hessian eigenvalue of a full-data loss.

This module is the policy layer: it turns a model, a loss and data into a
:class:`~curvlab.hvp.HessianOperator`, runs the solver, and packages the answer
with its error bounds and cost.  Everything below it (HVP engine, solvers) is
usable on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .functional import FunctionalModel, evaluation_mode
from .hvp import METHODS, Cost, HessianOperator
from .lanczos import lanczos

__all__ = ["extremes", "ExtremesResult", "CostRecord"]

CURVATURES = ("none",)


@dataclass(frozen=True)
class CostRecord:
    """What a call spent.

    Attributes:
        hvps: Hessian-vector products in full-data equivalents (a product over
            ``m`` of the ``N`` samples counts ``m / N``).
        samples: per-sample HVP evaluations (``N`` per full-data product).
        passes: passes over (a subset of) the data made for products.
        seconds: wall time of the whole call.
    """

    hvps: float
    samples: int
    passes: int
    seconds: float

    @staticmethod
    def from_cost(cost: Cost, seconds: float) -> "CostRecord":
        return CostRecord(hvps=cost.hvps, samples=cost.samples, passes=cost.passes, seconds=seconds)


@dataclass(frozen=True)
class ExtremesResult:
    """Both extremes of the Hessian spectrum, with error bounds and cost.

    Ritz values err inward (Courant-Fischer): ``lambda_max`` is never above the
    true largest eigenvalue and ``lambda_min`` never below the true smallest.
    The error bounds are residual norms ``||H v - lambda v||``: an eigenvalue
    lies within that distance, so ``interval_max = (lambda_max, lambda_max +
    lambda_max_error)`` and ``interval_min = (lambda_min - lambda_min_error,
    lambda_min)`` contain the true extremes once the Ritz pairs have found them.

    Attributes:
        lambda_max, lambda_min: the estimates (``nan`` for an end not asked for).
        lambda_max_error, lambda_min_error: residual-norm error bounds.
        converged_max, converged_min: whether the stopping rule held.
        vector_max, vector_min: unit eigenvector estimates, flat ``(n,)`` in the
            parameter order of ``model.named_parameters()`` (trainable ones),
            on the computation device.
        cost: :class:`CostRecord`.
        num_params, num_samples: ``n`` and ``N``.
        history: the solver's per-step trace (for convergence plots).
        options: the options used (``tol``, ``method``, ...), for the record.
    """

    lambda_max: float
    lambda_min: float
    lambda_max_error: float
    lambda_min_error: float
    converged_max: bool
    converged_min: bool
    vector_max: Optional[Tensor] = field(repr=False)
    vector_min: Optional[Tensor] = field(repr=False)
    cost: CostRecord
    num_params: int
    num_samples: int
    history: List[dict] = field(default_factory=list, repr=False)
    options: dict = field(default_factory=dict, repr=False)

    @property
    def interval_max(self) -> tuple[float, float]:
        return (self.lambda_max, self.lambda_max + self.lambda_max_error)

    @property
    def interval_min(self) -> tuple[float, float]:
        return (self.lambda_min - self.lambda_min_error, self.lambda_min)

    @property
    def converged(self) -> bool:
        want = self.options.get("which", "both")
        return ((want == "SA" or self.converged_max) and (want == "LA" or self.converged_min))


def _check_positive(name: str, value, kind=float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def extremes(model: nn.Module, loss_fn: Callable, data, *, which: str = "both",
             tol: float = 1e-2, tol_min: float | None = 5e-2, floor: float = 1e-5,
             max_hvps: int = 300, max_basis: int = 40, init: ExtremesResult | None = None,
             seed: int = 0, device=None, dtype: torch.dtype | None = None,
             batch_size: int = 256, method: str = "auto", curvature: str = "none",
             progress: bool = False, callback: Callable[[dict], None] | None = None
             ) -> ExtremesResult:
    """Largest and smallest eigenvalue of the Hessian of the full-data mean loss.

    Computes the extremes of the spectrum of ``H = (1/N) sum_d hess_x loss(x, d)``
    at the model's current parameters ``x`` (the trainable ones), by Lanczos
    with full reorthogonalisation and thick restarts on exact full-data
    Hessian-vector products.  The Hessian is defined with the model in **eval
    mode** (BatchNorm uses running statistics, dropout is off); the model is
    put in eval mode for the call and every submodule's mode is restored
    afterwards, also on error.  The model's parameters, buffers and
    ``requires_grad`` flags are never written.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target) -> scalar`` batch-mean loss, e.g.
            ``torch.nn.functional.cross_entropy``.
        data: a DataLoader, an iterable of ``(x, y)`` batches, or a tuple
            ``(X, Y)`` of tensors (cut into ``batch_size`` batches).  It must give
            the same samples on every pass: no random augmentation.
        which: ``"both"``, ``"LA"`` (largest only) or ``"SA"`` (smallest only).
        tol: relative error bound wanted for ``lambda_max``:
            stop when ``||H v - theta v|| <= tol * |theta|``.
        tol_min: the same for ``lambda_min``, relative to ``|lambda_min|`` (not to
            ``lambda_max``); ``None`` means ``tol``.
        floor: an eigenvalue also counts as converged when its residual is below
            ``floor * |lambda_max|``: a ``lambda_min`` that is zero at the scale of
            ``lambda_max`` cannot be resolved relatively.
        max_hvps: budget in full-data Hessian-vector products.
        max_basis: Krylov basis size before a thick restart (memory: twice
            this many vectors of length ``n``).
        init: a previous :class:`ExtremesResult` (same model architecture): its
            eigenvectors start the solver (warm start across epochs).
        seed: seeds the random start vectors.
        device, dtype: of the computation (default: the model's); e.g.
            ``dtype=torch.float64`` for reference values.
        batch_size: batch size when ``data`` is ``(X, Y)``.
        method: HVP method, ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"`` (see
            :mod:`curvlab.hvp`).
        curvature: approximation used to start/precondition the solver.
        progress: show a progress bar (tqdm) of the products spent.
        callback: called with each solver step's trace entry.

    Returns:
        :class:`ExtremesResult`.  Cost: about as many full-data HVPs as
        Lanczos steps (``result.cost.hvps``); one HVP is roughly 2-3 gradient
        passes over the data.

    Example:
        >>> import torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, Y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> r = curvlab.extremes(model, torch.nn.functional.cross_entropy, (X, Y))
        >>> r.lambda_min <= r.lambda_max
        True
    """
    t0 = time.perf_counter()
    if which not in ("both", "LA", "SA"):
        raise ValueError(f"which must be 'both', 'LA' or 'SA', got {which!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tol_min = tol if tol_min is None else tol_min
    for name, value in (("tol", tol), ("tol_min", tol_min), ("max_hvps", max_hvps), ("max_basis", max_basis)):
        _check_positive(name, value)
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor!r}")
    if init is not None and not isinstance(init, ExtremesResult):
        raise TypeError(f"init must be a previous ExtremesResult, got {type(init).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    with evaluation_mode(model):
        fmodel = FunctionalModel(model, dtype=dtype, device=device)
        H = HessianOperator(None, loss_fn, data, batch_size=batch_size, method=method, fmodel=fmodel)
        v0 = _warm_start(init, fmodel.numel)
        bar = _progress_bar(progress, max_hvps)

        def step(entry):
            if bar is not None:
                bar.update(entry["matvecs"] - bar.n)
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k.startswith("lambda")})
            if callback is not None:
                callback(entry)

        try:
            res = _solve(H, which, tol, tol_min, floor, max_hvps, max_basis, v0, seed, step)
        finally:
            if bar is not None:
                bar.close()

    nan = float("nan")
    out = dict(lambda_max=nan, lambda_min=nan, lambda_max_error=nan, lambda_min_error=nan,
               converged_max=False, converged_min=False, vector_max=None, vector_min=None)
    for end, (value, vector, error, conv) in res["ends"].items():
        out[f"lambda_{end}"] = value
        out[f"lambda_{end}_error"] = error
        out[f"converged_{end}"] = conv
        out[f"vector_{end}"] = vector
    options = dict(which=which, tol=tol, tol_min=tol_min, floor=floor, max_hvps=max_hvps,
                   max_basis=max_basis, seed=seed, method=H.method, curvature=curvature,
                   dtype=str(fmodel.dtype), device=str(fmodel.device), warm_start=v0 is not None)
    return ExtremesResult(**out, cost=CostRecord.from_cost(H.cost, time.perf_counter() - t0),
                          num_params=fmodel.numel, num_samples=H.num_samples,
                          history=res["history"], options=options)


def _warm_start(init: ExtremesResult | None, n: int) -> Optional[Tensor]:
    if init is None:
        return None
    vecs = [v for v in (init.vector_max, init.vector_min) if v is not None]
    if not vecs:
        return None
    if any(v.numel() != n for v in vecs):
        raise ValueError(
            f"init holds vectors of length {vecs[0].numel()} but the model has {n} trainable "
            "parameters: warm-start only from a result for the same architecture")
    return torch.stack([v.reshape(-1) for v in vecs])


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="extremes", unit="hvp", leave=False)


def _solve(H: HessianOperator, which, tol, tol_min, floor, max_hvps, max_basis, v0, seed, step):
    """Lanczos on the wanted end(s), each with its own relative tolerance."""
    result = lanczos(H.matvec, H.n, which=which, k=1, v0=v0, tol=(tol_min, tol), floor=floor,
                     max_matvecs=max_hvps, max_basis=max_basis, dtype=H.dtype, device=H.device,
                     seed=seed, callback=step)
    ends = {}
    if which in ("SA", "both"):
        ends["min"] = (float(result.values[0]), result.vectors[0], float(result.residual_norms[0]),
                       bool(result.converged[0]))
    if which in ("LA", "both"):
        ends["max"] = (float(result.values[-1]), result.vectors[-1], float(result.residual_norms[-1]),
                       bool(result.converged[-1]))
    return {"ends": ends, "history": result.history}
