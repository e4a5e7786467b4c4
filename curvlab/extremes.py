"""``curvlab.extremes``: the largest and smallest Hessian eigenvalue of a full-data loss.

This module is the policy layer: it turns a model, a loss and data into a
:class:`~curvlab.hvp.HessianOperator`, runs the solver, and packages the answer
with its error bounds and cost.  Everything below it (HVP engine, solvers) is
usable on its own.
"""

from __future__ import annotations

import math
import numbers
import time
from statistics import NormalDist
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .data import check_keys
from .functional import FunctionalModel, check_dtype, evaluation_mode
from .hvp import METHODS, Cost, HessianOperator
from .lanczos import lanczos
from .sampling import (extreme_interval, holdout_estimate, holdout_size_for, kato_temple_interval,
                       sample_size_for)

__all__ = ["extremes", "ExtremesResult", "CostRecord"]

CURVATURES = ("none", "diag", "ggn", "kfac")



def _hvp_samples(cost: Cost) -> float:
    return cost.samples + cost.grad_samples / 2


@dataclass(frozen=True)
class CostRecord:
    """What a call spent.

    Attributes:
        hvps: Hessian-vector products in full-data equivalents: ``samples / N``
            (a product over ``m`` of the ``N`` samples counts ``m / N``).
        samples: per-sample HVP evaluations, plus half the gradient-equivalent
            per-sample work of statistics and approximations (an HVP costs
            about two gradients: 2.4x in FLOPs for the MLP of BENCHMARKS.md);
            so a per-sample ``v^T H_d v`` or GGN product counts as one.
        passes: passes over (a subset of) the data.
        products: vectors multiplied by a (possibly subsampled) Hessian.
        seconds: wall time of the whole call.
        forward_samples: per-sample forward passes of the check that the loss
            is a batch mean (one batch and its halves; not in ``samples``).
        load_passes: passes that only loaded the data to count its samples
            (a loader that cannot say its size upfront); no model is run in
            them, and they are not in ``passes``.
    """

    hvps: float
    samples: int
    passes: int
    products: int
    seconds: float
    forward_samples: int = 0
    load_passes: int = 0

    @staticmethod
    def total(costs, num_samples: int, seconds: float) -> "CostRecord":
        samples = sum(_hvp_samples(c) for c in costs)
        return CostRecord(hvps=samples / num_samples, samples=int(samples),
                          passes=sum(c.passes for c in costs),
                          products=int(sum(c.hvps for c in costs)), seconds=seconds,
                          forward_samples=sum(c.forward_samples for c in costs),
                          load_passes=sum(c.load_passes for c in costs))


@dataclass(frozen=True)
class ExtremesResult:
    """Both extremes of the Hessian spectrum, with error bars and cost.

    ``lambda_max`` and ``lambda_min`` lie in the intervals ``interval_max`` and
    ``interval_min``; ``lambda_*_error`` is the larger distance from the
    estimate to an end of its interval.  How they are made:

    * **exact** (all data, ``sample_size == num_samples``): Ritz values err
      inward (Courant-Fischer) and an eigenvalue lies within the residual norm
      ``||H v - theta v||`` of each, so ``interval_max = (theta, theta + res)``
      and ``interval_min = (theta - res, theta)``, each widened on both sides by
      the rounding of the working precision (measured against float64 products
      on a few samples); the estimate is the Ritz value ``theta`` (its error is
      usually far below ``res``: ``res^2 / gap``).  A residual bound holds for
      *an* eigenvalue near ``theta``; it is taken for the extreme one only once
      the next Ritz pair at that end (the guard) has converged too, from a start
      with a random component.  An end that did not converge keeps only its
      inward side (the outward side is infinite), or, after subsample levels,
      the last level's outward bound.
    * **subsampled** (a fixed random subset ``S`` of ``sample_size`` samples):
      the vector found on ``S`` is evaluated on an independent holdout (sample
      splitting); the resulting unbiased Rayleigh quotient of the full-data
      Hessian bounds ``lambda_max`` from below (``lambda_min`` from above) up to
      its confidence half-width; the other side is the tighter of the
      subsample's own extreme Ritz value (biased outward) plus its sampling
      spread, and a Kato-Temple bound from the estimated full-data residual.
      The estimate is the interval's centre (the point with the least
      worst-case error, so the reported error is the half-width; for an end
      that did not converge it moves with ``confidence``), or the holdout
      Rayleigh quotient when the outward side is open (a search stopped by the
      budget before it settled). ``error_parts`` says how much of the width is
      sampling, how much solver.  The holdout also takes the Rayleigh quotient
      of the subsample's guard vector; when that lies beyond the extreme one's
      (the extreme eigenvector was weakly represented in ``S``), the outward
      side opens and ``S`` grows.  The outward side assumes that ``S``
      represents the extreme eigenvector at all: one carried only by samples
      outside ``S`` is invisible to it.

    Attributes:
        lambda_max, lambda_min: estimates (``nan`` for an end not asked for).
        lambda_max_error, lambda_min_error: error bounds (see above).
        interval_max, interval_min: ``(low, high)``.
        converged_max, converged_min: whether the end met its tolerance.
        vector_max, vector_min: unit eigenvector estimates, flat ``(n,)`` in the
            parameter order of ``model.named_parameters()`` (trainable ones),
            on the computation device.
        cost: :class:`CostRecord`.
        num_params, num_samples: ``n`` and ``N``.
        sample_size: samples the final solve used (``N`` when exact).
        sample_sizes: per end, the subsample size of its last level (``N`` when
            it was solved exactly); a warm start begins there.
        error_parts: per end, ``{"solver": residual norm, "sampling": z * standard error}``.
        levels: per subsample level, what was tried and found.
        history: the solver's per-step trace (for convergence plots).
        options: the options used, for the record.
    """

    lambda_max: float
    lambda_min: float
    lambda_max_error: float
    lambda_min_error: float
    interval_max: Tuple[float, float]
    interval_min: Tuple[float, float]
    converged_max: bool
    converged_min: bool
    vector_max: Optional[Tensor] = field(repr=False)
    vector_min: Optional[Tensor] = field(repr=False)
    cost: CostRecord
    num_params: int
    num_samples: int
    sample_size: int
    sample_sizes: dict = field(default_factory=dict, repr=False)
    error_parts: dict = field(default_factory=dict, repr=False)
    levels: List[dict] = field(default_factory=list, repr=False)
    history: List[dict] = field(default_factory=list, repr=False)
    options: dict = field(default_factory=dict, repr=False)

    @property
    def converged(self) -> bool:
        want = self.options.get("which", "both")
        return ((want == "SA" or self.converged_max) and (want == "LA" or self.converged_min))


