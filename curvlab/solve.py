"""The exact solve stage of :func:`curvlab.extremes` and what all stages share.

* :class:`_Context`: the full operator, tolerances, budget and trace of one call;
* :func:`_solve_ends`: extreme Ritz pairs of an operator (all data or a subsample)
  for the wanted ends, each with its guard pair, from a start with a random
  component; with a curvature approximation, its start vectors (and, optionally,
  its preconditioner: :class:`ApproxPolicy`);
* :func:`_exact`: all-data Lanczos and its intervals (Courant-Fischer, residual
  norms, the working precision's measured rounding).

Ends are named ``"max"`` and ``"min"`` everywhere inside curvlab; the public
``which`` (``"LA"``, ``"SA"``, ``"both"``, scipy's names) is translated once, by
:func:`_ends_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from .functional import batch_size_of
from .hvp import Cost, HessianOperator
from .trees import _rows_or_none
from .lanczos import lanczos


class Guard(NamedTuple):
    """The next Ritz pair inward at an end: its convergence is the extreme pair's safeguard."""

    theta: float
    residual: float
    converged: bool
    vector: Tensor


class EndPair(NamedTuple):
    """What a solve found at one end (``"max"`` or ``"min"``) of an operator's spectrum.

    ``converged`` is the extreme pair's **and** its guard's convergence; ``guard`` is
    ``None`` only when the operator has a single eigenvalue (``n = 1``); ``threshold`` is
    the extreme pair's residual threshold in the solver's stopping rule (``nan`` when the
    solver does not say).
    """

    theta: float
    vector: Tensor
    residual: float
    converged: bool
    guard: Optional[Guard]
    threshold: float = math.nan


PHASES = ("search", "certify", "exact", "approximation", "rounding", "strata")
"""Where a call's work goes (:attr:`curvlab.CostRecord.phases`): the solver on a subsample
(``search``), holdout statistics that certify its vectors (``certify``), everything on the full
data operator (``exact``: the all-data stage, or the whole call in the exact regime), building
a curvature approximation (``approximation``), the float64 probe of the rounding slack
(``rounding``), and the forward pass whose per-sample losses stratify the samples
(``strata``, :mod:`curvlab.strata`)."""


@dataclass
class ApproxPolicy:
    """How :func:`curvlab.extremes` uses a curvature approximation (``curvature=``).

    The defaults are what paid on the CNN checkpoints of BENCHMARKS.md (issue 14);
    the other settings stay for side-by-side measurements.

    Attributes:
        precondition_min: search ``lambda_min`` by LOBPCG preconditioned with
            ``(C + delta I)^{-1}`` and a Lanczos run of its own, instead of the Krylov
            space shared with ``lambda_max``.  Off: calls with it cost 2-4x those
            without an approximation (the bottom is a cluster of the indefinite part,
            which a positive semi-definite approximation does not resolve).
        precondition_rank: eigenpairs of ``C`` that set the preconditioner's shift
            ``delta`` (the smallest of them), apart from the start vectors' number
            (``extremes(approx_rank=...)``).
        fisher: the output-Hessian factor of K-FAC and the diagonal: ``"mc"`` (one
            sampled label per sample: one backward pass instead of one per output)
            where the loss is softmax cross-entropy with class-index targets, ``"exact"``
            otherwise, in a torch.distributed job (every rank must build the same way),
            or when set so.
    """

    precondition_min: bool = False
    precondition_rank: int = 8
    fisher: str = "mc"


APPROX_POLICY = ApproxPolicy()


