"""The multilevel regime of :func:`curvlab.extremes`: search on a subsample, certify on a holdout.

See :func:`_multilevel` for the method and :mod:`curvlab.sampling` for the
statistics it rests on (holdout Rayleigh quotients, Kato-Temple bounds).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from .sampling import (extreme_interval, guard_overturns, holdout_estimate,
                       holdout_size_for, kato_temple_interval, predicted_estimate, sampling_room,
                       span_subsample_se, stratified_estimate, subsample_se)
from .loop import Cost
from .strata import Design, StratifiedOperator, remap_spreads
from .solve import EndPair, _Context, _ends_of, _exact, _hvp_samples, _solve_ends

_FORM = _hvp_samples(Cost(grad_samples=1))
"""What one per-sample Gauss-Newton form (a forward-mode pass, booked as a gradient) costs in
per-sample HVPs, as the cost record and the budget count it."""


@dataclass(frozen=True)
class MultilevelPolicy:
    """The multilevel regime's constants, in one place (the defaults are what the
    figures in BENCHMARKS.md were measured with, except where it says otherwise).

    Attributes:
        first_size: the first subsample size when neither ``sample_size`` nor a warm
            start says otherwise.
        exact_factor: ``sampling="auto"`` solves exactly when ``N <= exact_factor *
            first size`` (subsampling cannot save much there).
        search_tol: a subsample search runs to this fraction of the tolerance (its
            error then leaves room for the holdout's).
        search_budget: the share of the remaining budget a search may spend.
        level_products: products on ``S`` a level must afford, beside
            ``chunk_products`` per end for the first holdout chunk; under a tight
            budget the subsample shrinks to fit.
        chunk_products: see ``level_products``.
        min_size: the smallest subsample a tight budget shrinks a level to.
        min_growth, max_growth: the next level's size is ``min_growth`` to
            ``max_growth`` times the last (levels are warm starts: none is skipped on
            a prediction); the exact stage follows once it would pass ``N / 2``.
        exact_products: products per end the exact stage needs to improve on the last
            level's intervals; with less left the call stops there.
        holdout_share: the share of an end's target half-width left to the holdout's
            sampling error when the next subsample size is predicted.
        first_chunk, min_chunk: the first holdout chunk is ``max(m, first_chunk)``
            samples, at least ``min_chunk`` however tight the budget.
        groups, max_group: holdout products are taken in about ``groups`` groups of
            at most ``max_group`` samples in the first chunk (their spread gives the
            standard errors).
        min_room: an end whose sampling room is below this fraction of its target
            needs a larger subsample, not a larger holdout.
        room_use, chunk_margin: a holdout aims at ``room_use`` of that room, and asks
            ``chunk_margin`` times the size the prediction gives.
        all_rest: a holdout that would take more than this share of the samples
            outside ``S`` takes all of them.
        settle_noise: a subsample pair that missed the solver's tolerance is still
            trusted when its residual is below this fraction of the sampling spread.
        control_variate: ``lambda_max``'s holdout may use the Gauss-Newton part of
            the quadratic form as a control variate (:func:`_certify`; the figures
            of BENCHMARKS.md before its issue-13 "control variate" rows were
            measured without it).
        strata: strata by the per-sample loss for ``lambda_min``'s own levels
            (:mod:`curvlab.strata`; 1: uniform, no forward pass);
            ``extremes(strata=...)`` overrides it.
        strata_cut, stratum_size: how the strata are cut
            (:func:`curvlab.estimators.proxy_strata`): ``"optimal"`` (the edges that
            minimise the Neyman standard error of the loss itself, none under
            ``stratum_size`` samples) or ``"equal"`` (equal sizes: the rule before
            BENCHMARKS.md's "Where to cut the strata").
        stratum_min: the fewest subsample draws a stratum gets.
        stratum_holdout, stratum_groups: the fewest holdout samples, and holdout
            groups, a stratum gets (its spread is estimated from its own groups).
        residual_blocks: holdout groups are dealt into at most this many blocks per
            stratum, whose spread in every direction bounds the Kato-Temple residual
            (:func:`curvlab.sampling.residual_margin`); each block keeps a copy of the
            holdout's vectors (16 and 32 gave bounds within 5 % of each other, BENCHMARKS.md).
        span_spread: the subsample bound's spread is the largest over the span of the
            extreme and guard vectors (:func:`curvlab.sampling.span_subsample_se`), not the
            extreme vector's own (which understates the extreme eigenvector's when ``S``
            under-represents it; an end without a guard keeps its own; ``False`` only to
            measure what that costs).
        strata_budget: the stratifying forward pass (a sixth of a full-data HVP) is
            skipped when it would take more than this share of ``max_hvps``.
        gap_decay: how the part of a level's excess that is not the subsample spread (the
            gap ``|r - theta_S|`` between the holdout's Rayleigh quotient and the subsample's
            Ritz value, and the search's residual) is predicted to shrink with the subsample
            size: by ``f^(2 gap_decay)``, ``f`` the ratio of the standard errors at the two
            sizes (:func:`_excess_at`).  1: like the subsample extreme's bias and the Rayleigh
            quotient's excess of a vector found on ``S``, both second order in the sampling
            noise; 0.5 scales it like the spread (near the rule before BENCHMARKS.md's "How
            the gap shrinks", which scaled the whole excess by ``sqrt(m / m')``, without the
            finite-population factor, and divided the predicted size by the Neyman gain).
            At least 0.
        half_level, half_margin: when the next size passes ``N / 2`` after a level of at
            most ``N / 4``, run one level on ``N / 2`` images before the exact stage if the
            budget affords it and every end left is predicted to meet its target there, within
            ``half_margin`` times it, on the tighter of its two sides (the subsample bound's,
            :func:`_half_prediction`, and Kato-Temple's, :func:`_half_kato_temple`;
            BENCHMARKS.md, "The subsample bound's spread over the extreme and guard span", "A
            half level when it is predicted to pass" and "The half level's two sides").
        warm_split: a warm call splits its ends (:func:`_warm_split`) when the previous
            call's sizes are at least this many times apart (4, ``max_growth``, until
            BENCHMARKS.md's "Warm calls at the retrained c50k-e15").
        warm_min_shrink: a warm call whose ends are split (:func:`_warm_split`)
            starts ``lambda_min`` at its previous size over this (1: at it; 2 was
            measured and cost more on average, BENCHMARKS.md).
        warm_exact: an end that the previous call solved in the exact stage or on a half
            level (its ``sample_sizes`` entry ``N``, or its last level ``half_level``) goes
            straight to the exact stage, from the previous call's vector, rather than
            climbing the subsample levels again: when every
            wanted end went there (:func:`_warm_sizes`), or when ``lambda_min`` did and
            ``lambda_max`` ended under ``N / 2`` (:func:`_warm_split`; other mixes climb as
            before).  Where sampling could not certify an end one epoch ago, its levels
            are mostly a start for the exact stage, and the previous exact stage's vector
            is another.  Under a budget too small for that stage, such an end comes back
            with its inward side only (no level's statistical interval to fall back on).
        warm_min_cap: a fraction of ``N`` (0.4), or ``None`` (off).  A previous
            ``lambda_min`` that ended (converged or not) on a level above
            ``warm_min_cap * N`` (short of all ``N``) is taken as one that sampling could
            barely certify (the previous call's size rule put it just under ``N / 2``): a
            warm call that wants ``lambda_min`` treats it as it treats a half level
            (:func:`_last_sizes`), climbing with both ends from the previous call's last
            level at or under the cap (:func:`_climb_start`) rather than starting
            ``lambda_min`` at that size (or, with ``warm_exact``, in the exact stage).  Such
            a level's search runs long on a clustered bottom, and when ``|lambda_min|``
            shrinks between epochs its target shrinks with it and the level falls short.
            At ``c50k-e30`` from ``c50k-e29``'s call (``lambda_min`` -0.605 -> -0.302,
            accepted at 24,428 images) the warm call cost 250 epochs without the cap and
            185 with it (154 cold; BENCHMARKS.md, "A cap on lambda_min's warm size"); no
            other measured warm call started ``lambda_min`` over 0.4 N.
        warm_guard: with ``warm_exact``, that exact stage starts from the previous call's
            extreme **and** guard vectors (their normalised sum, plus the random part):
            the guard's neighbour need not be found again from the random part.  Only for
            an end the previous call solved in the exact stage (a half level's guard is
            its subsample's, and the extreme vector alone starts it).
    """

    first_size: int = 2048
    exact_factor: int = 4
    search_tol: float = 0.5
    search_budget: float = 0.5
    level_products: int = 12
    chunk_products: int = 2
    min_size: int = 64
    min_growth: int = 2
    max_growth: int = 4
    exact_products: int = 2
    holdout_share: float = 0.4
    first_chunk: int = 512
    min_chunk: int = 64
    groups: int = 32
    max_group: int = 256
    min_room: float = 0.2
    room_use: float = 0.9
    chunk_margin: float = 1.1
    all_rest: float = 0.6
    settle_noise: float = 0.1
    control_variate: bool = True
    strata: int = 8
    strata_cut: str = "optimal"
    stratum_size: int = 32
    stratum_min: int = 8
    stratum_holdout: int = 16
    stratum_groups: int = 8
    residual_blocks: int = 16
    span_spread: bool = True
    strata_budget: float = 0.1
    warm_min_shrink: int = 1
    warm_split: float = 2.0
    warm_exact: bool = False
    warm_guard: bool = False
    warm_min_cap: float | None = 0.4
    gap_decay: float = 1.0
    half_level: bool = True
    half_margin: float = 1.25

    def __post_init__(self):
        # a negative decay would make the predicted excess grow with the size (the size rule's
        # bisection assumes it shrinks); growth bounds out of order leave no size to choose
        if not (isinstance(self.gap_decay, (int, float)) and math.isfinite(self.gap_decay)
                and self.gap_decay >= 0):
            raise ValueError(f"MultilevelPolicy.gap_decay must be a finite number >= 0, got "
                             f"{self.gap_decay!r}")
        if self.warm_min_cap is not None and not (isinstance(self.warm_min_cap, (int, float))
                                                  and 0 < self.warm_min_cap < 0.5):
            raise ValueError(f"MultilevelPolicy.warm_min_cap must be None or a fraction of N in "
                             f"(0, 0.5), got {self.warm_min_cap!r}")
        if not 1 <= self.min_growth <= self.max_growth:
            raise ValueError(f"MultilevelPolicy needs 1 <= min_growth <= max_growth, got "
                             f"{self.min_growth} and {self.max_growth}")


POLICY = MultilevelPolicy()
DEFAULT_SAMPLE = POLICY.first_size


def _multilevel(ctx: _Context, v0, m: int, ends: List[str] | None = None, known: dict | None = None):
    """Search on a subsample, certify on a holdout; grow the subsample only when needed.

    ``ends``: the ends to find (default: those of ``ctx.which``); ``known``: ends
    already found (``{end: entry}``; ``lambda_max``'s value sets ``lambda_min``'s
    floor), returned with the others.

    At a level with subsample ``S`` (the first ``m`` samples of a random
    permutation, a fresh one at every level; for ``lambda_min`` alone, ``m_h`` samples
    of each stratum by loss, :mod:`curvlab.strata`):

    1. **search**: Lanczos on ``H_S`` (warm-started), two Ritz pairs per wanted
       end, to half the tolerance, with at most half the remaining budget;
    2. **certify** on a holdout ``T`` drawn from the samples after ``S`` in that
       permutation (for a stratified ``S``, from all of each stratum in an order of its
       own; sample splitting: ``T`` is independent of the vectors found on ``S``), grown in
       chunks until the sampling part of each interval is within tolerance or
       ``T`` is everything outside ``S`` (then the Rayleigh quotient is exact):
       group products ``H_g v`` give the unbiased full-data Rayleigh quotient
       ``r`` with its standard error ``se``, and an upper confidence bound on the
       full-data residual ``||H v - r v||`` (:func:`curvlab.sampling.residual_margin`;
       the holdout also grows for it, :func:`_wanted_holdout`); at the
       top, when it is the cheaper, the Gauss-Newton part ``v^T G_d v`` of each
       sample's quadratic form is a control variate: its exact mean outside
       ``S`` (one forward-mode pass, about a gradient per sample against three
       for an HVP) plus the holdout mean of ``v^T (H_d - G_d) v``, which spreads
       far less where the Gauss-Newton part carries the outliers
       (:func:`_control_variate_pays`);
    3. **interval**, for ``lambda_max`` (mirrored for ``lambda_min``): below,
       ``r - z se`` (Courant-Fischer: ``lambda_max >= r``); above, the tighter of
       the subsample bound ``theta_S + res_S + z sigma / sqrt(m)`` (the top
       eigenvector's curvature on ``S`` cannot exceed the subsample's extreme)
       and Kato-Temple ``r + z se + res^2 / (r - lambda_2)``, whose quadratic
       term makes an isolated outlier cheap to certify (``lambda_2`` bounded
       from the subsample's second Ritz pair);
    4. an end is done when its half-width is within tolerance.  Otherwise the
       subsample-dependent part of its width decides the next size (its spread shrinking
       like ``1/sqrt(m)``, its gap like ``1/m``: :func:`_next_size`; at least ``2m``, at
       most ``4m``); once ``m' > N/2`` the
       remaining ends are solved exactly on all data, after one level on ``N/2``
       samples when the last level was at most ``N/4``, the budget affords it, and every
       end left is predicted to pass there (:func:`_half_prediction`,
       :func:`_half_kato_temple`, ``POLICY.half_level``).

    When the budget (``max_hvps``) runs out, the ends not done are returned
    with their last intervals and ``converged = False``.  A level's subsample
    is shrunk, if needed, so that a dozen products on it and a first holdout
    chunk of its size fit the budget left; a level that would then be
    smaller than twice the last one is not started.  The last level the budget
    allows spends what is left on its holdout, up to all samples outside
    its subsample (a tighter inner side and estimate of the vector it found),
    unless an exact stage could still follow it.
    """
    H, N = ctx.H, ctx.H.num_samples
    todo = list(ends) if ends is not None else _ends_of(ctx.which)
    # end -> per-stratum spreads along its vector (Neyman): the warm start's, mapped onto this
    # call's strata when they are made (_min_design), then each level's
    spreads = ctx.spreads
    done: dict = dict(known or {})
    last: dict = {}
    sizes: dict = {}
    levels: List[dict] = []
    start, m_used = v0, m
    ahead: dict = {}  # end -> its predicted half-width on N/2 images over its target
    while todo:
        remaining = ctx.max_hvps - ctx.spent()
        if remaining <= 0:
            break
        # one level on half the images first when every end left should pass there and the
        # budget affords that level whole (a smaller one is not what was predicted to pass)
        half = (2 * m > N and POLICY.half_level and levels and 4 * m_used <= N
                and all(e in ahead and ahead[e] <= POLICY.half_margin for e in todo)
                and _fits(remaining, N, len(todo)) >= N // 2)
        if half:
            m = N // 2
        if 2 * m > N:
            if last and remaining < POLICY.exact_products * len(todo):
                break  # too little left for the exact stage to improve on the last intervals
            # (a warm start's guard vectors only where this call's levels gave no start)
            for end, entry in _exact(ctx, H, start, todo, ctx.warm_guards if not levels else None).items():
                done[end] = _keep_level_bounds(end, entry, last.get(end))
            sizes.update({e: N for e in todo})
            return done, levels, N, sizes
        # a level should fit the budget left: a dozen products on S and a first holdout
        # chunk of m per end; under a tight budget the subsample shrinks to fit (a warm
        # start's vectors then get a few Krylov steps rather than none)
        fit = _fits(remaining, N, len(todo))
        if fit < m:
            if last and fit < POLICY.min_growth * m_used:
                break  # a level that fits would not be larger than the last one
            m = max(fit, min(POLICY.min_size, N // 2))
        # the last level the budget allows: the next, at least 2m, would not fit even with
        # all that is left now, and no exact stage can follow (the next size, at most 4m,
        # stays within N/2, or too little is left for the exact stage to run): its holdout
        # may spend everything left
        final = fit < POLICY.min_growth * m and (2 * POLICY.max_growth * m <= N
                                                 or remaining < POLICY.exact_products * len(todo))
        # lambda_min alone: a stratified subsample, Neyman for the spreads its vector showed
        # last (proportional before any); otherwise a uniform one, from a fresh permutation at
        # every level: continuing the last one, this S would
        # take its new samples from the last holdout, and this holdout would reuse its tail,
        # both chosen by whether that holdout let the level pass (e.g. lambda_min's level
        # fails when its Rayleigh quotient sat high: an S made of those samples would put the
        # subsample bound too high)
        design = (_min_design(ctx) if todo == ["min"] else None) or Design.uniform(
            N, torch.Generator().manual_seed(ctx.seed + 1 + 7919 * len(levels)))
        if design.stratified:  # a fresh holdout order at every level (the last one chose this S)
            design = design.reshuffled(torch.Generator().manual_seed(ctx.seed + 3 + len(levels)))
        alloc = design.allocate(m, spreads.get("min"), minimum=POLICY.stratum_min)
        m = sum(alloc)
        if design.stratified:
            parts = [H.subset(design.part(h, 0, a)) for h, a in enumerate(alloc)]
            for p in parts:
                ctx.book(p.cost, "search")
            HS = StratifiedOperator(parts, design.weights)
        else:
            HS = H.subset(design.take(alloc))
            ctx.book(HS.cost, "search")
        found = _solve_ends(ctx, HS, todo, start, POLICY.search_tol, POLICY.search_budget * remaining, k=2)
        # a level after which the exact stage may come (the next size, at least min_growth m,
        # would pass N/2) leaves it its products: its holdout grows on a prediction, which a
        # larger holdout may not bear out
        reserve = (POLICY.exact_products * len(todo)
                   if not final and 2 * POLICY.min_growth * m > N else 0.0)
        ests = _certify(ctx, design, alloc, found, todo, done, spend_all=final, spreads=spreads,
                        reserve=reserve)
        level = {"sample_size": m, "ends": {}}
        if half:  # (a stratified allocation may fall short of N/2: the warm start's test needs this)
            level["half_level"] = True
        short: dict = {}  # end -> target, for the ends not yet within it
        if design.stratified:
            level["allocation"] = list(alloc)
        need = m
        ahead = {}
        for end in todo:
            pair = found[end]
            theta, vec, res = pair.theta, pair.vector, pair.residual
            est = ests[end]
            interval, kt, _ = _level_interval(ctx, end, pair, est, m)
            half = (interval[1] - interval[0]) / 2
            centre = (interval[0] + interval[1]) / 2
            target = _target(ctx, end, centre if math.isfinite(centre) else est.value, found, done)
            ok = math.isfinite(half) and half <= target
            level["ends"][end] = dict(theta_subsample=theta, residual=res, rayleigh_holdout=est.value,
                                      standard_error=est.se, holdout=est.holdout,
                                      subsample_se=subsample_se(est, m, ctx.H.num_samples),
                                      residual_full=est.residual, interval=interval,
                                      control_variate=est.control_variate,
                                      kato_temple=kt, accepted=ok, target=target,
                                      guard_theta=pair.guard.theta if pair.guard is not None else math.nan,
                                      guard_residual=pair.guard.residual if pair.guard is not None else math.nan,
                                      overturned=end in ctx.overturned,
                                      stratum_std=est.stratum_std,
                                      strata_sizes=list(ctx.design.sizes) if est.stratum_std and ctx.design else [])
            if est.stratum_std and all(math.isfinite(x) for x in est.stratum_std):
                spreads[end] = est.stratum_std
            # the estimate: the interval's centre (the point whose worst error over the
            # interval is least, so the reported error is the half-width; the Rayleigh
            # quotient of an unfinished vector errs inward, the subsample's extreme outward;
            # for an end not yet within tolerance the centre moves with the confidence
            # level); the unbiased Rayleigh quotient when the outward side is open
            value = centre if math.isfinite(centre) else est.value
            entry = dict(value=value, interval=interval, vector=vec, converged=ok, solver=res,
                         sampling=ctx.z * est.se,
                         guard=pair.guard.vector if pair.guard is not None else None)
            sizes[end] = m
            if ok:
                done[end] = entry
            else:
                last[end] = entry
                short[end] = target
                # (the subsample bound's side and Kato-Temple's: the half level takes the tighter)
                sides = (_half_prediction(ctx, found[end], est, m, interval),
                         _half_kato_temple(ctx, end, found[end], est, m))
                stat, kato = (x / target if target > 0 else math.inf for x in sides)
                ahead[end] = min(stat, kato)
                level["ends"][end].update(half_prediction=ahead[end], half_prediction_stat=stat,
                                          half_prediction_kt=kato)
        for end, target in short.items():
            # an end alone at the next level gets a Neyman subsample for its spreads: its
            # subsample spread falls by that allocation's gain over this level's
            gain = (design.neyman_gain(alloc, ests[end].stratum_std, POLICY.stratum_min)
                    if len(short) == 1 else 1.0)
            need = max(need, _next_size(ctx, end, found[end], ests[end], target, m, gain))
        level["hvps_so_far"] = ctx.spent()
        levels.append(level)
        m_used = m
        todo = [e for e in todo if e not in done]
        # an overturned end goes on from its guard vector (the better Rayleigh quotient)
        start = {e: (found[e].guard.vector if e in ctx.overturned else found[e].vector) for e in todo}
        m = need
    for end in todo:  # budget spent: the last intervals, not converged
        if end in last:
            done[end] = last[end]
        else:  # spent before any level (e.g. on a curvature approximation): nothing known
            done[end] = dict(value=math.nan, interval=(-math.inf, math.inf), vector=start.get(end),
                             converged=False, solver=math.inf, sampling=math.inf)
    return done, levels, m_used, sizes


def _min_design(ctx: _Context):
    """The stratified design of ``lambda_min``'s levels (:mod:`curvlab.strata`), made on first
    use: strata by ``ctx.proxies`` or by the per-sample losses of one forward pass (booked
    as ``"strata"``); ``None`` for one stratum, or when that pass would take more than
    ``strata_budget`` of the budget left."""
    if ctx.design is None:
        H, N = ctx.H, ctx.H.num_samples
        ctx.design = False
        if POLICY.strata_cut not in ("equal", "optimal"):
            raise ValueError(f"MultilevelPolicy.strata_cut must be 'equal' or 'optimal', got {POLICY.strata_cut!r}")
        strata = min(int(ctx.strata), N // (2 * POLICY.stratum_min))
        if POLICY.strata_cut == "optimal" and N < 2 * POLICY.stratum_size:
            strata = 1  # no two strata of stratum_size: no forward pass either
        proxies = ctx.proxies
        affordable = _FORWARD_PASS <= POLICY.strata_budget * (ctx.max_hvps - ctx.spent())
        if strata > 1 and proxies is None and affordable:
            before = H.cost.copy()
            try:
                proxies = H.per_sample_losses()
            except Exception as exc:  # a loss that cannot take one sample at a time
                warnings.warn(f"per-sample losses unavailable ({type(exc).__name__}: {exc}); lambda_min's "
                              "subsamples stay uniform (pass proxies= to stratify them)",
                              RuntimeWarning, stacklevel=4)
            finally:  # the pass's work, moved from the full operator's record to its own phase
                spent = Cost(grad_samples=H.cost.grad_samples - before.grad_samples,
                             seconds=H.cost.seconds - before.seconds)
                H.cost.grad_samples, H.cost.seconds = before.grad_samples, before.seconds
                ctx.book(spent, "strata")
            if proxies is not None and not bool(torch.isfinite(proxies).all()):
                # (e.g. samples whose targets are all ignored): stratified apart, they would
                # fill a stratum whose holdout groups all have a non-finite loss
                warnings.warn("some per-sample losses are not finite (e.g. samples whose targets "
                              "are all ignored); lambda_min's subsamples stay uniform", RuntimeWarning,
                              stacklevel=4)
                proxies = None
        if strata > 1 and proxies is not None:
            design = Design.by_proxy(proxies, strata, torch.Generator().manual_seed(ctx.seed + 2),
                                     cut=POLICY.strata_cut, min_size=POLICY.stratum_size)
            # one stratum (a constant proxy, or too few samples for two): uniform sampling,
            # from the level's own uniform design (S and its holdout from one order)
            ctx.design = design if design.stratified else False
        # a warm start's spreads were measured on its own strata, whose edges move with the
        # losses: mapped onto these by the quantile bands they cover
        sizes = ctx.spread_sizes.pop("min", None)
        if ctx.design and sizes and "min" in ctx.spreads:
            ctx.spreads["min"] = remap_spreads(ctx.spreads["min"], sizes, ctx.design.sizes)
    return ctx.design or None


_FORWARD_PASS = 1 / 6
"""The stratifying forward pass in full-data HVP equivalents (a third of a gradient per
sample, booked at half an HVP per gradient)."""


def _keep_level_bounds(end: str, exact: dict, level: dict | None) -> dict:
    """An exact-stage end that did not converge, combined with the last level's interval.

    The exact stage's Ritz value is a rigorous inward bound but, unconverged, it has no
    outward side; the last subsample level's interval has a (statistical) outward side.
    Both hold, so the result is their intersection; the estimate stays the exact Ritz
    value (on the full data it errs by about ``residual^2 / gap``, far less than the
    interval's width), moved into the interval when the few products the exact stage
    could afford left it short of the level's inner side.  A converged exact end is
    returned as it is.
    """
    if exact["converged"] or level is None:
        return exact
    (lo_e, hi_e), (lo_l, hi_l) = exact["interval"], level["interval"]
    lo, hi = max(lo_e, lo_l), min(hi_e, hi_l)
    if lo > hi:  # the level's statistical bound is contradicted by the exact Ritz value
        lo, hi = (lo_e, hi_e)
    value = min(max(exact["value"], lo), hi)  # a Ritz value still below the level's inner side
    solver = level["solver"] if math.isfinite(lo) and math.isfinite(hi) else exact["solver"]
    return dict(exact, value=value, interval=(lo, hi), sampling=level["sampling"], solver=solver)


def _last_sizes(init, ends: List[str], N: int) -> dict:
    """Per end, the previous call's last size (``init.sample_sizes``), a half level counted
    as ``(N + 1) // 2``: a stratified half level's allocation can fall short of ``N / 2``
    (e.g. 24,428 of 50,000), and it is still the level after which only the exact stage
    comes.  With ``POLICY.warm_min_cap``, ``lambda_min`` on an ordinary level over the cap
    counts as a half level too (:func:`_min_capped`)."""
    sizes = {e: init.sample_sizes.get(e, init.sample_size) for e in ends}
    for e in ends:
        last = next((lv for lv in reversed(init.levels) if e in lv.get("ends", {})), None)
        if last is not None and last.get("half_level") and sizes[e] < N:
            sizes[e] = max(sizes[e], (N + 1) // 2)
    if _min_capped(init, ends, N):
        sizes["min"] = max(sizes["min"], (N + 1) // 2)
    return sizes


def _min_capped(init, ends: List[str], N: int) -> bool:
    """Whether ``POLICY.warm_min_cap`` applies to a warm call for ``ends`` after ``init``:
    ``lambda_min`` is wanted and the previous call's ``lambda_min`` ended (converged or
    not) on a subsample of more than ``warm_min_cap * N`` samples, short of all ``N``."""
    cap = POLICY.warm_min_cap
    size = init.sample_sizes.get("min")
    return cap is not None and "min" in ends and size is not None and cap * N < size < N


def _climb_start(init, ends: List[str], N: int) -> int:
    """Where a warm call climbs from when a wanted end needed the exact stage or a half level
    (or, with ``POLICY.warm_min_cap``, a ``lambda_min`` level over the cap): the previous
    call's last ordinary level under ``N / 2`` (not a half level), and at most
    ``warm_min_cap * N`` when the cap applies (:func:`_min_capped`); without one, the default
    first size (at most the cap's size when it applies)."""
    capped = _min_capped(init, ends, N)
    limit = POLICY.warm_min_cap * N if capped else math.inf
    below = [lv["sample_size"] for lv in init.levels
             if 2 * lv["sample_size"] < N and not lv.get("half_level") and lv["sample_size"] <= limit]
    if below:
        return below[-1]
    return max(2, min(DEFAULT_SAMPLE, int(limit))) if capped else DEFAULT_SAMPLE


def _under_half(sizes: dict, N: int) -> bool:
    """Whether every end's last size was a subsample under ``N/2`` (not the exact stage's ``N``
    or a half level's ``N/2``): the warm start's test, shared by :func:`_warm_sizes` and
    :func:`_warm_split`."""
    return all(2 * s < N for s in sizes.values())


def _warm_sizes(init, N: int, which: str, sample_size: int | None) -> int:
    """First subsample size of a warm-started call.

    When the previous call ended every wanted end on subsamples under ``N/2`` (certified
    there or, its budget spent, not), the smallest of their sizes; when it needed the exact stage or a half level (``N/2``)
    for one, its last subsample level under ``N/2`` (whose vectors start the exact stage
    well; this call's start vectors come from the previous one; a half level, whose
    stratified allocation can fall short of ``N/2``, is not one: :func:`_last_sizes`), or
    with ``POLICY.warm_exact``, ``N`` (the exact stage at once) when every wanted end went
    to the exact stage or a half level.  With ``POLICY.warm_min_cap``, a wanted
    ``lambda_min`` that ended on a level over the cap counts as a half level, and the climb
    starts at the last level at or under the cap (:func:`_climb_start`).  Default otherwise.
    """
    if sample_size is not None:
        return sample_size
    if init is None or init.num_samples != N:
        return DEFAULT_SAMPLE
    sizes = _last_sizes(init, _ends_of(which), N)
    if _under_half(sizes, N):
        return max(2, min(sizes.values()))
    if POLICY.warm_exact and all(e in init.sample_sizes and 2 * sizes[e] >= N for e in sizes):
        return N  # every wanted end went to the exact stage or a half level: straight there
    return _climb_start(init, _ends_of(which), N)


def _warm_split(init, N: int, which: str, sample_size: int | None) -> dict | None:
    """Per-end first subsample sizes for a warm call, or ``None`` (one schedule for both).

    When the previous call converged at both ends on subsamples whose sizes are at
    least ``warm_split`` times apart (typically ``lambda_max`` at the first level and
    ``lambda_min`` several levels later), this call searches each end from its own
    size: ``lambda_max`` first from its previous size, then ``lambda_min`` straight
    at its own (over ``warm_min_shrink``), rather than climbing the levels again
    from the smaller one.  Starting ``lambda_min`` lower (at half its size) lets
    its size fall between epochs when less is needed, but a level that falls short
    costs its search and holdout and a noisy prediction for the next one: over
    three seeds at ``c50k-e15`` and two at ``c50k-e5`` half cost more on average
    (BENCHMARKS.md, "Warm calls: lambda_min from half its previous size?").

    With ``POLICY.warm_exact``, a previous call whose ``lambda_min`` went to the exact
    stage (converged or not) or a half level and whose ``lambda_max`` ended under ``N/2``
    (converged or not) splits too: ``lambda_max`` from its size, then ``lambda_min`` at ``N`` (the exact
    stage, from the previous call's vector).  A ``lambda_min`` over ``POLICY.warm_min_cap``
    counts as a half level here too (:func:`_last_sizes`): no split without ``warm_exact``.
    """
    if sample_size is not None or init is None or which != "both" or init.num_samples != N:
        return None
    sizes = _last_sizes(init, ["max", "min"], N)
    if POLICY.warm_exact and "min" in init.sample_sizes and 2 * sizes["min"] >= N and 2 * sizes["max"] < N:
        # lambda_min needed the exact stage or a half level last time: lambda_max's levels
        # first, then lambda_min straight to the exact stage
        return {"max": max(2, sizes["max"]), "min": N}
    if not (init.converged_max and init.converged_min):
        return None
    if not _under_half(sizes, N):  # (the exact stage or a half level: _warm_sizes)
        return None
    if max(sizes.values()) < POLICY.warm_split * min(sizes.values()):
        return None
    first = {e: max(2, s) for e, s in sizes.items()}
    first["min"] = max(first["max"], first["min"] // max(1, POLICY.warm_min_shrink))
    return first


def _excesses(ctx: _Context, end: str, pair: EndPair, est, m: int) -> tuple[float, float]:
    """Outward bounds beyond the Rayleigh quotient: ``(subsample bound, Kato-Temple)``.

    For ``lambda_max`` the interval is ``(r - s, min(r + e_stat, r + s + e_kt))``
    with ``s = z se``: ``e_stat = theta_S + res_S + spread - r`` does not depend on
    the holdout, ``e_kt = res^2 / gap`` (``inf`` without a gap) comes on top of
    ``s``.  Mirrored for ``lambda_min``.
    """
    theta, res = pair.theta, pair.residual
    N = ctx.H.num_samples
    se = ctx.z * est.se
    stat = extreme_interval(end, est, theta, res, ctx.z, m, N)
    if end in ctx.overturned or _contradicted(end, stat):
        return math.inf, math.inf  # the subsample's bounds do not hold: only a larger S helps
    _, kt, _ = _level_interval(ctx, end, pair, est, m)
    if end == "max":
        return stat[1] - est.value, kt[1] - (est.value + se)
    return est.value - stat[0], (est.value - se) - kt[0]


def _next_size(ctx: _Context, end: str, pair: EndPair, est, target: float, m: int,
               gain: float = 1.0) -> int:
    """Subsample size at which ``end``'s interval should meet ``target``.

    The subsample bound's excess is the subsample spread ``z se_S``, which shrinks
    with the finite-population factor (divided by ``sqrt(gain)``), plus the gap between
    the holdout's Rayleigh quotient and the subsample's Ritz value and the search's
    residual, which shrink by ``f^(2 POLICY.gap_decay)`` (:func:`_excess_at`; the residual
    is the solver's, not sampling noise, and :func:`_half_prediction` keeps it, but at the
    search tolerance it is 1-3 % of the excess on the budget case); the
    Kato-Temple term ``res^2 / gap`` shrinks like ``1/m`` (the full-data residual of a
    vector found on ``S`` is sampling noise of size ``1/sqrt(m)``).  Each is asked to
    leave 40 % of ``target`` to the holdout's sampling error; the smaller of the two
    predicted sizes is taken, at least ``2m`` and at most ``4m``: levels are also the
    solver's warm starts (a Lanczos run on ``4m`` samples started from the vectors of
    ``m`` needs far fewer products than one from scratch, and so does the exact stage
    started from a large subsample's vectors), so no level is skipped on a prediction.
    ``gain``: how many times lower the next level's subsample variance is at equal size
    (a stratified design's Neyman allocation, :meth:`Design.neyman_gain`).
    """
    N = ctx.H.num_samples
    e_stat, e_kt = _excesses(ctx, end, pair, est, m)
    if not math.isfinite(e_stat) or target <= 0:  # no bound on S holds (an overturned end),
        return int(min(N, POLICY.max_growth * m))  # or nothing to aim at: grow the most
    # half-widths (e_stat + s) / 2 and s + e_kt / 2 within target, with s = holdout_share * target
    share = POLICY.holdout_share
    spread = ctx.z * subsample_se(est, m, N)
    rest = max(e_stat - spread, 0.0)
    allowed = 2 * (1 - share / 2) * target

    def meets(size: int) -> bool:
        return _excess_at(rest, spread, m, size, N, gain) <= allowed

    want = float(N) if not meets(N) else float(_smallest(meets, m, N))
    if math.isfinite(e_kt):
        want = min(want, m * max(e_kt, 0.0) / (2 * (1 - share) * target) / max(1.0, gain))
    return int(min(N, POLICY.max_growth * m, max(POLICY.min_growth * m, math.ceil(want))))


def _excess_at(rest: float, spread: float, m: int, size: int, N: int, gain: float = 1.0) -> float:
    """A level's subsample-bound excess (``rest + spread`` at ``m`` samples) predicted at
    ``size`` samples: the spread times the ratio ``f`` of standard errors with the
    finite-population factor (:func:`_se_ratio`) over ``sqrt(gain)``, the rest (gap and
    residual) times ``f^(2 POLICY.gap_decay)`` (at 1, like a bias proportional to the sampling
    variance, which vanishes with ``size = N``)."""
    f = _se_ratio(m, size, N)
    return rest * f ** (2 * POLICY.gap_decay) + spread * f / math.sqrt(max(1.0, gain))


def _se_ratio(m: int, size: int, N: int) -> float:
    """``sqrt(((1 - size/N) / size) / ((1 - m/N) / m))``: how a standard error of a mean over
    ``m`` of ``N`` samples drawn without replacement changes at ``size`` samples."""
    if m >= N:
        return 0.0
    return math.sqrt(max(0.0, (1 - size / N) / size) / ((1 - m / N) / m))


def _smallest(ok, lo: int, hi: int) -> int:
    """The smallest integer in ``[lo, hi]`` where the monotone test ``ok`` holds (``ok(hi)``)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _fits(remaining: float, N: int, ends: int) -> int:
    """The largest subsample a level can have with ``remaining`` full-data HVPs: a dozen
    products on it and a first holdout chunk of its size per end."""
    return int(remaining * N / (POLICY.level_products + POLICY.chunk_products * ends))


def _half_prediction(ctx: _Context, pair: EndPair, est, m: int, interval: tuple) -> float:
    """The half-width an end's interval (``interval`` at this level of ``m`` samples) is
    predicted to have at a level on ``N / 2`` samples.

    The level's width is ``|r - theta_S| + res + z (se + se_S)`` (the holdout's Rayleigh
    quotient ``r`` against the subsample's Ritz value, the search's residual, the holdout's and
    the subsample bound's standard errors).  The sampling parts scale with the finite-population
    factor ``f = sqrt(((1 - m'/N)/m') / ((1 - m/N)/m))`` at ``m' = N/2``; the half level's holdout
    is taken as spreading like its subsample (``se' = f se_S``: a whole-strata holdout of
    ``N/2`` does); the residual stays; ``|r - theta_S|`` also counts an ``r`` beyond
    ``theta_S`` (conservative) and shrinks by ``f^(2 POLICY.gap_decay)`` (as in
    :func:`_next_size`).  ``inf`` when ``interval`` has an open side.  Measured against what
    the half level then gave (BENCHMARKS.md): with the gap scaled by ``f`` (``gap_decay``
    0.5: this function as it was before ``gap_decay``), conservative where tried
    (``c50k-e15``: 0.077 and 0.084 predicted, 0.048 and 0.042 found; the tests' MLP, forced:
    0.030 predicted, 0.023 found); at the default 1 not on that MLP (0.0218 predicted, 0.0229
    found), whose gap shrinks no faster than the spread.
    """
    N = ctx.H.num_samples
    half = N // 2
    se_s = subsample_se(est, m, N)
    if not (math.isfinite(se_s) and math.isfinite(est.value)) or m >= half:
        return math.inf
    if not all(math.isfinite(x) for x in interval):
        return math.inf
    # the subsample bound's part as _next_size predicts it, plus the residual and the holdout's
    gap, spread = abs(est.value - pair.theta), ctx.z * se_s
    return (_excess_at(gap, spread, m, half, N) + pair.residual + spread * _se_ratio(m, half, N)) / 2


def _half_kato_temple(ctx: _Context, end: str, pair: EndPair, est, m: int) -> float:
    """The half-width an end's Kato-Temple side is predicted to give at a level on ``N / 2``
    samples, when that level's holdout completes the data (the Rayleigh quotient and the
    residual then exact, ``se = 0``).  Whether it does is not modelled: :func:`_certify`
    takes all samples outside ``S`` once its next holdout would pass ``POLICY.all_rest`` of
    them and the budget, less the exact stage's reserve, affords it (as at ``c50k-e28``);
    only for ``lambda_max`` does :func:`_wanted_holdout` size the holdout by Kato-Temple's
    side itself.  A holdout stopped short gives about ``z se + res^2 / (2 (gap - z se))``,
    wider than predicted.  The prediction: ``(f res)^2 / (2 gap)``, ``res``
    this level's full-data residual bound scaled by the finite-population factor ``f``
    (:func:`_se_ratio`; the residual of a vector found on ``S`` is sampling noise), ``gap``
    the distance from the holdout's Rayleigh quotient to the level's neighbour
    (:func:`_neighbour`).  ``inf`` where the pair or its guard has not
    settled, or the predicted residual is not under the gap.  The subsample-bound prediction
    (:func:`_half_prediction`) misses this side, which certified ``lambda_min`` at
    ``c50k-e28`` (a bottom apart from its neighbour) at 0.16 of its target where that
    prediction said 3.2 (BENCHMARKS.md, "The half level's two sides").
    """
    N = ctx.H.num_samples
    if m >= N // 2 or not (math.isfinite(est.value) and math.isfinite(est.residual)):
        return math.inf
    stat = extreme_interval(end, est, pair.theta, pair.residual, ctx.z, m, N)
    _, neighbour = _neighbour(ctx, end, pair, est, m, stat)  # (infinite unless settled)
    gap = est.value - neighbour if end == "max" else neighbour - est.value
    res = est.residual * _se_ratio(m, N // 2, N)
    if not (math.isfinite(gap) and gap > res):
        return math.inf
    return res ** 2 / gap / 2


def _target(ctx: _Context, end: str, centre: float, found: dict, done: dict) -> float:
    """Half-width wanted for ``end``: its tolerance, or the floor relative to ``lambda_max``."""
    top = found["max"].theta if "max" in found else done.get("max", {}).get("value", 0.0)
    return max((ctx.tol if end == "max" else ctx.tol_min) * abs(centre), ctx.floor * abs(top))


def _contradicted(end: str, stat: tuple) -> bool:
    """Whether :func:`curvlab.sampling.extreme_interval` found its bound contradicted."""
    return not math.isfinite(stat[1] if end == "max" else stat[0])


def _level_interval(ctx: _Context, end: str, pair: EndPair, est, m: int):
    """Interval of one end at a level: ``(interval, kato_temple, kato_temple_binds)``.

    The outward side is the tighter of the subsample bound
    (:func:`curvlab.sampling.extreme_interval`) and Kato-Temple
    (:func:`curvlab.sampling.kato_temple_interval`, with the next eigenvalue
    :func:`_neighbour`'s).  Both need the subsample's extreme pair **and its guard** to have
    settled (:func:`_neighbour`); otherwise that side is infinite.
    """
    stat = extreme_interval(end, est, pair.theta, pair.residual, ctx.z, m, ctx.H.num_samples)
    settled, neighbour = _neighbour(ctx, end, pair, est, m, stat)
    if not settled:
        inf = math.inf if end == "max" else -math.inf
        stat = (stat[0], inf) if end == "max" else (inf, stat[1])
    kt = kato_temple_interval(end, est, ctx.z, neighbour)
    if end == "max":
        return (stat[0], min(stat[1], kt[1])), kt, kt[1] < stat[1]
    return (max(stat[0], kt[0]), stat[1]), kt, kt[0] > stat[0]


def _neighbour(ctx: _Context, end: str, pair: EndPair, est, m: int, stat: tuple) -> tuple:
    """``(settled, neighbour)``: whether a level's extreme pair has settled, and the next
    eigenvalue that Kato-Temple takes (``+-inf``, no bound, unless the guard settled too).

    The neighbour is the subsample's next Ritz value moved outward by its residual: a
    heuristic, as the subsample's second eigenvalue is not a bound on the full data's.  The
    pair has settled when it met the solver's tolerance (the guard's convergence is part of
    the pair's), or its residual and its guard's are under a tenth of the sampling spread (a
    residual bounds the distance to *an* eigenvalue, the extreme one only once the Krylov
    space has found it: a search stopped early by the budget has not).  An end whose guard
    the holdout put beyond its extreme (``ctx.overturned``,
    :func:`curvlab.sampling.guard_overturns`), or whose subsample bound ``stat`` the holdout
    contradicts (:func:`curvlab.sampling.extreme_interval`), has not settled either: ``S``
    under-represents the extreme eigenvector, and its guard is no neighbour for Kato-Temple.
    """
    res, conv, nxt = pair.residual, pair.converged, pair.guard
    inf = math.inf if end == "max" else -math.inf
    # a pair that missed the solver's tolerance is still trusted when its residual is
    # far below the sampling spread (the tolerance could not change the interval)
    noise = POLICY.settle_noise * ctx.z * subsample_se(est, m, ctx.H.num_samples)
    # (the guard must have settled too: a small residual alone may belong to the second
    # eigenvalue of a cluster while the first is not yet in the Krylov space)
    guard_settled = nxt is not None and (nxt.converged or nxt.residual <= noise)
    settled = ((conv or (res <= noise and guard_settled)) and end not in ctx.overturned
               and not _contradicted(end, stat))
    if not settled or not guard_settled:
        return settled, inf
    return settled, (nxt.theta + nxt.residual if end == "max" else nxt.theta - nxt.residual)


def _certify(ctx: _Context, design: Design, alloc: List[int], found: dict, ends: List[str],
             done: dict, spend_all: bool = False, spreads: dict | None = None,
             reserve: float = 0.0) -> dict:
    """Grow a holdout after the subsample until each end's sampling error is small enough.

    Returns ``{end: HoldoutEstimate}``.  The holdout starts at ``m`` samples (at
    least 512, within the budget); after each chunk every end's interval is
    formed (:func:`_level_interval`).  An end whose width is within tolerance,
    or whose subsample-dependent part alone misses it (it needs a larger
    subsample, not a larger holdout), stops there; the others ask for the size
    at which the sampling error fits in the room that part leaves
    (:func:`curvlab.sampling.sampling_room`, :func:`curvlab.sampling.holdout_size_for`), and only
    their vectors are multiplied on the next chunk.  The holdout at least
    doubles, goes straight to all remaining samples when that is most of them,
    and stays within the budget.  With ``spend_all`` (the last level the budget
    allows), the ends not yet within tolerance grow their holdouts as far as the
    budget left goes (no later level will use it): those with a two-sided
    interval first, as only their width can still shrink; a one-sided end grows
    only when no end is two-sided.  ``reserve``: HVP-equivalents the chunks after the
    first leave unspent (what an exact stage that may follow the level needs).

    ``lambda_max``'s first chunk also carries the Gauss-Newton forms of its groups
    (when the budget left after it could pay a forward-mode pass over the rest;
    counted in the chunk's size like the products).  Right after it,
    :func:`_control_variate_pays` decides once whether the variate makes the rest
    of the holdout cheaper; if so, the forms' exact mean outside ``S`` is completed
    by one pass and the estimate becomes that mean plus the holdout mean of
    ``v^T (H_d - G_d) v`` (:func:`curvlab.sampling.holdout_estimate`), and later
    chunks carry forms too (except one that completes the holdout).

    Each end has its holdout plan (:func:`_holdout_plans`): ``lambda_max`` a uniform
    holdout of the samples outside ``S``; ``lambda_min``, when strata are available
    (:mod:`curvlab.strata`), a stratified one, drawn stratum by stratum in proportion to
    its Neyman allocation (:meth:`Design.holdout_allocation`), each stratum's groups kept
    apart (:func:`curvlab.sampling.stratified_estimate`), which also measures the
    per-stratum spreads that allocate its next subsample: from the samples outside a
    uniform ``S`` (post-stratified; ``S``'s part is ``m theta_S``), or from all of each
    stratum, independently of a stratified ``S``.  Sizes and the budget are counted in
    totals as for one stratum.
    """
    H, N = ctx.H, ctx.H.num_samples
    m = sum(alloc)
    plans = _holdout_plans(ctx, design, alloc, ends, spreads or {})
    rest = max(p.pool for p in plans.values())  # what a holdout draws from (N - m, or N)
    base = N - rest  # the "m" of the holdout's sizing: m, or 0 for whole strata
    vectors = {e: found[e].vector.to(H.device, H.dtype) for e in ends}
    vectors = {e: v / v.norm() for e, v in vectors.items()}
    # the first chunk also multiplies each end's guard vector: the holdout checks the
    # subsample's order (an extreme eigenvector that is weakly represented in S can be
    # S's guard rather than its extreme)
    guards = {e: found[e].guard.vector.to(H.device, H.dtype) for e in ends if found[e].guard is not None}
    guards = {e: g / g.norm() for e, g in guards.items()}

    def with_forms(accs) -> bool:
        return all(bool(a.has_forms[0]) for a in accs if a is not None)

    accs: dict = {e: [None] * len(plans[e].design.sizes if plans[e].design.stratified else [0])
                  for e in ends}
    ests: dict = {}
    active = list(ends)
    t = 0
    t_next = min(rest, max(m, POLICY.first_chunk))
    # the Gauss-Newton control variate is tried at the top only (the GGN is positive
    # semi-definite and carries the Hessian's outliers; at the bottom it follows nothing),
    # and only when the budget left after the first chunk could pay for the population pass
    left = max(0.0, ctx.max_hvps - ctx.spent()) * N
    forms = {e for e in ends if e == "max" and POLICY.control_variate and t_next < rest
             and left - t_next * (len(ends) + len(guards) + _FORM) >= _FORM * (rest - t_next)}
    population: dict = {}  # end -> per stratum, the exact mean of v^T G_d v over its pool
    # end -> the largest subsample standard error over the span of its extreme and guard
    # vectors, from the first chunk (span_subsample_se): the subsample bound's spread must
    # be the extreme *eigenvector's*, which the vector found on S can understate
    span: dict = {}

    def widened(e, est):
        # (only the subsample bound's spread: stratum_std, which allocates the next level's
        # strata, stays the found vector's per-stratum spread)
        if not span.get(e, 0.0) > subsample_se(est, m, N):
            return est
        fpc = max(0.0, 1 - m / N)
        return dataclasses.replace(est, subsample_se=span[e],
                                   std=span[e] * math.sqrt(m / fpc) if fpc > 0 else est.std)
    per_sample = len(ends) + len(guards) + _FORM * len(forms)
    affordable = int(left / per_sample)
    t_next = max(min(t_next, affordable), min(rest, POLICY.min_chunk))
    for plan in set(plans.values()):
        plan.groups = _group_sizes(plan.design, plan.design.holdout_allocation(
            t_next, plan.shape, plan.taken, POLICY.stratum_holdout))
    ctx.overturned.clear()
    while True:
        for plan in set(plans[e] for e in active):
            mine = [e for e in active if plans[e] is plan]
            new = plan.design.holdout_allocation(t_next, plan.shape, plan.taken, POLICY.stratum_holdout)
            checked = [e for e in mine if e in guards] if t == 0 else []
            rows = [vectors[e] for e in mine] + [guards[e] for e in checked]
            # (a chunk that completes the holdout needs no forms: its mean is then exact)
            mask = torch.tensor([e in forms and sum(new) < plan.pool for e in mine] + [False] * len(checked))
            parts = []
            for h, (a, b) in enumerate(zip(plan.taken, new)):
                if b <= a:
                    parts.append(None)
                    continue
                HT = H.subset(plan.design.holdout_part(h, plan.shape, a, b))
                ctx.book(HT.cost, "certify")
                parts.append(HT.holdout_statistics(torch.stack(rows), group_size=plan.groups[h],
                                                   gauss_newton=mask, blocks=POLICY.residual_blocks,
                                                   cross=bool(checked) and POLICY.span_spread))
            for j, e in enumerate(mine):
                for h, part in enumerate(parts):
                    if part is not None:
                        if accs[e][h] is None:
                            accs[e][h] = part.row(j)
                        else:
                            accs[e][h].merge(part.row(j))
                cv = population.get(e) if with_forms(accs[e]) else None
                ests[e] = widened(e, plan.estimate(accs[e], found[e], cv))
            for j, e in enumerate(checked, start=len(mine)):
                g = plan.estimate([p.row(j) if p is not None else None for p in parts], found[e].guard)
                if guard_overturns(end=e, extreme=ests[e], guard=g, z=ctx.z):
                    ctx.overturned.add(e)
                if POLICY.span_spread and all(p is not None for p in parts):
                    span[e] = plan.span(parts, mine.index(e), j)
                    ests[e] = widened(e, ests[e])
            plan.taken = new
        first, t = t == 0, min(sum(plans[e].taken) for e in active)
        if t >= rest:
            return ests
        if first:
            # decide, once, whether the control variate pays (forms are kept only if so).  The
            # first chunk both informs the choice and enters the estimate: a mild adaptivity,
            # like the holdout's own growth, that the variate's unbiasedness does not rest on
            for e in sorted(forms):
                plan = plans[e]
                if not with_forms(accs[e]):
                    continue
                cv_est = widened(e, plan.estimate(accs[e], found[e], [0.0] * len(accs[e])))
                if _control_variate_pays(ctx, e, found[e], ests[e], cv_est, m, base, t, spend_all, done,
                                         reserve):
                    population[e] = _population_forms(ctx, plan, accs[e], vectors[e])
                    ests[e] = widened(e, plan.estimate(accs[e], found[e], population[e]))
            forms = set(population)
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
            want = _wanted_holdout(ctx, e, found[e], est, m, base, target)
            if want is not None:
                wants[e] = want
        active = [e for e in active if wants.get(e, 0) > t]
        if spend_all and two_sided:
            active = [e for e in active if e in two_sided]
        if not active:
            return ests
        t_new = min(rest, max(2 * t, int(POLICY.chunk_margin * max(wants[e] for e in active))))
        if t_new > POLICY.all_rest * rest:
            t_new = rest
        per_sample = len(active) + _FORM * len([e for e in active if e in forms])
        affordable = t + int(max(0.0, ctx.max_hvps - ctx.spent() - reserve) * N / per_sample)
        t_new = min(t_new, affordable)
        if t_new <= t + 1:
            return ests
        t_next = t_new


def _wanted_holdout(ctx: _Context, end: str, pair: EndPair, est, m: int, base: int,
                    target: float, cap: bool = True) -> int | None:
    """The holdout size at which ``end``'s interval should meet ``target``, or ``None`` when no
    holdout would (``S`` is too small): the smaller of two predictions, the size at which
    the standard error fits the room that the subsample's bounds leave
    (:func:`curvlab.sampling.sampling_room`, which takes Kato-Temple's side as fixed) and
    the size at which the whole interval is predicted to fit, the residual bound shrinking
    with the holdout too (:func:`_holdout_for_target`; ``lambda_max`` only, at most
    ``max_growth`` times the holdout so far, unless ``cap`` is false: where the holdout
    should end rather than its next step)."""
    N = ctx.H.num_samples
    if end == "min" and est.residual_parts:
        # lambda_min's room is read, as before the bound, with Kato-Temple's residual at the
        # holdout's norm (noise in, no margin): with the bound, the room closed on levels
        # whose holdout, grown to all the samples, made the residual exact and passed
        # (c50k-e15 seed 2: 20.8 epochs became 29.1).  Only the sizing: the interval is the
        # bound's
        fixed, perp_sq, _, _ = est.residual_parts
        est = dataclasses.replace(est, residual=fixed + math.sqrt(perp_sq))
    room = sampling_room(*_excesses(ctx, end, pair, est, m), target)
    # (that prediction rests on a noisy estimate of the residual's signal, and is most
    # fragile where it is met only by all samples, whose residual has no margin: the
    # holdout grows on it at most max_growth times, then is judged again.  lambda_max
    # only: at the bottom, Kato-Temple's gap is comparable to the sampling spread, so the
    # interval's width depends on where the estimate falls, and a holdout grown until the
    # width fits stops on estimates that fell low.  Measured at c50k-e15, seed 4: an
    # accepted lambda_min interval excluded the reference; BENCHMARKS.md)
    grown = _holdout_for_target(ctx, end, pair, est, m, base, target) if end == "max" else None
    if grown is not None and cap:
        grown = min(grown, POLICY.max_growth * est.holdout)
    wants = [grown]
    if room >= POLICY.min_room * target:
        wants.append(holdout_size_for(est, ctx.z, POLICY.room_use * room, base, N))
    wants = [w for w in wants if w is not None]
    return min(wants) if wants else None


def _holdout_for_target(ctx: _Context, end: str, pair: EndPair, est, m: int, base: int,
                        target: float) -> int | None:
    """The smallest holdout, doubling the current one up to all ``N - base`` samples, at which
    ``end``'s interval is predicted (:func:`curvlab.sampling.predicted_estimate`: the
    standard error and the residual bound's noise shrink) to meet ``room_use`` of
    ``target``; ``None`` if not even all of them would."""
    N = ctx.H.num_samples
    rest, size = N - base, est.holdout
    while 0 < size < rest:
        size = min(rest, 2 * size)
        interval, _, _ = _level_interval(ctx, end, pair, predicted_estimate(est, size, base, N), m)
        if (interval[1] - interval[0]) / 2 <= POLICY.room_use * target:
            return size
    return None


class _Plan:
    """One end's holdout: its design, the allocation shape it draws in proportion to, what it
    has drawn per stratum (``taken``), its pool size, its estimate, and ``span(accs, i, j)``:
    the largest subsample standard error over the span of rows ``i`` and ``j``
    (:func:`curvlab.sampling.span_subsample_se` for this design)."""

    def __init__(self, design: Design, shape: List[int], estimate, span):
        self.design, self.shape, self.estimate, self.span = design, shape, estimate, span
        self.taken = [0] * len(shape)
        self.pool = sum(design.pools(shape))
        self.groups: List[int] = []


def _holdout_plans(ctx: _Context, design: Design, alloc: List[int], ends: List[str],
                   spreads: dict) -> dict:
    """``{end: _Plan}``: how each end's holdout is drawn and estimated (see :func:`_certify`).

    A stratified subsample (``lambda_min`` alone) is certified from all of each stratum;
    with a uniform subsample, ``lambda_min`` gets a holdout stratified over the samples
    outside ``S`` when strata are available (:func:`_min_design`), in proportion to its
    Neyman allocation for ``spreads`` (proportional before any), and every other end the
    uniform holdout of the samples outside ``S``.
    """
    N, m = ctx.H.num_samples, sum(alloc)
    if design.stratified:
        whole = _Plan(design, list(alloc), lambda accs, pair, pop=None: stratified_estimate(
            accs, 0, alloc, design.sizes, pop, z=ctx.z),
            lambda accs, i, j: span_subsample_se(accs, i, j, design.sizes, ms=list(alloc), z=ctx.z))
        return {e: whole for e in ends}

    def uniform_estimate(accs, pair, pop=None):
        return holdout_estimate(accs[0], 0, pair.theta, pair.residual, m, N,
                                population_form=None if pop is None else pop[0], z=ctx.z)
    plans = {}
    uniform = _Plan(design, list(alloc), uniform_estimate,
                    lambda accs, i, j: span_subsample_se(accs, i, j, [N], m=m, z=ctx.z))
    strata = _min_design(ctx) if "min" in ends else None
    for e in ends:
        if e == "min" and strata is not None:
            fresh = strata.reshuffled(torch.Generator().manual_seed(ctx.seed + 1000 + m))
            outside = fresh.outside(design.take(alloc))
            shape = outside.allocate(max(m, len(outside.sizes)), spreads.get("min"),
                                     minimum=POLICY.stratum_min)
            plans[e] = _Plan(outside, shape, lambda accs, pair, pop=None: stratified_estimate(
                accs, 0, shape, outside.sizes, pop, pools=outside.pools(shape),
                subsample=(m, pair.theta, pair.residual), z=ctx.z),
                lambda accs, i, j: span_subsample_se(accs, i, j, outside.sizes, m=m, z=ctx.z))
        else:
            plans[e] = uniform
    return plans


def _group_sizes(design: Design, first: List[int]) -> List[int]:
    """Holdout group size per stratum, from the first chunk's allocation ``first``: about
    ``groups`` groups in all (at most ``max_group`` samples each), at least
    ``stratum_groups`` in every stratum of a stratified design (each stratum's spread is
    estimated from its own groups)."""
    total = max(1, sum(first))
    if not design.stratified:
        return [max(1, min(POLICY.max_group, first[0] // POLICY.groups))]
    return [max(1, min(POLICY.max_group, t // max(POLICY.stratum_groups, round(POLICY.groups * t / total))))
            for t in first]


def _population_forms(ctx: _Context, plan: _Plan, accs: list, v: Tensor) -> List[float]:
    """Per stratum, the exact mean of the Gauss-Newton forms ``v^T G_d v`` over the holdout's
    pool (:meth:`Design.pools`): the holdout chunk's sum and one forward-mode pass over the
    rest of the pool."""
    out = []
    for h, (rest_h, t_h) in enumerate(zip(plan.design.pools(plan.shape), plan.taken)):
        if rest_h == 0:
            out.append(0.0)
            continue
        chunk = float(accs[h].C0[0]) if accs[h] is not None else 0.0
        after = 0.0
        if rest_h > t_h:
            HR = ctx.H.subset(plan.design.holdout_part(h, plan.shape, t_h))
            ctx.book(HR.cost, "certify")
            after = float(HR.gauss_newton_forms(v[None])[0])
        out.append((chunk + (rest_h - t_h) * after) / rest_h)
    return out


def _control_variate_pays(ctx: _Context, end: str, pair: EndPair, est, cv, m: int, base: int,
                          t: int, spend_all: bool, done: dict, reserve: float = 0.0) -> bool:
    """Whether the Gauss-Newton control variate makes ``end``'s holdout cheaper.

    After the first chunk ``t`` of the holdout (whose groups carry their Gauss-Newton
    forms ``v^T G_g v``), compare what is left to pay, with the growth rule of
    :func:`_certify` (at least doubling, straight to all ``N - m`` samples outside
    ``S`` past ``all_rest`` of them; on the last level the budget allows, straight to
    all unless the interval is within tolerance): without the variate, the holdout
    products up to the size the spread of ``q = v^T H_d v`` asks (``est``); with it,
    one forward-mode pass over the ``N - m - t`` samples outside ``S`` and the chunk
    (the forms' exact mean), then holdout products with their forms up to the size the
    spread of ``q - c`` asks (``cv``: the estimate with the variate, its population mean
    set to zero; a chunk that completes the holdout needs no forms).  The variate is
    taken when it is the cheaper by the cost record's count and all of it fits the
    budget; an end already within tolerance, or one whose subsample alone keeps it from
    the tolerance, needs no larger holdout and takes nothing.  ``base``: ``N`` less the
    holdout's pool (``m`` for a uniform design, 0 for a stratified one).
    """
    N = ctx.H.num_samples
    rest = N - base
    if not math.isfinite(cv.holdout_std):
        return False
    interval, _, _ = _level_interval(ctx, end, pair, est, m)
    target = _target(ctx, end, est.value, {end: pair}, done)
    if (interval[1] - interval[0]) / 2 <= target:
        return False
    if _wanted_holdout(ctx, end, pair, est, m, base, target) is None and not spend_all:
        return False

    def size(e) -> int:  # the holdout the loop would grow to
        # (cv's value lacks the forms' population mean: only its spread is the variate's)
        e = dataclasses.replace(est, se=e.se, holdout_std=e.holdout_std)
        want = _wanted_holdout(ctx, end, pair, e, m, base, target, cap=False)
        want = rest if want is None else want
        if want <= t:
            return t
        if spend_all:
            return rest
        grown = min(rest, max(2 * t, int(POLICY.chunk_margin * want)))
        return rest if grown > POLICY.all_rest * rest else grown

    def products(s: int, forms: bool) -> float:  # holdout products from t to s
        return (s - t) * (1 + (_FORM if forms and s < rest else 0.0))

    plain = products(size(est), False)
    with_cv = _FORM * (rest - t) + products(size(cv), True)
    affordable = (ctx.max_hvps - ctx.spent() - reserve) * N >= with_cv
    return with_cv < plain and affordable