def _check_positive(name: str, value, what: str = "") -> None:
    """A finite number > 0 (not a bool)."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0{what}, got {value!r}")


def _check_int(name: str, value, low: int, what: str = "") -> None:
    """An int >= ``low`` (not a bool)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{what}, got {value!r}")


def extremes(model: nn.Module, loss_fn: Callable, data, *, which: str = "both",
             tol: float = 1e-2, tol_min: float | None = 5e-2, floor: float = 1e-5,
             max_hvps: float = 300, max_basis: int = 40, init: ExtremesResult | None = None,
             sampling: str = "auto", sample_size: int | None = None, confidence: float = 0.95,
             seed: int = 0, device=None, dtype: torch.dtype | None = None,
             batch_size: int = 256, method: str = "auto", curvature: str = "none",
             approx_samples: int = 2048, approx_rank: int = 8,
             progress: bool = False, callback: Callable[[dict], None] | None = None,
             output_fn: Callable | None = None, input_key=None, target_key=None
             ) -> ExtremesResult:
    """Largest and smallest eigenvalue of the Hessian of the full-data mean loss.

    Computes the extremes of the spectrum of ``H = (1/N) sum_d hess_x loss(x, d)``
    at the model's current parameters ``x`` (the trainable ones) by Lanczos
    with full reorthogonalisation and thick restarts on exact Hessian-vector
    products (:mod:`curvlab.lanczos`, :mod:`curvlab.hvp`).  An end counts as
    converged only when the next Ritz pair inward has met the tolerance too
    (so that a Ritz vector mixing a cluster's members is not taken for the
    extreme), and every start (warm, or from a curvature approximation) carries
    a random component (so that a start on an interior eigenvector cannot hide
    the extreme one).  The Hessian is
    defined with the model in **eval mode** (BatchNorm uses running
    statistics, dropout is off); the model is put in eval mode for the call and
    every submodule's mode is restored afterwards, also on error.  The model's
    parameters, buffers and ``requires_grad`` flags are never written.

    Two regimes (``sampling``):

    ``"exact"``
        every product is over all ``N`` samples; the error bounds are residual
        norms (to solver tolerance, no statistics).
    ``"multilevel"``
        the solver runs on a fixed random subset ``S`` (``sample_size``
        samples, default 2048 or the previous call's choice); its vectors are
        certified on an independent holdout (sample splitting), grown until
        the sampling error is within tolerance: unbiased full-data Rayleigh
        quotients with standard errors, and Kato-Temple bounds from estimated
        full-data residuals.  ``S`` grows (warm-started) only when the part of
        the interval that depends on it is too wide; past ``N/2`` the rest is
        solved exactly.  Cheap for an isolated ``lambda_max``; a ``lambda_min``
        inside a dense cluster usually needs the exact stage.  Intervals are
        ``confidence`` intervals, not guarantees; when ``max_hvps`` runs out,
        the last intervals are returned with ``converged_* = False``.
    ``"auto"`` (default): exact when ``N <= 4 * sample_size``, where
    subsampling cannot save much, multilevel otherwise.

    Args:
        model: the network.  A half-precision model (``float16``, ``bfloat16``)
            is computed in ``float32`` on copies of its parameters and buffers
            (inputs cast), unless ``dtype`` says otherwise.
        loss_fn: ``loss_fn(output, target) -> scalar`` batch-mean loss, e.g.
            ``torch.nn.functional.cross_entropy`` (``reduction='mean'``).  Checked
            on the first batch against the size-weighted mean of its two halves:
            a sum (``reduction='sum'``) or any other normalisation raises
            ``ValueError``.
        data: a DataLoader, an iterable of ``(x, y)`` batches, or a tuple
            ``(X, Y)`` of tensors (cut into ``batch_size`` batches).  It must give
            the same samples on every pass: no random augmentation, no
            ``drop_last=True`` with ``shuffle=True`` (shuffling alone is fine).
            Every full pass is fingerprinted and compared with the first; data
            that changed raises ``ValueError`` (:mod:`curvlab.data`).  Batches
            may be ``(x, y)``, ``(x, y, extra...)`` or dicts (see ``input_key``);
            inputs may be tensors or tuples, lists or dicts of tensors.
        which: ``"both"``, ``"LA"`` (largest only) or ``"SA"`` (smallest only).
        tol: relative error wanted for ``lambda_max`` (half-width of its interval
            over ``|lambda_max|``; exact regime: ``||H v - theta v|| <= tol |theta|``).
        tol_min: the same for ``lambda_min``, relative to ``|lambda_min|`` (not to
            ``lambda_max``); ``None`` means ``tol``.
        floor: an end also counts as converged when its error is below
            ``floor * |lambda_max|``: a ``lambda_min`` that is zero at the scale of
            ``lambda_max`` cannot be resolved relatively.
        max_hvps: budget in full-data Hessian-vector product equivalents (one is
            about 2.4 training epochs of gradient work for an MLP, 2-3 in general:
            a budget of one epoch is ``max_hvps`` of about 0.4).  Building a
            curvature approximation is paid first and is not limited by it.
        max_basis: Krylov basis size before a thick restart (memory: twice
            this many vectors of length ``n``).
        init: a previous :class:`ExtremesResult` (same architecture): its
            eigenvectors start the solver and, subsampled, the smallest of its
            ends' final sample sizes is the first one tried (when it needed all
            data for a wanted end: its last subsample level).
        sampling: ``"auto"``, ``"exact"`` or ``"multilevel"`` (above).
        sample_size: first subsample size (multilevel).
        confidence: level of the sampling intervals (multilevel).  The level
            is nominal.  The quantile is the normal one, not Student's t,
            although the spread is itself estimated (from about 32 holdout groups
            or more).  A holdout that grows after each look at its interval is
            also looked at more than once.  Both lower the true level a little;
            ``tests/test_holdout.py`` measures 94 % coverage at 95 % on a
            synthetic population.
        seed: seeds the random start vectors and subsamples.
        device, dtype: of the computation (default: the model's); e.g.
            ``dtype=torch.float64`` for reference values.
        batch_size: batch size when ``data`` is ``(X, Y)``.
        method: HVP method, ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"`` (see
            :mod:`curvlab.hvp`).
        curvature: the curvature approximation ``C`` that helps the exact solver:
            ``"none"``, ``"diag"`` (GGN diagonal), ``"ggn"`` (generalised
            Gauss-Newton, exact products, low-rank top part) or ``"kfac"``
            (Kronecker-factored).  Its top ``approx_rank`` eigenvectors start the
            Lanczos run for ``lambda_max`` (the Hessian's outliers lie close to
            the GGN's), and ``(C + delta I)^{-1}`` preconditions a LOBPCG run for
            ``lambda_min``.  The answer is always the exact Hessian's; only the
            cost changes.
        approx_samples: samples the approximation is built from.
        approx_rank: eigenvectors of the approximation used.
        progress: show a progress bar (tqdm) of the products spent.
        callback: called with each solver step's trace entry.
        output_fn: applied to the model's output before ``loss_fn`` (and before
            the curvature approximations see it), e.g. ``lambda out: out[0]`` for
            a model returning ``(logits, extra)`` or ``lambda out: out.logits``.
            A model whose output ``loss_fn`` cannot take raises ``TypeError``
            naming ``output_fn``.
        input_key, target_key: the entries of each batch that are the model's
            input and the loss's target: dict keys (e.g. ``input_key="pixel_values",
            target_key="labels"``) or integer positions in tuple batches.
            ``input_key`` may be a tuple of keys, passed to the model as
            positional arguments in that order.  Default: a dict's ``"input"``
            and ``"target"``, a tuple's first two items.

    Raises:
        ValueError, TypeError: bad options (each message names the option and
            what it takes); data that changed between passes; a loss that is
            not a batch mean; ``(X, Y)`` of different lengths or 0-dim; dict
            batches without the keys; an exception of the model or ``loss_fn``
            on a batch, re-raised naming the batch, shapes, dtypes and the
            likely fix (chained to the original).  Nothing is written to the
            model in any case.

    Returns:
        :class:`ExtremesResult`; ``result.cost.hvps`` is the work in full-data
        Hessian-vector products (one is roughly 2-3 gradient passes).

    Example:
        >>> import torch, curvlab
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, Y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> r = curvlab.extremes(model, torch.nn.functional.cross_entropy, (X, Y))
        >>> r.lambda_min <= r.lambda_max
        True
    """
    t0 = time.perf_counter()
    if not isinstance(which, str) or which not in ("both", "LA", "SA"):
        raise ValueError(f"which must be 'both', 'LA' or 'SA', got {which!r}")
    if not isinstance(curvature, str) or curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(sampling, str) or sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    _check_positive("tol", tol, " (a relative tolerance, e.g. 1e-2)")
    if tol_min is not None:
        _check_positive("tol_min", tol_min, " (a relative tolerance, e.g. 5e-2) or None for tol")
    tol_min = tol if tol_min is None else tol_min
    _check_positive("max_hvps", max_hvps, " (a budget in full-data Hessian-vector products)")
    _check_int("max_basis", max_basis, 1, " (Krylov vectors kept before a restart, e.g. 40)")
    if sample_size is not None:
        _check_int("sample_size", sample_size, 2, " (the first subsample size) or None")
    if (not isinstance(confidence, numbers.Real) or isinstance(confidence, bool)
            or not 0 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
    if (not isinstance(floor, numbers.Real) or isinstance(floor, bool) or not math.isfinite(floor)
            or floor < 0):
        raise ValueError(f"floor must be a finite number >= 0 (relative to |lambda_max|, e.g. 1e-5; "
                         f"0 for none), got {floor!r}")
    _check_int("batch_size", batch_size, 1, " (samples per batch when data is (X, Y))")
    _check_int("approx_samples", approx_samples, 1, " (samples the curvature approximation uses)")
    _check_int("approx_rank", approx_rank, 1, " (eigenvectors of the approximation used)")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets each step's trace dict) or None, "
                        f"got {type(callback).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, loss_fn(output, target) -> scalar batch mean "
                        f"(e.g. torch.nn.functional.cross_entropy), got {type(loss_fn).__name__}")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable (e.g. lambda out: out[0]) or None, "
                        f"got {type(output_fn).__name__}")
    check_keys(input_key, target_key)
    if dtype is not None:
        check_dtype(dtype)
    if init is not None and not isinstance(init, ExtremesResult):
        raise TypeError(f"init must be a previous ExtremesResult, got {type(init).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    with evaluation_mode(model):
        fmodel = FunctionalModel(model, dtype=dtype, device=device, output_fn=output_fn)
        H = HessianOperator(None, loss_fn, data, batch_size=batch_size, method=method, fmodel=fmodel,
                            input_key=input_key, target_key=target_key)
        N = H.num_samples
        v0 = _warm_start(init, fmodel.numel)
        m0 = _warm_sizes(init, N, which, sample_size)
        regime = sampling
        if sampling == "auto":
            regime = "exact" if N <= 4 * m0 else "multilevel"
        bar = _progress_bar(progress, max_hvps)
        ctx = _Context(H=H, which=which, tol=tol, tol_min=tol_min, floor=floor, max_hvps=max_hvps,
                       max_basis=max_basis, seed=seed, bar=bar, callback=callback,
                       z=NormalDist().inv_cdf(0.5 + confidence / 2))
        try:
            if curvature != "none":
                _attach_approximation(ctx, curvature, approx_samples, approx_rank, init)
            if regime == "exact":
                ends = _exact(ctx, H, v0)
                levels, m_final, sizes = [], N, {e: N for e in ends}
            else:
                ends, levels, m_final, sizes = _multilevel(ctx, v0, m0)
        finally:
            if bar is not None:
                bar.close()

    nan = float("nan")
    out = dict(lambda_max=nan, lambda_min=nan, lambda_max_error=nan, lambda_min_error=nan,
               interval_max=(nan, nan), interval_min=(nan, nan), converged_max=False,
               converged_min=False, vector_max=None, vector_min=None)
    parts = {}
    for end, e in ends.items():
        lo, hi = e["interval"]
        out[f"lambda_{end}"] = e["value"]
        out[f"lambda_{end}_error"] = max(hi - e["value"], e["value"] - lo)
        out[f"interval_{end}"] = (lo, hi)
        out[f"converged_{end}"] = e["converged"]
        out[f"vector_{end}"] = e["vector"]
        parts[end] = {"solver": e["solver"], "sampling": e["sampling"]}
    options = dict(which=which, tol=tol, tol_min=tol_min, floor=floor, max_hvps=max_hvps,
                   max_basis=max_basis, seed=seed, method=H.method, curvature=curvature,
                   sampling=regime, confidence=confidence, dtype=str(fmodel.dtype),
                   device=str(fmodel.device), warm_start=bool(v0))
    cost = CostRecord.total(ctx.costs + [H.cost], N, time.perf_counter() - t0)
    return ExtremesResult(**out, cost=cost, num_params=fmodel.numel, num_samples=N,
                          sample_size=m_final, sample_sizes=sizes, error_parts=parts, levels=levels,
                          history=ctx.history, options=options)


SAMPLINGS = ("auto", "exact", "multilevel")
DEFAULT_SAMPLE = 2048


@dataclass
class _Context:
    """What the solve stages share: the full operator, tolerances, budget, trace."""

    H: HessianOperator
    which: str
    tol: float
    tol_min: float
    floor: float
    max_hvps: float
    max_basis: int
    seed: int
    bar: object
    callback: Optional[Callable]
    z: float
    costs: List[Cost] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)
    approx: object = None  # a curvature approximation (curvlab.curvature), or None
    approx_vectors: Optional[Tensor] = None
    approx_shift: float = 0.0
    overturned: set = field(default_factory=set)  # ends whose subsample order the holdout reversed

    def spent(self) -> float:
        """Full-data HVP equivalents spent so far."""
        return sum(_hvp_samples(c) for c in self.costs + [self.H.cost]) / self.H.num_samples

    def step(self, entry: dict, scale: float) -> None:
        """Record one solver step (``scale``: samples per product over N)."""
        entry = dict(entry, hvps=self.spent())
        self.history.append(entry)
        if self.bar is not None:
            self.bar.update(max(0.0, round(entry["hvps"], 2) - self.bar.n))
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k.startswith("lambda")})
        if self.callback is not None:
            self.callback(entry)


