"""Estimators of a population mean that beat uniform sampling (pure functions).

The quantity certified by :mod:`curvlab.multilevel` is a mean over the ``N``
samples, ``mu = (1/N) sum_d c_d`` with ``c_d = v^T H_d v``.  Uniform sampling of
``t`` samples estimates it with variance ``sigma^2 / t``.  On a well-fit
network most samples carry almost no curvature (both ``diag(p) - p p^T`` and
``p - onehot(y)`` vanish with ``1 - p_y``), so ``c_d`` is heavy-tailed and its
size is predicted by what one forward pass gives per sample: a *proxy* ``s_d``
(``1 - p_y``, ``||p - onehot(y)||``, the loss).  Three ways to use it, each with
an unbiased estimate and a standard error:

* **stratified** (:func:`proxy_strata`, :func:`neyman_allocation`,
  :func:`stratified_draw`, :func:`stratified_mean`): strata by the proxy's
  quantiles (of equal size, or cut where Neyman allocation gains most), samples drawn without replacement within each, allocated
  in proportion to ``N_h S_h`` (Neyman; ``S_h`` a stratum's spread, e.g. the
  previous call's) with a floor per stratum;
* **importance** (:func:`defensive_probabilities`, :func:`importance_mean`):
  draws with replacement from ``q_d = (1 - a) s_d / sum s + a / N``, the
  defensive mixture keeping every weight ``1 / (N q_d) <= 1 / a`` bounded;
* **control variate** (:func:`control_variate_mean`): ``c_d - beta (z_d - z_bar)``
  for a per-sample ``z_d`` whose population mean ``z_bar`` is known (e.g. the
  Gauss-Newton part of ``c_d``).

How much each lowers the variance on CNN checkpoints is measured by
``experiments/bench_floors.py`` (BENCHMARKS.md, "Sampling floors by estimator").
Each is tested for unbiasedness and interval coverage on synthetic heavy-tailed
populations with a known mean (``tests/test_estimators.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["MeanEstimate", "proxy_strata", "neyman_allocation", "stratified_draw", "stratified_mean",
           "defensive_probabilities", "importance_mean", "control_variate_mean"]


@dataclass(frozen=True)
class MeanEstimate:
    """``value`` estimates the population mean with standard error ``se`` from ``samples`` draws."""

    value: float
    se: float
    samples: int


def _check_1d(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-d tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries")
    return x.double()


# -- stratified sampling ----------------------------------------------------------------

def proxy_strata(proxy: Tensor, strata: int, *, cut: str = "equal", min_size: int = 1,
                 grid: int = 512) -> List[Tensor]:
    """The sample indices of strata by ``proxy``'s quantiles, lowest proxy first (ties broken
    by index, so the strata are reproducible).

    Args:
        proxy: ``(N,)`` per-sample proxy of the curvature's size (e.g. the loss).
        strata: how many strata (``cut="optimal"``: at most).
        cut: ``"equal"``: strata of (nearly) equal size.  ``"optimal"``: the edges that
            minimise ``sum_h W_h S_h(proxy)``, the standard error Neyman allocation would
            give if the curvature were proportional to the proxy (the classical optimal
            stratification problem, solved exactly over ``grid`` candidate edges at
            the proxy's quantiles by dynamic programming).  Where a few samples carry
            most of the proxy (a well-fit network's losses) it cuts them finest; where
            it is spread, the strata come out nearly equal (BENCHMARKS.md, "Where to cut
            the strata"); fewer strata where more would not lower it.
        min_size: the fewest samples of an ``"optimal"`` stratum.
        grid: candidate edges of ``"optimal"`` (the quantiles ``j / grid``).

    Returns:
        The strata's index tensors.
    """
    proxy = _check_1d("proxy", proxy)
    N = proxy.numel()
    if isinstance(strata, bool) or not isinstance(strata, int) or not 1 <= strata <= N:
        raise ValueError(f"strata must be an int in [1, {N}], got {strata!r}")
    order = torch.sort(proxy, stable=True).indices
    if cut == "equal":
        return list(torch.tensor_split(order, strata))
    if cut != "optimal":
        raise ValueError(f"cut must be 'equal' or 'optimal', got {cut!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2 (candidate edges), got {grid!r}")
    return [order[a:b] for a, b in _optimal_edges(proxy[order], strata, max(int(min_size), 1), grid)]


def _optimal_edges(s: Tensor, K: int, min_size: int, grid: int) -> List[tuple]:
    """``[(start, stop), ...]``: at most ``K`` runs of the sorted ``s``, each at least
    ``min_size`` long (where ``N`` allows), minimising ``sum_h (n_h / N) sd_h(s)``; runs start
    and stop at the candidate points ``round(j N / grid)``.  Dynamic programming: after step
    ``k``, ``best[j]`` is the least cost of ``s[:p_j]`` in at most ``k + 1`` runs."""
    N = s.numel()
    span = float(s[-1] - s[0])
    if N < 2 * min_size or K == 1 or not span > 0:
        return [(0, N)]
    s = (s - s[0]) / span  # on [0, 1]: the prefix sums of squares cannot overflow (a proxy of 1e300)
    pts = torch.unique(torch.linspace(0, N, grid + 1, dtype=torch.float64).round().long())
    c1 = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
    c2 = torch.cat([s.new_zeros(1), torch.cumsum(s * s, 0)])
    a, b = pts[:, None], pts[None, :]
    n = (b - a).double()
    mean = (c1[b] - c1[a]) / n.clamp(min=1)
    var = ((c2[b] - c2[a]) / n.clamp(min=1) - mean * mean).clamp(min=0)
    cost = n / N * var.sqrt()  # (i, j): the run p_i .. p_j
    cost[(n < min_size) | torch.isnan(cost)] = math.inf
    best = cost[0].clone()
    back = []
    for _ in range(K - 1):
        total, arg = (best[:, None] + cost).min(0)
        better = total < best * (1 - 1e-12)  # one more run only where it lowers the cost
        back.append(torch.where(better, arg, torch.full_like(arg, -1)))
        best = torch.where(better, total, best)
    runs, j = [], pts.numel() - 1
    for step in reversed(back):
        i = int(step[j])
        if i >= 0:
            runs.append((int(pts[i]), int(pts[j])))
            j = i
    runs.append((0, int(pts[j])))
    return runs[::-1]


def neyman_allocation(sizes: Sequence[int], spreads: Tensor, total: int, *, minimum: int = 2,
                      spread_floor: float = 0.1) -> List[int]:
    """Samples per stratum for ``total`` draws: proportional to ``N_h * S_h`` (Neyman).

    Args:
        sizes: ``N_h``, the strata's sizes.
        spreads: ``S_h``, their spreads (e.g. measured by the previous call, or a pilot).
        total: draws to allocate (at least one per stratum, at most ``sum N_h``).
        minimum: draws every stratum gets at least (2: a spread can be estimated), where
            its size and ``total`` allow (else one each).
        spread_floor: each ``S_h`` is raised to ``spread_floor`` times the pooled
            ``sum N_h S_h / N``, so that a stratum whose pilot spread was zero (or wrong)
            is still sampled in proportion to its size: the defence against a stale
            allocation.

    Returns:
        ``t_h`` with ``sum t_h == total`` and ``floor_h <= t_h <= N_h``: the Neyman shares
        ``c N_h S_h`` held within those bounds, with the one ``c`` that makes them sum to
        ``total`` (the variance-minimising allocation under the bounds), rounded by
        largest remainders.

    Raises:
        ValueError: ``total`` below the number of strata (a stratum without a draw has an
            unknown mean: merge strata or draw more) or above ``sum N_h``.
    """
    sizes_t = torch.tensor([int(n) for n in sizes], dtype=torch.float64)
    spreads = _check_1d("spreads", spreads)
    K = sizes_t.numel()
    if spreads.numel() != K:
        raise ValueError(f"got {K} strata sizes but {spreads.numel()} spreads")
    if (spreads < 0).any() or (sizes_t < 1).any():
        raise ValueError("strata sizes must be positive and spreads non-negative")
    N = int(sizes_t.sum())
    if not K <= total <= N:
        raise ValueError(f"total must be in [{K}, {N}] (one draw per stratum at least), got {total}")
    pooled = float((sizes_t * spreads).sum()) / N
    w = sizes_t * spreads.clamp_min(spread_floor * pooled)
    if not float(w.sum()) > 0:
        w = sizes_t.clone()  # no spread known anywhere: proportional allocation
    low = torch.minimum(sizes_t, torch.full_like(sizes_t, float(minimum)))
    if low.sum() > total:
        low = torch.ones_like(sizes_t)
    # the allocation that minimises sum_h N_h^2 S_h^2 / t_h within floor_h <= t_h <= N_h
    # (Lagrange): t_h = clip(c N_h S_h, floor_h, N_h), c the one level whose sum is total
    w = w.clamp_min(1e-12 * float(w.max()))  # every stratum reaches its size as c grows

    def filled(c: float) -> Tensor:
        return torch.minimum(torch.maximum(c * w, low), sizes_t)

    lo_c, hi_c = 0.0, total / float(w.sum())
    while float(filled(hi_c).sum()) < total:
        lo_c, hi_c = hi_c, 2 * hi_c
    for _ in range(200):  # bisection; the lower side, so that the sum never exceeds total
        mid = (lo_c + hi_c) / 2
        if float(filled(mid).sum()) <= total:
            lo_c = mid
        else:
            hi_c = mid
        if hi_c - lo_c <= 1e-12 * hi_c:
            break
    alloc = filled(lo_c)
    t = torch.floor(alloc + 1e-9)
    rest = int(round(total - float(t.sum())))
    if rest > 0:  # largest remainders get the last draws
        frac = (alloc - t).masked_fill(t >= sizes_t, -1.0)
        t[torch.argsort(-frac, stable=True)[:rest]] += 1
    return [int(x) for x in t]


def stratified_draw(strata: Sequence[Tensor], allocation: Sequence[int], generator: torch.Generator
                    ) -> List[Tensor]:
    """Per stratum, ``allocation[h]`` of its indices drawn without replacement."""
    if len(strata) != len(allocation):
        raise ValueError(f"{len(strata)} strata but {len(allocation)} allocations")
    out = []
    for idx, t in zip(strata, allocation):
        if not 0 <= t <= idx.numel():
            raise ValueError(f"cannot draw {t} of a stratum of {idx.numel()}")
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:t]])
    return out


def stratified_mean(values: Sequence[Tensor], sizes: Sequence[int]) -> MeanEstimate:
    """The stratified estimate ``sum_h W_h mean_h`` and its standard error.

    ``values[h]`` are the ``t_h`` values drawn without replacement from stratum
    ``h`` of size ``N_h``; ``W_h = N_h / N``.  Variance
    ``sum_h W_h^2 (1 - t_h / N_h) s_h^2 / t_h`` (``s_h``: the sample standard
    deviation; a stratum drawn whole contributes none).  A stratum with
    ``1 <= t_h < 2`` draws (and ``t_h < N_h``) has no spread estimate: the
    standard error is then ``inf``, an honest "unknown".  Every stratum needs a draw.
    """
    if len(values) != len(sizes) or not values:
        raise ValueError(f"need one value tensor per stratum: {len(values)} for {len(sizes)} strata")
    N = float(sum(sizes))
    mean, var, t_all = 0.0, 0.0, 0
    for vals, Nh in zip(values, sizes):
        vals = _check_1d("values", vals)
        t = vals.numel()
        if t == 0:
            raise ValueError("every stratum needs at least one draw (an empty stratum's mean is unknown)")
        if t > Nh:
            raise ValueError(f"{t} draws from a stratum of {Nh}: draws are without replacement")
        W = Nh / N
        mean += W * float(vals.mean())
        t_all += t
        if t >= Nh:
            continue
        if t < 2:
            var = math.inf
            continue
        var += W * W * (1 - t / Nh) * float(vals.var()) / t
    return MeanEstimate(mean, math.sqrt(var), t_all)


# -- importance sampling ------------------------------------------------------------------

def defensive_probabilities(proxy: Tensor, alpha: float = 0.1) -> Tensor:
    """``q_d = (1 - alpha) s_d / sum s + alpha / N``: sampling probabilities from a proxy.

    The uniform share ``alpha`` bounds every importance weight ``1 / (N q_d)`` by
    ``1 / alpha``, so a sample the proxy wrongly rates as flat cannot blow up the
    variance.  Negative proxies are refused; an all-zero proxy gives uniform ``q``.
    """
    s = _check_1d("proxy", proxy)
    if (s < 0).any():
        raise ValueError("proxy must be non-negative (use e.g. 1 - p_y, ||p - onehot(y)||, the loss)")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    N = s.numel()
    total = float(s.sum())
    if total == 0:
        return torch.full_like(s, 1.0 / N)
    return (1 - alpha) * s / total + alpha / N


def importance_mean(values: Tensor, probabilities: Tensor, population: int) -> MeanEstimate:
    """Hansen-Hurwitz estimate of the population mean from ``t`` draws *with replacement*.

    ``values[i] = c_{d_i}`` and ``probabilities[i] = q_{d_i}`` for draws ``d_i ~ q``
    over a population of ``population`` samples; the estimate is the mean of
    ``y_i = c_{d_i} / (population * q_{d_i})`` (unbiased for every ``q`` that is
    positive wherever ``c`` is nonzero), its standard error ``std(y) / sqrt(t)``.
    """
    c = _check_1d("values", values)
    q = _check_1d("probabilities", probabilities)
    t = c.numel()
    if q.numel() != t:
        raise ValueError(f"values and probabilities must have the same length, got {t} and {q.numel()}")
    if (q <= 0).any() or (q > 1).any():
        raise ValueError("probabilities must lie in (0, 1]")
    if t < 2:
        raise ValueError("need at least two draws to estimate a standard error")
    y = c / (population * q)
    return MeanEstimate(float(y.mean()), float(y.std()) / math.sqrt(t), t)


def control_variate_mean(values: Tensor, control: Tensor, control_mean: float,
                         population: int | None = None, beta: float | None = None) -> MeanEstimate:
    """Control-variate estimate ``mean(c) - beta (mean(z) - z_bar)`` from a uniform draw.

    ``values`` and ``control`` are ``c_d`` and ``z_d`` on the same ``t`` samples
    (drawn uniformly, without replacement from ``population`` samples when given,
    else with replacement); ``control_mean`` is ``z``'s exact population mean.

    ``beta``: a slope fixed before the draw (e.g. the previous call's, or one fit
    on another part of the data): the estimate is then **unbiased**.  ``None``:
    the least-squares slope on the draw itself (the regression estimator), which
    is slightly biased, ``O(1/t)``: on the heavy-tailed populations of
    ``tests/test_estimators.py`` about 0.15 standard errors at ``t = 240``; use it
    for measurements, not for certificates.  The standard error is that of the
    residuals ``c - beta z`` (``t - 1`` degrees of freedom, ``t - 2`` with a
    fitted slope), with the finite-population correction.
    """
    c = _check_1d("values", values)
    z = _check_1d("control", control)
    t = c.numel()
    if z.numel() != t:
        raise ValueError(f"values and control must have the same length, got {t} and {z.numel()}")
    if t < 3:
        raise ValueError("need at least three draws for a control-variate estimate")
    zc = z - z.mean()
    fitted = beta is None
    if fitted:
        szz = float((zc * zc).sum())
        beta = float((zc * (c - c.mean())).sum()) / szz if szz > 0 else 0.0
    resid = c - c.mean() - beta * zc
    s2 = float((resid * resid).sum()) / (t - 2 if fitted else t - 1)
    fpc = 1.0 if population is None else max(0.0, 1 - t / population)
    value = float(c.mean()) - beta * (float(z.mean()) - control_mean)
    return MeanEstimate(value, math.sqrt(s2 / t * fpc), t)
