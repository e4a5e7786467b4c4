"""``curvlab.extremes``: the largest and smallest Hessian eigenvalue of a full-data loss.

This module is the public face of the policy layer: it checks the arguments,
turns a model, a loss and data into a :class:`~curvlab.hvp.HessianOperator`,
hands it to a regime (:mod:`curvlab.solve` for all data,
:mod:`curvlab.multilevel` for subsamples), and packages the answer with its
error bounds and cost.  Everything below it (HVP engine, solvers) is usable on
its own.
"""

from __future__ import annotations

import math
import numbers
import time
from statistics import NormalDist
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .curvature import APPROXIMATIONS
from .functional import FunctionalModel, evaluation_mode
from .hvp import METHODS, HessianOperator
from . import multilevel
from .multilevel import _multilevel, _warm_sizes, _warm_split
from .solve import _approximation_used, _attach_approximation, _Context, _exact, _hvp_samples

__all__ = ["extremes", "ExtremesResult", "CostRecord"]

CURVATURES = ("none",) + APPROXIMATIONS  # the values of extremes(curvature=...)



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
        gradients: the gradient-equivalent work inside ``hvps`` (statistics,
            Gauss-Newton forms, approximations), in full-data gradients: it is
            counted there at half an HVP each, so a benchmark that knows its
            HVP/gradient cost ratio ``c`` reads the call's cost in gradient passes
            (epochs) as ``(hvps - gradients / 2) * c + gradients``.
        phases: ``hvps`` split by where the work went, ``{phase: full-data
            equivalents}`` over :data:`curvlab.solve.PHASES` (phases with no work
            left out): ``search`` (the solver on subsamples), ``certify``
            (holdout statistics), ``exact`` (the full-data operator: the
            all-data stage, or the whole call in the exact regime),
            ``approximation`` (building a curvature approximation) and
            ``rounding`` (the float64 probe).  The values sum to ``hvps``.

    In a torch.distributed job ``forward_samples`` and ``load_passes`` are per rank
    (this rank's loss check and counting pass; they may differ between ranks), while
    ``hvps``, ``samples``, ``passes`` and ``products`` count all ranks together;
    ``seconds`` is this rank's wall time.
    """

    hvps: float
    samples: int
    passes: int
    products: int
    seconds: float
    forward_samples: int = 0
    load_passes: int = 0
    phases: Dict[str, float] = field(default_factory=dict)
    gradients: float = 0.0

    @staticmethod
    def total(costs, num_samples: int, seconds: float, phases=None) -> "CostRecord":
        """The record of ``costs`` (``phases``: the phase of each, as in :data:`~curvlab.solve.PHASES`)."""
        samples = sum(_hvp_samples(c) for c in costs)
        split: Dict[str, float] = {}
        for c, phase in zip(costs, phases, strict=True) if phases is not None else ():
            if _hvp_samples(c) > 0:
                split[phase] = split.get(phase, 0.0) + _hvp_samples(c) / num_samples
        return CostRecord(hvps=samples / num_samples, samples=int(samples),
                          passes=sum(c.passes for c in costs),
                          products=int(sum(c.hvps for c in costs)), seconds=seconds,
                          forward_samples=sum(c.forward_samples for c in costs),
                          load_passes=sum(c.load_passes for c in costs), phases=split,
                          gradients=sum(c.grad_samples for c in costs) / num_samples)


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
        guard_vectors: per end, the unit vector of the next Ritz pair inward at that end's
            last solve (its guard), when there was one.
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
    guard_vectors: dict = field(default_factory=dict, repr=False)

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
             max_hvps: float = 300, max_basis: int = 120, init: ExtremesResult | None = None,
             sampling: str = "auto", sample_size: int | None = None, confidence: float = 0.95,
             seed: int = 0, device=None, dtype: torch.dtype | None = None,
             batch_size: int = 256, method: str = "auto", curvature: str = "none",
             approx_samples: int = 2048, approx_rank: int = 1,
             progress: bool = False, callback: Callable[[dict], None] | None = None,
             output_fn: Callable | None = None, input_key=None, target_key=None,
             strata: int | None = None, proxies: Tensor | None = None
             ) -> ExtremesResult:
    """Largest and smallest eigenvalue of the Hessian of the full-data mean loss.

    Computes the extremes of the spectrum of ``H = (1/N) sum_d hess_x loss(x, d)``
    at the model's current parameters ``x`` (the trainable ones) by Lanczos
    with full reorthogonalisation and thick restarts on exact Hessian-vector
    products (:mod:`curvlab.lanczos`, :mod:`curvlab.hvp`).  An end counts as
    converged only when the next Ritz pair inward has settled too, at the
    tolerance or at a quarter of its distance to the extreme Ritz value (so
    that a Ritz vector mixing a cluster's members is not taken for the
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
            this many vectors of length ``n`` at most, e.g. 9.6 GB for ``n = 10^7`` in
            float32; a run uses only what its products need).  Restarts slow a
            clustered bottom down: at ``c50k-e30`` a subsample's ``lambda_min`` search
            took 139 products at 40 and 73 at 120 (BENCHMARKS.md, "The restart basis");
            searches of under 40 products are unchanged.
        init: a previous :class:`ExtremesResult` (same architecture): its
            eigenvectors start the solver and, subsampled, the smallest of its
            ends' final sample sizes is the first one tried (when it needed all
            data for a wanted end: its last subsample level).  When both ends
            were certified on subsamples at least ``multilevel.POLICY.warm_split`` (2) times
            apart in size (``lambda_max`` early, ``lambda_min`` late, as is usual),
            each end starts at its own previous size: ``lambda_max``'s levels first,
            then ``lambda_min``'s (:func:`curvlab.multilevel._warm_split`, and
            ``POLICY.warm_exact``, ``warm_min_cap`` there).
        sampling: ``"auto"``, ``"exact"`` or ``"multilevel"`` (above).
        sample_size: first subsample size (multilevel).
        confidence: level of the sampling intervals (multilevel).  The level
            is nominal.  The spreads are estimated from the holdout's groups
            (about 32 or more), so the standard errors are widened by Student's
            t at their degrees of freedom.  A holdout that grows after each look
            at its interval is looked at more than once, which lowers the true
            level a little; ``tests/test_holdout.py`` measures 94 % coverage at
            95 % on a synthetic population.
        seed: seeds the random start vectors and subsamples.
        device, dtype: of the computation (default: the model's); e.g.
            ``dtype=torch.float64`` for reference values.
        batch_size: batch size when ``data`` is ``(X, Y)``.
        method: HVP method, ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"`` (see
            :mod:`curvlab.hvp`).
        curvature: the curvature approximation ``C`` that helps the exact solver:
            ``"none"``, ``"diag"`` (GGN diagonal), ``"ggn"`` (generalised
            Gauss-Newton, exact products, low-rank top part) or ``"kfac"``
            (Kronecker-factored).  Its top ``approx_rank`` eigenvectors join the
            start of the one Lanczos run that serves both ends (the Hessian's
            outliers lie close to the Gauss-Newton matrix's top subspace) where
            ``lambda_max`` has no start of its own (a warm start's or a smaller
            subsample level's vector is closer); the bottom is left to that Krylov
            space.  So on a warm start (``init`` with ``vector_max``) no approximation
            is built: the flag changes nothing there.  K-FAC and the diagonal are built
            with a Monte-Carlo Fisher (one backward pass per sample) when the loss is
            softmax cross-entropy.  The answer is always the exact Hessian's; only the
            cost changes, and the build is counted (``cost.phases["approximation"]``).
            Measured on a CIFAR ResNet-8 (BENCHMARKS.md, issue 14; build included):
            ``"kfac"`` costs 0.83-0.91x ``"none"`` for both ends on 512 images and
            1.0x on 50,000 (where ``lambda_min``'s subsample levels set the cost),
            0.93-1.05x for ``lambda_max`` alone (its top eigenvector is a useful
            start; the Monte-Carlo build is half an HVP over ``approx_samples``);
            ``"diag"`` about 1x (coordinate vectors start nothing); ``"ggn"``
            1.0-1.8x (finding its top eigenvector takes about as many products as
            finding the Hessian's).  A ``lambda_min`` search preconditioned by
            ``(C + delta I)^{-1}`` cost 2-4x ``"none"`` and is off
            (:data:`curvlab.solve.APPROX_POLICY`).  No start could do much better:
            the exact top eigenvector, free, leaves 0.79-0.90x of ``"none"`` for
            ``lambda_max`` alone and 0.96-0.98x for both ends (the solver's
            certification and the bottom remain; BENCHMARKS.md, "The floor under any
            start"), so ``"none"``, the default, is the choice unless a measurement on
            the user's own model says otherwise.
        approx_samples: samples the approximation is built from.
        approx_rank: top eigenvectors of the approximation in the start vector
            (1: for ``"kfac"`` within the seeds' scatter of 8, 18.9 against 21.9 and 45.5
            against 44.5 HVPs, and far cheaper for ``"ggn"``, whose build finds that many
            eigenpairs).
        progress: show a progress bar (tqdm) of the products spent.
        callback: called with each solver step's trace entry.
        output_fn: applied to the model's output before ``loss_fn`` (and before
            the curvature approximations see it), e.g. ``lambda out: out[0]`` for
            a model returning ``(logits, extra)`` or ``lambda out: out.logits``.
            A model whose output ``loss_fn`` cannot take raises ``TypeError``
            naming ``output_fn``.
        strata: multilevel regime: the samples are cut into at most this many strata
            by their loss, where Neyman allocation by the loss would gain most (a
            well-fit network's curvature sits on its few poorly fit samples, so its
            largest losses are cut finest; on a weakly fit one the strata come out
            nearly equal; none under ``MultilevelPolicy.stratum_size`` = 32 samples, so
            fewer than 64 samples are not stratified), and ``lambda_min`` is sampled stratum by stratum
            (:mod:`curvlab.strata`): its holdout always (over the samples outside a
            shared uniform subsample, or from all of each stratum), and, at the levels
            it has to itself (``lambda_max`` certified, or not asked for), its subsample
            too, in proportion to the per-stratum spread of the curvature along its
            eigenvector (Neyman allocation, from its last holdout or ``init``'s).
            Unbiased whatever the strata; it lowers the subsample size
            ``lambda_min``'s interval needs where the loss predicts its curvature.
            ``lambda_max`` keeps uniform subsamples and holdouts (its Gauss-Newton control
            variate does far more there).  ``None``: the default (8); ``1``: uniform
            everywhere.  Costs one forward pass over the data when ``lambda_min`` is
            first certified (about a third of an epoch; ``cost.phases["strata"]``;
            skipped under a budget so tight that it would take a tenth of what is
            left, or with a warning when the loss cannot be applied to one sample at a
            time) unless ``proxies`` are given.
        proxies: ``(N,)`` per-sample values to stratify by instead of the losses of
            that forward pass, in the order of ``data`` (e.g. the losses the
            training loop recorded in its last epoch).  Only the strata depend on
            them, never the estimates: stale or poor proxies cost efficiency, not
            correctness.
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
    _check_int("max_basis", max_basis, 1, " (Krylov vectors kept before a restart, e.g. 120)")
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
    # output_fn and dtype are checked by FunctionalModel, loss_fn by HessianOperator,
    # input_key/target_key where the data is wrapped (curvlab.data): all before data is read
    if init is not None and not isinstance(init, ExtremesResult):
        raise TypeError(f"init must be a previous ExtremesResult, got {type(init).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if strata is not None:
        _check_int("strata", strata, 1, " (strata by the per-sample loss, e.g. 8; 1 for none)")
    if proxies is not None and (not isinstance(proxies, Tensor) or proxies.dim() != 1):
        raise ValueError(f"proxies must be a 1-d tensor of per-sample values (N,), got "
                         f"{getattr(proxies, 'shape', type(proxies).__name__)}")
    if proxies is not None and not bool(torch.isfinite(proxies).all()):
        raise ValueError("proxies has non-finite values (nan or inf): give one finite value per sample")

    with evaluation_mode(model):
        fmodel = FunctionalModel(model, dtype=dtype, device=device, output_fn=output_fn)
        H = HessianOperator(None, loss_fn, data, batch_size=batch_size, method=method, fmodel=fmodel,
                            input_key=input_key, target_key=target_key)
        N = H.num_samples
        if proxies is not None and proxies.numel() != N:
            raise ValueError(f"proxies has {proxies.numel()} values but the data has {N} samples: "
                             f"give one per sample, in the data's order")
        v0 = _warm_start(init, fmodel.numel)
        m0 = _warm_sizes(init, N, which, sample_size)
        regime = sampling
        policy = multilevel.POLICY  # (read at the call: tests and benchmarks replace it)
        if sampling == "auto":
            regime = "exact" if N <= policy.exact_factor * m0 else "multilevel"
        bar = _progress_bar(progress, max_hvps)
        ctx = _Context(H=H, which=which, tol=tol, tol_min=tol_min, floor=floor, max_hvps=max_hvps,
                       max_basis=max_basis, seed=seed, bar=bar, callback=callback,
                       z=NormalDist().inv_cdf(0.5 + confidence / 2))
        try:
            if regime == "multilevel":
                ctx.strata, ctx.proxies = policy.strata if strata is None else strata, proxies
                _warm_spreads(ctx, init)
            if init is not None and policy.warm_exact and policy.warm_guard and init.num_samples == N:
                # ends that went to the exact stage last time go there at once (_warm_sizes,
                # _warm_split) and start from their extreme and guard vectors
                ctx.warm_guards = {e: g for e, g in getattr(init, "guard_vectors", {}).items()
                                   if g is not None and e in v0 and init.sample_sizes.get(e, 0) >= N}
            if curvature != "none" and _approximation_used(which, v0):
                _attach_approximation(ctx, curvature, approx_samples, approx_rank)
            if regime == "exact":
                ends = _exact(ctx, H, v0, guards=ctx.warm_guards)
                levels, m_final, sizes = [], N, {e: N for e in ends}
            elif (split := _warm_split(init, N, which, sample_size)) is not None:
                # each end from its own previous size: lambda_max first (lambda_min's floor),
                # with at most half of the budget, so that lambda_min keeps the rest
                ends, levels, sizes = {}, [], {}
                budget = ctx.max_hvps
                for end in ("max", "min"):
                    ctx.max_hvps = ctx.spent() + (budget - ctx.spent()) / 2 if end == "max" else budget
                    found, lv, _, sz = _multilevel(ctx, v0, split[end], ends=[end], known=ends)
                    ends.update(found)
                    levels += lv
                    sizes.update(sz)
                ctx.max_hvps = budget
                m_final = max(sizes.values()) if sizes else m0
            else:
                ends, levels, m_final, sizes = _multilevel(ctx, v0, m0)
        finally:
            if bar is not None:
                bar.close()

    nan = float("nan")
    out = dict(lambda_max=nan, lambda_min=nan, lambda_max_error=nan, lambda_min_error=nan,
               interval_max=(nan, nan), interval_min=(nan, nan), converged_max=False,
               converged_min=False, vector_max=None, vector_min=None)
    parts, guards = {}, {}
    for end, e in ends.items():
        if e.get("guard") is not None:
            guards[end] = e["guard"]
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
                   device=str(fmodel.device), warm_start=bool(v0), rounding=ctx.rounding,
                   strata=len(ctx.design.sizes) if ctx.design else 1)
    cost = CostRecord.total(ctx.costs + [H.cost], N, time.perf_counter() - t0, ctx.phases + ["exact"])
    return ExtremesResult(**out, cost=cost, num_params=fmodel.numel, num_samples=N,
                          sample_size=m_final, sample_sizes=sizes, error_parts=parts, levels=levels,
                          history=ctx.history, options=options, guard_vectors=guards)


SAMPLINGS = ("auto", "exact", "multilevel")


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


def _warm_spreads(ctx: _Context, init) -> None:
    """A warm start's per-stratum spreads along ``lambda_min``'s vector (its last stratified
    level), for the Neyman allocation of this call's first stratified level."""
    for level in reversed(init.levels if init is not None else []):
        end = level["ends"].get("min", {})
        std = tuple(end.get("stratum_std", ()))
        if len(std) > 1 and "min" not in ctx.spreads:
            ctx.spreads["min"] = std
            if end.get("strata_sizes"):  # (mapped onto this call's strata when they are cut)
                ctx.spread_sizes["min"] = tuple(end["strata_sizes"])


def _progress_bar(progress: bool, total: float):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="extremes", unit="hvp", leave=False)