def _ends_of(which: str) -> List[str]:
    return {"both": ["min", "max"], "SA": ["min"], "LA": ["max"]}[which]


def _solve_ends(ctx: _Context, op: HessianOperator, ends: List[str], start: dict,
                tol_scale: float, budget_hvps: float, k: int = 2) -> dict:
    """Extreme Ritz pairs of ``op`` for ``ends``: ``{end: (theta, vector, residual, converged, next)}``.

    ``next`` is ``(theta_2, residual_2, converged_2, vector_2)``, the next Ritz pair inward at
    that end (the *guard*).  An end counts as converged only when its extreme pair **and** its guard
    met the tolerance: a residual bound ``||H v - theta v||`` places *an* eigenvalue near
    ``theta``, and where the end is clustered a Ritz vector that mixes the two outermost
    eigenvectors passes a loose residual test long before it has found the extreme one.
    Asking for the guard to settle too keeps the Krylov space growing until the cluster's
    outer members are resolved (the extreme converges first, as its polynomial
    amplification is the largest).

    Start vectors (a warm start, or an approximation's candidates) never start the
    search alone: a random unit vector is added to them (:func:`_start_vector`).  A warm
    start that is (close to) an interior eigenvector represents the extreme one weakly or
    not at all, and a Krylov space from it alone would settle on that interior
    eigenvalue.  With no start vector, one random vector starts the run.

    Without an approximation: one Lanczos run for both ends.  With one
    (``ctx.approx``): ``lambda_max`` by Lanczos started from the sum of the
    approximation's top eigenvectors (and the warm-start vector) plus the random
    component, ``lambda_min`` by LOBPCG
    preconditioned with ``(C + delta I)^{-1}`` (see :func:`_precond_shift`), whose vectors
    then start a Lanczos run with a random row that gives the answer: a preconditioned
    LOBPCG can settle on an interior eigenpair of the Hessian (the preconditioner's basin),
    and only a Krylov space with a generic component shows that something lies beyond it.
    """
    frac = op.num_samples / ctx.H.num_samples
    max_matvecs = max(2, int(budget_hvps / frac))
    tols = (ctx.tol_min * tol_scale, ctx.tol * tol_scale)
    k = max(k, 2)  # the extreme pair and its guard
    common = dict(floor=ctx.floor * tol_scale, dtype=op.dtype, device=op.device, seed=ctx.seed,
                  callback=lambda e: ctx.step(e, frac))
    out = {}

    def run(which: str, rows: list, budget: int):
        """Lanczos from the known rows plus a random one (:func:`_start_vector`)."""
        return lanczos(op.matvec, op.n, which=which, k=k, v0=_start_vector(rows, op, ctx.seed),
                       tol=tols, max_matvecs=max(budget, 2), max_basis=ctx.max_basis, **common)

    pairs = {"min": (0, 1), "max": (-1, -2)}
    if ctx.approx is None:
        which = "both" if len(ends) == 2 else ("SA" if ends == ["min"] else "LA")
        # one Krylov space serves both ends, from the known vectors plus a random one
        res = run(which, [start[e] for e in ends if e in start], max_matvecs)
        for e in ends:
            out[e] = _pair(res, *pairs[e])
        return out
    from .lobpcg import lobpcg

    share = max_matvecs // len(ends)
    if "max" in ends:
        rows = ([start["max"]] if "max" in start else []) + list(ctx.approx_vectors.to(op.device, op.dtype))
        out["max"] = _pair(run("LA", rows, share), *pairs["max"])
    if "min" in ends:
        delta = ctx.approx_shift
        X0 = start["min"][None] if "min" in start else None
        left = max_matvecs - (share if "max" in ends else 0)
        # LOBPCG gets half of what is left; its vectors start the Lanczos run that answers
        res = lobpcg(op.matvec, op.n, which="SA", k=k, X0=X0,
                     precond=lambda V: ctx.approx.inverse(V, delta), tol=tols[0],
                     max_matvecs=max(2 * k, left // 2), **common)
        res = run("SA", [res.vectors[0]], left - res.matvecs)
        out["min"] = _pair(res, *pairs["min"])
    return out


def _random_row(op: HessianOperator, seed: int) -> Tensor:
    """A unit Gaussian row ``(1, n)`` seeded by ``seed`` (independent of the solver's own)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    row = torch.randn(1, op.n, generator=g, dtype=torch.float64)
    return (row / row.norm()).to(op.device, op.dtype)


def _start_vector(rows: list, op: HessianOperator, seed: int) -> Tensor | None:
    """``unit(sum of the unit rows) + random unit row``, or ``None`` without rows.

    The random half keeps every eigenvector's component generic: a Krylov space from
    ``u + g`` contains ``(H - lambda I) K(H, g)`` for an eigenvector ``u`` of ``lambda``,
    so a start vector that is an interior eigenvector costs one step and hides nothing,
    while one near the wanted extreme still shortens the run.
    """
    if not rows:
        return None
    known = torch.stack([r.reshape(-1).to(op.device, op.dtype) for r in rows])
    known = known / known.norm(dim=1, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
    v = known.sum(0)
    v = v / v.norm() if float(v.norm()) > 0 else known[0]
    return v + _random_row(op, seed)[0]


def _pair(res, i: int, j: int) -> tuple:
    """``(theta, vector, residual, converged, next)`` of a solver result's pair ``i``.

    ``next`` is the guard pair ``j``, ``(theta, residual, converged, vector)`` (``None`` when
    the result holds a single pair, a one-dimensional problem).  ``converged`` requires the
    guard's convergence too.
    """
    m = res.values.numel()
    jj = j % m if m > 1 else None
    nxt = None
    conv = bool(res.converged[i])
    if jj is not None and jj != i % m:
        nxt = (float(res.values[jj]), float(res.residual_norms[jj]), bool(res.converged[jj]),
               res.vectors[jj])
        conv = conv and nxt[2]
    return (float(res.values[i]), res.vectors[i], float(res.residual_norms[i]), conv, nxt)


def _attach_approximation(ctx: _Context, name: str, samples: int, rank: int, init) -> None:
    """Build the curvature approximation on ``samples`` samples and its top eigenpairs."""
    from .curvature import build_curvature

    H = ctx.H
    cost = Cost()
    ctx.costs.append(cost)
    options = {"max_matvecs": 8 * rank + 20} if name == "ggn" else {}  # keep its own Lanczos cheap
    approx = build_curvature(name, H.fmodel, H.loss_fn, H.batches, max_samples=samples,
                             seed=ctx.seed, cost=cost, **options)
    rank = min(rank, H.n)
    values, vectors = approx.top_eigenpairs(rank)
    ctx.approx, ctx.approx_vectors = approx, vectors
    ctx.approx_shift = _precond_shift(values, ctx.floor)


def _precond_shift(values: Tensor, floor: float) -> float:
    """The damping ``delta`` of the preconditioner ``(C + delta I)^{-1}`` for ``lambda_min``.

    ``values`` are the approximation's ``k`` largest eigenvalues (descending).
    Directions that ``C`` resolves (its outliers) are mapped near 1 and the rest
    are scaled by ``1/delta``; with ``delta`` = the smallest resolved eigenvalue
    ``values[-1]`` (the edge below which ``C`` is treated as flat), the top of
    the Hessian's spectrum is compressed to about 1 while the near-zero end,
    where ``lambda_min`` lives, is spread by ``1/delta``: the relative gap that
    governs convergence grows from ``|lambda_min| / lambda_max`` to about
    ``|lambda_min| / delta``.  Kept above ``floor * values[0]`` so that ``C +
    delta I`` stays well conditioned.
    """
    top = float(values[0])
    return max(float(values[-1]), floor * top, 1e-12 * max(top, 1.0))


def _exact(ctx: _Context, H: HessianOperator, v0, ends: List[str] | None = None) -> dict:
    """Full-data Lanczos; intervals from Courant-Fischer, residual norms and rounding.

    A converged end (its guard pair converged too, see :func:`_solve_ends`) gets
    ``(theta - slack, theta + res + slack)`` for ``lambda_max`` and
    ``(theta - res - slack, theta + slack)`` for ``lambda_min``, where ``slack`` is the
    arithmetic's own error (:func:`_rounding_slack`).  An end that did not converge
    (budget) keeps its inward side only: its outward side is open, since a residual
    bound certifies *an* eigenvalue near ``theta``, not the extreme one.
    """
    ends = ends or _ends_of(ctx.which)
    budget = ctx.max_hvps - ctx.spent()
    found = _solve_ends(ctx, H, ends, v0, 1.0, budget)
    scale = max(abs(f[0]) for f in found.values())
    slack = _rounding_slack(ctx, H, {e: f[1] for e, f in found.items()}, scale)
    out = {}
    for end, (theta, vec, res, conv, _) in found.items():
        s = slack[end] + H.n ** 0.5 * _unit_roundoff(H.dtype) * (abs(theta) + 1e-3 * scale)
        if end == "max":
            interval = (theta - s, theta + res + s if conv else math.inf)
        else:
            interval = (theta - res - s if conv else -math.inf, theta + s)
        out[end] = dict(value=theta, interval=interval, vector=vec, converged=conv, solver=res + s,
                        sampling=0.0)
    return out


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _rounding_slack(ctx: _Context, H: HessianOperator, vectors: dict, scale: float,
                    probe: int = 32) -> dict:
    """Rounding error of the working precision's products along ``vectors``, measured.

    The residual norm bounds the distance from a Ritz value to an eigenvalue of the
    operator *as computed*; in float32 the products themselves differ from the exact
    Hessian's by rounding (``||H_32 v - H v||``), which a tight residual does not see.
    This compares the products of each vector on the first ``probe`` samples in the
    working precision and in float64 and returns, per end, three times that difference
    (a Rayleigh quotient moves by at most ``||E v||``, a residual by as much again; the
    factor covers batches whose curvature is larger than the probe's).  In float64 it is
    ``0`` (the caller's ``sqrt(n) u |theta|`` term covers it).  Cost: ``3 * probe / N``
    HVPs per vector (float64 counted double), counted; when the budget cannot pay it, the
    a-priori bound ``sqrt(n) u scale`` (``scale``: the largest ``|theta|``) is used instead.
    """
    if H.dtype == torch.float64 or not vectors:
        return {e: 0.0 for e in vectors}
    if ctx.spent() + 3 * len(vectors) * probe / H.num_samples > ctx.max_hvps:
        return {e: H.n ** 0.5 * _unit_roundoff(H.dtype) * scale for e in vectors}
    V = torch.stack([v.reshape(-1) for v in vectors.values()]).to(H.device, H.dtype)
    V = V / V.norm(dim=1, keepdim=True)
    # per vector the difference, then the ranks that measured and their samples: summed over
    # ranks (each probes its own first batch), so that every rank gets the same slack and cost
    out = torch.zeros(len(V) + 2, dtype=torch.float64, device=H.device)

    def measure():
        batch = next(iter(H.parallel.local), None)
        if batch is None:
            return
        x, y = batch
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            x, y = x[:probe], y[:probe]
        work = HessianOperator(None, H.loss_fn, [(x, y)], method=H.method, fmodel=H.fmodel,
                               distributed=False)
        ref = HessianOperator(H.fmodel.module, H.loss_fn, [(x, y)], method=H.method,
                              dtype=torch.float64, device=H.device, distributed=False,
                              output_fn=H.fmodel.output_fn)
        out[:-2] = (work.matvec(V).double() - ref.matvec(V.double())).norm(dim=1)
        out[-2:] = torch.tensor([1.0, work.num_samples], dtype=torch.float64)

    H.parallel.sum_(measure, out)
    cost = Cost(samples=3 * len(V) * int(out[-1]), passes=2)  # float64 products count double
    ctx.costs.append(cost)
    diff = out[:-2] / out[-2].clamp_min(1.0)
    return {e: 3.0 * float(d) for e, d in zip(vectors, diff)}


def _multilevel(ctx: _Context, v0, m: int):
    """Search on a subsample, certify on a holdout; grow the subsample only when needed.

    At a level with subsample ``S`` (the first ``m`` samples of a random
    permutation):

    1. **search**: Lanczos on ``H_S`` (warm-started), two Ritz pairs per wanted
       end, to half the tolerance, with at most half the remaining budget;
    2. **certify** on a holdout ``T`` drawn from the samples after ``S`` (sample
       splitting: ``T`` is independent of the vectors found on ``S``), grown in
       chunks until the sampling part of each interval is within tolerance or
       ``T`` is everything outside ``S`` (then the Rayleigh quotient is exact):
       group products ``H_g v`` give the unbiased full-data Rayleigh quotient
       ``r`` with its standard error ``se``, and a noise-free estimate of the
       full-data residual ``||H v - r v||`` (:mod:`curvlab.sampling`);
    3. **interval**, for ``lambda_max`` (mirrored for ``lambda_min``): below,
       ``r - z se`` (Courant-Fischer: ``lambda_max >= r``); above, the tighter of
       the subsample bound ``theta_S + res_S + z sigma / sqrt(m)`` (the top
       eigenvector's curvature on ``S`` cannot exceed the subsample's extreme)
       and Kato-Temple ``r + z se + res^2 / (r - lambda_2)``, whose quadratic
       term makes an isolated outlier cheap to certify (``lambda_2`` bounded
       from the subsample's second Ritz pair);
    4. an end is done when its half-width is within tolerance.  Otherwise the
       subsample-dependent part of its width decides the next size
       (``m' = m (width / target)^2``, at least ``2m``); once ``m' > N/2`` the
       remaining ends are solved exactly on all data.

    When the budget (``max_hvps``) runs out, the ends not done are returned
    with their last intervals and ``converged = False``.  A level's subsample
    is shrunk, if needed, so that a dozen products on it and a first holdout
    chunk of its size fit the budget left; a level that would then be no
    larger than twice the last one is not started.  The last level the budget
    allows spends what is left on its holdout, up to all samples outside
    its subsample (a tighter inner side and estimate of the vector it found),
    unless an exact stage could still follow it.
    """
    H, N = ctx.H, ctx.H.num_samples
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(ctx.seed + 1))
    todo = _ends_of(ctx.which)
    done: dict = {}
    last: dict = {}
    sizes: dict = {}
    levels: List[dict] = []
    start, m_used = v0, m
    while todo:
        remaining = ctx.max_hvps - ctx.spent()
        if remaining <= 0:
            break
        if 2 * m > N:
            if last and remaining < 2 * len(todo):
                break  # too little left for the exact stage to improve on the last intervals
            for end, entry in _exact(ctx, H, start, todo).items():
                done[end] = _keep_level_bounds(end, entry, last.get(end))
            sizes.update({e: N for e in todo})
            return done, levels, N, sizes
        # a level should fit the budget left: a dozen products on S and a first holdout
        # chunk of m per end; under a tight budget the subsample shrinks to fit (a warm
        # start's vectors then get a few Krylov steps rather than none)
        fit = int(remaining * N / (12 + 2 * len(todo)))
        if fit < m:
            if last and fit < 2 * m_used:
                break  # a level that fits would not be larger than the last one
            m = max(fit, min(64, N // 2))
        # the last level the budget allows: the next, at least 2m, would not fit even with
        # all that is left now, and no exact stage can follow (the next size, at most 4m,
        # stays within N/2, or too little is left for the exact stage to run): its holdout
        # may spend everything left
        final = fit < 2 * m and (8 * m <= N or remaining < 2 * len(todo))
        S = H.batches.subset(perm[:m])
        HS = HessianOperator(None, H.loss_fn, S, method=H.method, fmodel=H.fmodel)
        ctx.costs.append(HS.cost)
        found = _solve_ends(ctx, HS, todo, start, 0.5, 0.5 * remaining, k=2)
        ests = _certify(ctx, perm, m, found, todo, done, spend_all=final)
        level = {"sample_size": m, "ends": {}}
        need = m
        for end in todo:
            theta, vec, res, conv, nxt = found[end]
            est = ests[end]
            interval, kt, _ = _level_interval(ctx, end, found[end], est, m)
            half = (interval[1] - interval[0]) / 2
            centre = (interval[0] + interval[1]) / 2
            target = _target(ctx, end, centre if math.isfinite(centre) else est.value, found, done)
            ok = math.isfinite(half) and half <= target
            level["ends"][end] = dict(theta_subsample=theta, residual=res, rayleigh_holdout=est.value,
                                      standard_error=est.se, holdout=est.holdout,
                                      residual_full=est.residual, interval=interval,
                                      kato_temple=kt, accepted=ok,
                                      overturned=end in ctx.overturned)
            # the estimate: the interval's centre (the point whose worst error over the
            # interval is least, so the reported error is the half-width; the Rayleigh
            # quotient of an unfinished vector errs inward, the subsample's extreme outward;
            # for an end not yet within tolerance the centre moves with the confidence
            # level); the unbiased Rayleigh quotient when the outward side is open
            value = centre if math.isfinite(centre) else est.value
            entry = dict(value=value, interval=interval, vector=vec, converged=ok, solver=res,
                         sampling=ctx.z * est.se)
            sizes[end] = m
            if ok:
                done[end] = entry
            else:
                last[end] = entry
                need = max(need, _next_size(ctx, end, found[end], est, target, m))
        level["hvps_so_far"] = ctx.spent()
        levels.append(level)
        m_used = m
        todo = [e for e in todo if e not in done]
        start = {e: found[e][1] for e in todo}
        m = need
    for end in todo:  # budget spent: the last intervals, not converged
        if end in last:
            done[end] = last[end]
        else:  # spent before any level (e.g. on a curvature approximation): nothing known
            done[end] = dict(value=math.nan, interval=(-math.inf, math.inf), vector=start.get(end),
                             converged=False, solver=math.inf, sampling=math.inf)
    return done, levels, m_used, sizes


def _keep_level_bounds(end: str, exact: dict, level: dict | None) -> dict:
    """An exact-stage end that did not converge, combined with the last level's interval.

    The exact stage's Ritz value is a rigorous inward bound but, unconverged, it has no
    outward side; the last subsample level's interval has a (statistical) outward side.
    Both hold, so the result is their intersection; the estimate stays the exact Ritz
    value (on the full data it errs by about ``residual^2 / gap``, far less than the
    interval's width).  A converged exact end is returned as it is.
    """
    if exact["converged"] or level is None:
        return exact
    (lo_e, hi_e), (lo_l, hi_l) = exact["interval"], level["interval"]
    lo, hi = max(lo_e, lo_l), min(hi_e, hi_l)
    if lo > hi:  # the level's statistical bound is contradicted by the exact Ritz value
        lo, hi = (lo_e, hi_e)
    return dict(exact, interval=(lo, hi), sampling=level["sampling"])


def _warm_sizes(init, N: int, which: str, sample_size: int | None) -> int:
    """First subsample size of a warm-started call.

    When the previous call certified every wanted end on subsamples, the
    smallest of their sizes; when it needed the exact stage for one, its last
    subsample level (whose vectors start the exact stage well; this call's
    start vectors come from the previous one).  Default otherwise.
    """
    if sample_size is not None:
        return sample_size
    if init is None or init.num_samples != N:
        return DEFAULT_SAMPLE
    sizes = {e: init.sample_sizes.get(e, init.sample_size) for e in _ends_of(which)}
    if all(2 * s <= N for s in sizes.values()):
        return max(2, min(sizes.values()))
    return init.levels[-1]["sample_size"] if init.levels else DEFAULT_SAMPLE


def _excesses(ctx: _Context, end: str, pair: tuple, est, m: int) -> tuple[float, float]:
    """Outward bounds beyond the Rayleigh quotient: ``(subsample bound, Kato-Temple)``.

    For ``lambda_max`` the interval is ``(r - s, min(r + e_stat, r + s + e_kt))``
    with ``s = z se``: ``e_stat = theta_S + res_S + spread - r`` does not depend on
    the holdout, ``e_kt = res^2 / gap`` (``inf`` without a gap) comes on top of
    ``s``.  Mirrored for ``lambda_min``.
    """
    theta, _, res, _, _ = pair
    N = ctx.H.num_samples
    se = ctx.z * est.se
    stat = extreme_interval(end, est, theta, res, ctx.z, m, N)
    _, kt, _ = _level_interval(ctx, end, pair, est, m)
    if end == "max":
        return stat[1] - est.value, kt[1] - (est.value + se)
    return est.value - stat[0], (est.value - se) - kt[0]


def _sampling_room(e_stat: float, e_kt: float, target: float) -> float:
    """Largest ``s = z se`` with a half-width within ``target`` (``<= 0``: none).

    Half-width: ``(e_stat + s) / 2`` when the subsample bound binds, ``s + e_kt / 2``
    when Kato-Temple does; the better of the two.
    """
    room = 2 * target - e_stat
    if math.isfinite(e_kt):
        room = max(room, target - e_kt / 2)
    return room


def _next_size(ctx: _Context, end: str, pair: tuple, est, target: float, m: int) -> int:
    """Subsample size at which ``end``'s interval should meet ``target``.

    The subsample bound's excess shrinks like ``1/sqrt(m)`` (its spread and the
    subsample extreme's bias), the Kato-Temple term ``res^2 / gap`` like ``1/m``
    (the full-data residual of a vector found on ``S`` is sampling noise of size
    ``1/sqrt(m)``).  Each is asked to leave 40 % of ``target`` to the holdout's
    sampling error; the smaller of the two predicted sizes is taken, at least
    ``2m`` and at most ``4m``: levels are also the solver's warm starts (a
    Lanczos run on ``4m`` samples started from the vectors of ``m`` needs far
    fewer products than one from scratch, and so does the exact stage started
    from a large subsample's vectors), so no level is skipped on a prediction.
    """
    N = ctx.H.num_samples
    e_stat, e_kt = _excesses(ctx, end, pair, est, m)
    want = m * (max(e_stat, 0.0) / (1.6 * target)) ** 2
    if math.isfinite(e_kt):
        want = min(want, m * max(e_kt, 0.0) / (1.2 * target))
    return int(min(N, 4 * m, max(2 * m, math.ceil(want))))


def _target(ctx: _Context, end: str, centre: float, found: dict, done: dict) -> float:
    """Half-width wanted for ``end``: its tolerance, or the floor relative to ``lambda_max``."""
    top = found["max"][0] if "max" in found else done.get("max", {}).get("value", 0.0)
    return max((ctx.tol if end == "max" else ctx.tol_min) * abs(centre), ctx.floor * abs(top))


def _level_interval(ctx: _Context, end: str, pair: tuple, est, m: int):
    """Interval of one end at a level: ``(interval, kato_temple, kato_temple_binds)``.

    The outward side is the tighter of the subsample bound
    (:func:`curvlab.sampling.extreme_interval`) and Kato-Temple
    (:func:`curvlab.sampling.kato_temple_interval`, with the next eigenvalue
    taken as the subsample's next Ritz value moved outward by its residual: a
    heuristic, as the subsample's second eigenvalue is not a bound on the full
    data's).  Both need the subsample's extreme pair to have settled: met the
    solver's tolerance, or have a residual under a tenth of the sampling spread
    (a residual bounds the distance to *an* eigenvalue, the extreme one only
    once the Krylov space has found it: a search stopped early by the budget
    has not); Kato-Temple needs the next pair settled too.  Otherwise that side
    is infinite.
    """
    theta, _, res, conv, nxt = pair
    N = ctx.H.num_samples
    inf = math.inf if end == "max" else -math.inf
    stat = extreme_interval(end, est, theta, res, ctx.z, m, N)
    # a pair that missed the solver's tolerance is still trusted when its residual is
    # far below the sampling spread (the tolerance could not change the interval)
    noise = 0.1 * ctx.z * est.std / math.sqrt(m) * math.sqrt(max(0.0, 1 - m / N))
    settled = (conv or res <= noise) and end not in ctx.overturned
    if not settled:
        stat = (stat[0], inf) if end == "max" else (inf, stat[1])
    if nxt is None or not settled or not (nxt[2] or nxt[1] <= noise):
        neighbour = inf
    else:
        neighbour = nxt[0] + nxt[1] if end == "max" else nxt[0] - nxt[1]
    kt = kato_temple_interval(end, est, ctx.z, neighbour)
    if end == "max":
        return (stat[0], min(stat[1], kt[1])), kt, kt[1] < stat[1]
    return (max(stat[0], kt[0]), stat[1]), kt, kt[0] > stat[0]


def _certify(ctx: _Context, perm: Tensor, m: int, found: dict, ends: List[str], done: dict,
             spend_all: bool = False) -> dict:
    """Grow a holdout after the subsample until each end's sampling error is small enough.

    Returns ``{end: HoldoutEstimate}``.  The holdout starts at ``m`` samples (at
    least 512, within the budget); after each chunk every end's interval is
    formed (:func:`_level_interval`).  An end whose width is within tolerance,
    or whose subsample-dependent part alone misses it (it needs a larger
    subsample, not a larger holdout), stops there; the others ask for the size
    at which the sampling error fits in the room that part leaves
    (:func:`_sampling_room`, :func:`curvlab.sampling.holdout_size_for`), and only
    their vectors are multiplied on the next chunk.  The holdout at least
    doubles, goes straight to all remaining samples when that is most of them,
    and stays within the budget.  With ``spend_all`` (the last level the budget
    allows), the ends not yet within tolerance grow their holdouts as far as the
    budget left goes (no later level will use it): those with a two-sided
    interval first, as only their width can still shrink; a one-sided end grows
    only when no end is two-sided.
    """
    H, N = ctx.H, ctx.H.num_samples
    rest = N - m
    vectors = {e: found[e][1].to(H.device, H.dtype) for e in ends}
    vectors = {e: v / v.norm() for e, v in vectors.items()}
    accs: dict = {}
    ests: dict = {}
    active = list(ends)
    t = 0
    # the first chunk also multiplies each end's guard vector: the holdout checks the
    # subsample's order (an extreme eigenvector that is weakly represented in S can be
    # S's guard rather than its extreme)
    guards = {e: found[e][4][3].to(H.device, H.dtype) for e in ends
              if found[e][4] is not None and len(found[e][4]) > 3}
    t_next = min(rest, max(m, 512))
    affordable = int(max(0.0, ctx.max_hvps - ctx.spent()) * N / (len(ends) + len(guards)))
    t_next = max(min(t_next, affordable), min(rest, 64))
    group = max(1, min(256, t_next // 32))  # about 32 groups in the first chunk
    ctx.overturned.clear()
    while True:
        T = H.batches.subset(perm[m + t:m + t_next])
        HT = HessianOperator(None, H.loss_fn, T, method=H.method, fmodel=H.fmodel)
        ctx.costs.append(HT.cost)
        rows = [vectors[e] for e in active] + ([g / g.norm() for g in guards.values()] if t == 0 else [])
        part = HT.holdout_statistics(torch.stack(rows), group_size=group)
        for j, e in enumerate(active):
            if e in accs:
                accs[e].merge(part.row(j))
            else:
                accs[e] = part.row(j)
            ests[e] = holdout_estimate(accs[e], 0, found[e][0], found[e][2], m, N)
        if t == 0:
            for j, e in enumerate(guards, start=len(active)):
                g = holdout_estimate(part.row(j), 0, found[e][4][0], found[e][4][1], m, N)
                if _overturns(end=e, extreme=ests[e], guard=g, z=ctx.z):
                    ctx.overturned.add(e)
        t = t_next
        if t >= rest:
            return ests
        wants, two_sided = {}, set()
        for e in active:
            est = ests[e]
            interval, _, _ = _level_interval(ctx, e, found[e], est, m)
            half = (interval[1] - interval[0]) / 2
            target = _target(ctx, e, est.value, found, done)
            if half <= target:
                continue
            if spend_all:
                wants[e] = rest
                if math.isfinite(half):
                    two_sided.add(e)
                continue
            room = _sampling_room(*_excesses(ctx, e, found[e], est, m), target)
            if room >= 0.2 * target:  # else S is too small: no holdout helps
                wants[e] = holdout_size_for(est, ctx.z, 0.9 * room, m, N)
        active = [e for e in active if wants.get(e, 0) > t]
        if spend_all and two_sided:
            active = [e for e in active if e in two_sided]
        if not active:
            return ests
        t_new = min(rest, max(2 * t, int(1.1 * max(wants[e] for e in active))))
        if t_new > 0.6 * rest:
            t_new = rest
        affordable = t + int(max(0.0, ctx.max_hvps - ctx.spent()) * N / len(active))
        t_new = min(t_new, affordable)
        if t_new <= t + 1:
            return ests
        t_next = t_new


def _overturns(end: str, extreme, guard, z: float) -> bool:
    """Whether the holdout puts the subsample's guard vector beyond its extreme one.

    For ``lambda_min``: the guard's unbiased Rayleigh quotient is below the extreme's by
    more than ``z`` standard errors of the difference.  Then ``lambda_min`` is below the
    guard's quotient (Courant-Fischer) and the subsample's extreme pair is not the full
    data's: the outward bounds built on it (subsample extreme, Kato-Temple) do not hold.
    """
    gap = extreme.value - guard.value if end == "min" else guard.value - extreme.value
    return gap > z * math.hypot(extreme.se, guard.se)


def _warm_start(init: ExtremesResult | None, n: int) -> dict:
    """``{end: vector}`` from a previous result (empty without one)."""
    if init is None:
        return {}
    vecs = {e: v.reshape(-1) for e, v in (("max", init.vector_max), ("min", init.vector_min))
            if v is not None}
    if any(v.numel() != n for v in vecs.values()):
        raise ValueError(
            f"init holds vectors of length {next(iter(vecs.values())).numel()} but the model has "
            f"{n} trainable parameters: warm-start only from a result for the same architecture")
    return vecs


def _progress_bar(progress: bool, total: float):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="extremes", unit="hvp", leave=False)