def _hvp_samples(cost: Cost) -> float:
    """Per-sample HVP equivalents of a cost counter (statistics count half)."""
    return cost.samples + cost.grad_samples / 2


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
    phases: List[str] = field(default_factory=list)  # the stage of each of costs (PHASES)
    history: List[dict] = field(default_factory=list)
    approx: object = None  # a curvature approximation (curvlab.curvature), or None
    approx_vectors: Optional[Tensor] = None
    approx_shift: float = 0.0
    overturned: set = field(default_factory=set)  # ends whose subsample order the holdout reversed
    rounding: str = "none"  # how the exact stage's rounding slack was found (_rounding_slack)
    strata: int = 1  # strata for lambda_min's levels (curvlab.strata); 1: uniform
    proxies: Optional[Tensor] = None  # per-sample values to stratify by (None: the losses)
    design: object = None  # lambda_min's stratified design once made (False: none)
    spreads: dict = field(default_factory=dict)  # end -> per-stratum spreads (a warm start's)
    spread_sizes: dict = field(default_factory=dict)  # end -> the strata sizes they were measured on
    warm_guards: dict = field(default_factory=dict)  # end -> a warm start's guard vector (_exact)

    def spent(self) -> float:
        """Full-data HVP equivalents spent so far."""
        return sum(_hvp_samples(c) for c in self.costs + [self.H.cost]) / self.H.num_samples

    def book(self, cost: Cost, phase: str) -> Cost:
        """Count ``cost`` (an operator's counter, filled later too) in the call's cost, under ``phase``."""
        assert phase in PHASES, phase
        self.costs.append(cost)
        self.phases.append(phase)
        return cost

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
    """Extreme Ritz pairs of ``op`` for ``ends``: ``{end: EndPair}``.

    :class:`EndPair` holds the extreme Ritz pair and the next one inward at that end
    (the :class:`Guard`).  An end counts as converged only when its extreme pair **and** its guard
    met the tolerance: a residual bound ``||H v - theta v||`` places *an* eigenvalue near
    ``theta``, and where the end is clustered a Ritz vector that mixes the two outermost
    eigenvectors passes a loose residual test long before it has found the extreme one.
    Asking for the guard to settle too keeps the Krylov space growing until the cluster's
    outer members are resolved (the extreme converges first, as its polynomial
    amplification is the largest).  The guard settles at the tolerance (with a quarter of the
    ``floor`` term, not the whole) or, once the basis holds more than ``2 k`` Ritz values, at
    a quarter of its distance to the extreme Ritz value, whichever is looser
    (``lanczos(guard=True)``): an isolated extreme needs its neighbour only roughly, a
    cluster tighter than the tolerance gets no relief, and a floor above the end's spacing
    does not let an interior mix and its neighbour pass together.

    Start vectors (a warm start, or an approximation's candidates) never start the
    search alone: a random unit vector is added to them (:func:`_start_vector`).  A warm
    start that is (close to) an interior eigenvector represents the extreme one weakly or
    not at all, and a Krylov space from it alone would settle on that interior
    eigenvalue.  With no start vector, one random vector starts the run.

    One Lanczos run serves both ends, from the start vectors (summed) plus the random
    component.  With an approximation (``ctx.approx``), its top eigenvectors join the
    start when ``lambda_max`` has no start vector of its own (the Hessian's outliers lie
    close to the Gauss-Newton matrix's top subspace; a vector from a smaller level or the
    previous call is closer, and a sum would dilute it), and the bottom is left to the
    same Krylov space.  Only with ``APPROX_POLICY.precondition_min`` (off by default: it
    cost more than the shared space on every checkpoint measured, BENCHMARKS.md, issue 14) does
    ``lambda_max`` get its own run and ``lambda_min`` a LOBPCG run
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
        return lanczos(op.matvec, op.n, which=which, k=k, X0=_start_vector(rows, op, ctx.seed),
                       tol=tols, max_matvecs=max(budget, 2), max_basis=ctx.max_basis, guard=True,
                       **common)

    pairs = {"min": (0, 1), "max": (-1, -2)}
    if ctx.approx is None or not APPROX_POLICY.precondition_min:
        which = "both" if len(ends) == 2 else ("SA" if ends == ["min"] else "LA")
        # one Krylov space serves both ends, from the known vectors (for lambda_max without
        # one, the approximation's top eigenvectors) plus a random one
        rows = [start[e] for e in ends if e in start]
        if ctx.approx is not None and "max" in ends and "max" not in start:
            rows += list(ctx.approx_vectors.to(op.device, op.dtype))
        res = run(which, rows, max_matvecs)
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
        X0 = start["min"].reshape(-1, op.n) if "min" in start else None  # (a warm guard: 2 rows)
        left = max_matvecs - (share if "max" in ends else 0)
        # LOBPCG gets half of what is left; its vectors start the Lanczos run that answers
        res = lobpcg(op.matvec, op.n, which="SA", k=min(k, op.n), X0=X0,
                     precond=lambda V: ctx.approx.inverse(V, delta), tol=tols[0],
                     max_matvecs=max(2 * k, left // 2), **common)
        res = run("SA", [res.vectors[0]], left - res.matvecs)
        out["min"] = _pair(res, *pairs["min"])
    return out


RANDOM_SHARE = 0.1  # norm of the random component of a start vector (see _start_vector)


def _random_row(op: HessianOperator, seed: int) -> Tensor:
    """A unit Gaussian row ``(1, n)`` seeded by ``seed`` (independent of the solver's own)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    row = torch.randn(1, op.n, generator=g, dtype=torch.float64)
    return (row / row.norm()).to(op.device, op.dtype)


def _start_vector(rows: list, op: HessianOperator, seed: int) -> Tensor | None:
    """``unit(sum of the unit rows) + RANDOM_SHARE * random unit row``, or ``None``.

    The random part keeps every eigenvector's component generic: a Krylov space from
    ``u + eps g`` contains ``(H - lambda I) K(H, g)`` for an eigenvector ``u`` of
    ``lambda``, whatever ``eps``, so a start vector that is an interior eigenvector costs
    one step and hides nothing.  ``eps`` is small so that a start near the wanted
    extreme keeps its head start (its Rayleigh quotient moves by about ``eps^2``
    relative), and large enough that ``g``'s components, ``eps / sqrt(n)``, stay far
    above float32 rounding for any network size.
    """
    if not rows:
        return None
    known = torch.cat([r.reshape(-1, op.n).to(op.device, op.dtype) for r in rows])
    known = known / known.norm(dim=1, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
    v = known.sum(0)
    v = v / v.norm() if float(v.norm()) > 0 else known[0]
    return v + RANDOM_SHARE * _random_row(op, seed)[0]


def _pair(res, i: int, j: int) -> EndPair:
    """The :class:`EndPair` of a solver result's pair ``i`` with guard pair ``j``."""
    m = res.values.numel()
    guard = None
    conv = bool(res.converged[i])
    if m > 1 and j % m != i % m:
        guard = Guard(float(res.values[j]), float(res.residual_norms[j]), bool(res.converged[j]),
                      res.vectors[j])
        conv = conv and guard.converged
    thr = math.nan if res.thresholds is None else float(res.thresholds[i])
    return EndPair(float(res.values[i]), res.vectors[i], float(res.residual_norms[i]), conv, guard, thr)


def _approximation_used(which: str, warm: dict) -> bool:
    """Whether :func:`_solve_ends` would use a curvature approximation in a call for ``which``
    with warm-start vectors ``warm`` (``{end: vector}``): as ``lambda_max``'s start when it
    has none of its own, or as ``lambda_min``'s preconditioner under
    ``APPROX_POLICY.precondition_min``.  Where it would not, it is not built."""
    ends = _ends_of(which)
    return ("max" in ends and "max" not in warm) or ("min" in ends and APPROX_POLICY.precondition_min)


def _attach_approximation(ctx: _Context, name: str, samples: int, rank: int) -> None:
    """Build the curvature approximation on ``samples`` samples and its top eigenpairs.

    Its top ``rank`` eigenvectors join ``lambda_max``'s start (:func:`_solve_ends`); the
    preconditioner's shift, used only with ``APPROX_POLICY.precondition_min``, comes from
    the top ``APPROX_POLICY.precondition_rank``.  K-FAC and the diagonal are built with a
    Monte-Carlo Fisher (``APPROX_POLICY.fisher``) where the loss is softmax cross-entropy,
    exactly otherwise.
    """
    from .curvature import build_curvature
    from .curvature.base import MonteCarloFisherUnsupported

    H = ctx.H
    cost = ctx.book(Cost(), "approximation")
    precondition = APPROX_POLICY.precondition_min and "min" in _ends_of(ctx.which)
    pairs = min(max(rank, APPROX_POLICY.precondition_rank) if precondition else rank, H.n)
    options = {}
    if name == "ggn":  # its own Lanczos, kept cheap: a start needs its top vectors roughly
        options = {"rank": pairs, "max_matvecs": 8 * pairs + 20}
    elif name in ("kfac", "diag"):
        # in a torch.distributed job the exact factor: every rank must take the same branch,
        # and a rank may hold none of the build's batches (it could not check the loss)
        parallel = getattr(H.parallel, "enabled", False) and H.parallel.world_size > 1
        options = {"fisher": "exact" if parallel else APPROX_POLICY.fisher}

    def build(**extra):
        return build_curvature(name, H.fmodel, H.loss_fn, H.parallel, max_samples=samples,
                               seed=ctx.seed, cost=cost, **dict(options, **extra))

    try:
        approx = build()
    except MonteCarloFisherUnsupported:
        approx = build(fisher="exact")  # not softmax cross-entropy: the exact factor
    values, vectors = approx.top_eigenpairs(pairs)
    ctx.approx, ctx.approx_vectors = approx, vectors[:min(rank, H.n)]
    ctx.approx_shift = _precond_shift(values[:min(APPROX_POLICY.precondition_rank, pairs)], ctx.floor)


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


def _exact(ctx: _Context, H: HessianOperator, v0, ends: List[str] | None = None,
           guards: dict | None = None) -> dict:
    """Full-data Lanczos; intervals from Courant-Fischer, residual norms and rounding.

    ``guards``: ``{end: vector}``, a warm start's guard vectors, added to that end's start
    vector (``MultilevelPolicy.warm_guard``: the start is the normalised sum of the previous
    extreme and guard vectors, plus the random component of :func:`_start_vector`).

    A converged end (its guard pair converged too, see :func:`_solve_ends`) gets
    ``(theta - slack, theta + e + slack)`` for ``lambda_max`` and
    ``(theta - e - slack, theta + slack)`` for ``lambda_min``, where ``slack`` is the
    arithmetic's own error (:func:`_rounding_slack`) and ``e`` the residual norm, or the
    stopping threshold where the end stopped on an absolute threshold (a ``floor``) or its
    extreme and guard pairs are not resolved (:func:`_outward_radius`).  An end that did not converge
    (budget) keeps its inward side only: its outward side is open, since a residual
    bound certifies *an* eigenvalue near ``theta``, not the extreme one.
    """
    ends = ends or _ends_of(ctx.which)
    budget = ctx.max_hvps - ctx.spent()
    if guards:
        v0 = {e: (torch.stack([v.reshape(-1), guards[e].reshape(-1).to(v.device, v.dtype)])
                  if e in guards else v) for e, v in v0.items()}
    found = _solve_ends(ctx, H, ends, v0, 1.0, budget)
    scale = max(abs(f.theta) for f in found.values())
    slack = _rounding_slack(ctx, H, {e: f.vector for e, f in found.items()}, scale)
    out = {}
    for end, pair in found.items():
        theta, vec, conv = pair.theta, pair.vector, pair.converged
        s = slack[end] + H.n ** 0.5 * _unit_roundoff(H.dtype) * (abs(theta) + 1e-3 * scale)
        e = _outward_radius(end, pair, ctx.tol_min if end == "min" else ctx.tol)
        if end == "max":
            interval = (theta - s, theta + e + s if conv else math.inf)
        else:
            interval = (theta - e - s if conv else -math.inf, theta + s)
        out[end] = dict(value=theta, interval=interval, vector=vec, converged=conv,
                        solver=e + s if conv else math.inf, sampling=0.0,
                        guard=pair.guard.vector if pair.guard is not None else None)
    return out


def _outward_radius(end: str, pair: EndPair, tol: float) -> float:
    """How far beyond its Ritz value a converged end's eigenvalue may lie.

    The residual norm when the end's stopping threshold was its relative tolerance ``tol``
    and the extreme pair and its guard are resolved (their intervals ``theta +- res``
    disjoint: two distinct eigenvalues found at that end, the guard's rule of
    :func:`_solve_ends`).  Otherwise the larger of the residual and the stopping threshold,
    the error the call asked for: where the threshold is an absolute one (``floor *
    |lambda_max|`` above ``tol * |theta|``, e.g. an end near zero, or a ``floor`` above the
    spacing of the eigenvalues there), a few Krylov steps pass every test while the Ritz
    value is still an interior mix, and a residual interval holds *an* eigenvalue, not the
    extreme one; the same where the two pairs overlap (a cluster tighter than the
    tolerance).  BENCHMARKS.md, "An exact-stage interval at a floor".
    """
    res, g, thr = pair.residual, pair.guard, pair.threshold
    if not math.isfinite(thr):
        return res
    relative = thr <= tol * abs(pair.theta) * (1 + 1e-9)
    resolved = g is None or (pair.theta + res < g.theta - g.residual if end == "min"
                             else g.theta + g.residual < pair.theta - res)
    return res if relative and resolved else max(res, thr)


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
    HVPs per vector and rank (float64 counted double), counted.  When the budget cannot
    pay it, the first batch cannot be cut, or the model does not run in float64, the
    a-priori bound ``sqrt(n) u scale`` (``scale``: the largest ``|theta|``) is used
    instead; ``ctx.rounding`` (``result.options["rounding"]``) says which.
    """
    if H.dtype == torch.float64 or not vectors:
        ctx.rounding = "float64"
        return {e: 0.0 for e in vectors}
    a_priori = {e: H.n ** 0.5 * _unit_roundoff(H.dtype) * scale for e in vectors}
    if ctx.spent() + 3 * len(vectors) * probe * H.parallel.world_size / H.num_samples > ctx.max_hvps:
        ctx.rounding = "a priori (budget)"
        return a_priori
    V = torch.stack([v.reshape(-1) for v in vectors.values()]).to(H.device, H.dtype)
    V = V / V.norm(dim=1, keepdim=True)
    # per vector the difference, then the ranks that measured and their samples: summed over
    # ranks (each probes its own first batch), so that every rank gets the same slack and cost
    out = torch.zeros(len(V) + 2, dtype=torch.float64, device=H.device)

    def measure():
        for x, y in H.parallel.local:
            nb = batch_size_of(x)
            if nb > 0:
                break
        else:
            return
        x, y = _rows_or_none(x, slice(0, probe), nb), _rows_or_none(y, slice(0, probe), nb)
        if x is None or y is None:
            return  # a batch that cannot be cut: no probe (a whole batch in float64 may not fit)
        work = HessianOperator(None, H.loss_fn, [(x, y)], method=H.method, fmodel=H.fmodel,
                               distributed=False)
        hv = work.matvec(V).double()
        try:
            ref = HessianOperator(H.fmodel.module, H.loss_fn, [(x, y)], method=H.method,
                                  dtype=torch.float64, device=H.device, distributed=False,
                                  output_fn=H.fmodel.output_fn)
            diff = (hv - ref.matvec(V.double())).norm(dim=1)
        except Exception:  # a model that cannot run in float64: the a-priori bound instead
            return
        out[:-2] = diff
        out[-2:] = torch.tensor([1.0, work.num_samples], dtype=torch.float64)

    H.parallel.sum_(measure, out)
    ctx.book(Cost(samples=3 * len(V) * int(out[-1]), passes=2), "rounding")  # float64 counts double
    if float(out[-2]) == 0.0:
        ctx.rounding = "a priori (no probe)"
        return a_priori
    ctx.rounding = "measured"
    diff = out[:-2] / out[-2]
    return {e: 3.0 * float(d) for e, d in zip(vectors, diff)}
