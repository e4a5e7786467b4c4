"""Stratified subsamples and holdouts for the multilevel regime.

A well-fit network's curvature sits on its few poorly fit samples: along an
extreme eigenvector the per-sample quadratic forms ``q_d = v^T H_d v`` are
heavy-tailed, and their size is predicted by what one forward pass gives, the
per-sample loss (BENCHMARKS.md, "Sampling floors by estimator").  So the samples
are cut into strata by the loss's quantiles, where Neyman allocation by the loss
would gain most (a well-fit network's top few per cent of losses cut finest: "Where
to cut the strata"), and a level of
:mod:`curvlab.multilevel` draws its subsample ``S`` and its holdout ``T`` stratum
by stratum:

* the search runs on the **stratified subsample Hessian**
  ``H_S = sum_h W_h H_{S_h}`` (``W_h = N_h / N``, ``H_{S_h}`` the mean Hessian of the
  ``m_h`` samples drawn from stratum ``h``), an unbiased estimate of ``H`` for any
  allocation; along a fixed vector its variance is ``sum_h W_h^2 sigma_h^2 / m_h``
  (times the finite-population corrections), which Neyman allocation
  ``m_h ~ N_h sigma_h`` makes smallest, from the per-stratum spreads ``sigma_h`` the
  previous level's (or call's) holdout measured;
* the certification draws its holdout ``T_h`` from **all** of stratum ``h``, by a second
  random order independent of the first (so of ``S`` and of the vectors found on it;
  ``T_h`` may overlap ``S_h``), and estimates ``v^T H v = sum_h W_h mean_{T_h} q`` without
  bias (:func:`curvlab.sampling.stratified_estimate`).  Drawing from the rest of each
  stratum would need the exact part of ``S`` per stratum, one more product of every
  certified vector on ``S``: dearer than the holdout itself at the sizes that matter.

One stratum is the plain uniform design (a random permutation; ``S`` its first
``m`` samples), which is what the multilevel regime does without a proxy.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

from .estimators import neyman_allocation, proxy_strata
from .loop import OnParameters

__all__ = ["Design", "StratifiedOperator", "remap_spreads"]


class Design:
    """Strata of the ``N`` samples, each in a fixed random order.

    A level with allocation ``m_h`` takes the first ``m_h`` of each stratum's order as
    ``S`` (levels therefore nest when the allocations grow).  The uniform design's holdout
    continues its one order after ``S``; a stratified design's holdout follows a second,
    independent order per stratum (``holdout_orders``; :meth:`reshuffled` draws fresh ones).

    Args:
        orders: per stratum, sample positions (into the operator's data) in random order.
    """

    def __init__(self, orders: Sequence[Tensor], holdout_orders: Sequence[Tensor] | None = None):
        self.orders = [o.reshape(-1) for o in orders]
        self.holdout_orders = None if holdout_orders is None else [o.reshape(-1) for o in holdout_orders]
        self.sizes = [int(o.numel()) for o in self.orders]
        self.num_samples = sum(self.sizes)
        if self.stratified and self.holdout_orders is None:
            raise ValueError("a stratified design needs its holdout orders")

    @classmethod
    def uniform(cls, num_samples: int, generator: torch.Generator) -> "Design":
        """One stratum: a random permutation of the samples; the holdout continues it after ``S``."""
        return cls([torch.randperm(num_samples, generator=generator)])

    @classmethod
    def by_proxy(cls, proxy: Tensor, strata: int, generator: torch.Generator, cut: str = "equal",
                 min_size: int = 1) -> "Design":
        """Strata by the quantiles of ``proxy`` ``(N,)`` (e.g. the per-sample losses), each
        with two independent random orders (the subsample's and the holdout's).

        ``cut``, ``min_size``: as :func:`curvlab.estimators.proxy_strata` cuts them
        (``"equal"``: ``strata`` strata of nearly equal size; ``"optimal"``: at most
        ``strata``, where Neyman allocation by the proxy gains most)."""
        # ties (a constant or ordinal proxy) are broken at random, not by the data's order
        shuffle = torch.randperm(proxy.numel(), generator=generator)
        parts = [shuffle[p] for p in proxy_strata(proxy.detach().cpu()[shuffle], int(strata),
                                                  cut=cut, min_size=min_size)]
        orders = [p[torch.randperm(p.numel(), generator=generator)] for p in parts]
        holdouts = [p[torch.randperm(p.numel(), generator=generator)] for p in parts]
        return cls(orders, holdouts)

    @property
    def stratified(self) -> bool:
        return len(self.orders) > 1

    @property
    def weights(self) -> List[float]:
        """``W_h = N_h / N``."""
        return [n / self.num_samples for n in self.sizes]

    def allocate(self, total: int, spreads: Sequence[float] | None = None, minimum: int = 4,
                 spread_floor: float = 0.1) -> List[int]:
        """``m_h`` for a subsample of ``total``: Neyman (``N_h sigma_h``) with ``spreads``,
        proportional without; at least ``minimum`` per stratum where ``total`` allows
        (:func:`curvlab.estimators.neyman_allocation`)."""
        if not self.stratified:
            return [int(total)]
        total = int(min(max(total, len(self.sizes)), self.num_samples))
        s = torch.ones(len(self.sizes), dtype=torch.float64) if spreads is None else \
            torch.as_tensor(list(spreads), dtype=torch.float64)
        if s.numel() != len(self.sizes) or not bool(torch.isfinite(s).all()) or not float(s.sum()) > 0:
            s = torch.ones(len(self.sizes), dtype=torch.float64)
        return neyman_allocation(self.sizes, s, total, minimum=minimum, spread_floor=spread_floor)

    def neyman_gain(self, alloc: Sequence[int], spreads: Sequence[float], minimum: int = 4) -> float:
        """How many times lower the variance of a stratified mean is under the allocation
        :meth:`allocate` gives for per-stratum ``spreads`` (Neyman, with its floors) than
        under ``alloc`` of the same total: ``sum_h W_h^2 sigma_h^2 / m_h`` under each (1 for
        the uniform design, or without finite spreads)."""
        if not self.stratified or len(spreads) != len(self.sizes):
            return 1.0
        s = [float(x) for x in spreads]
        if not all(math.isfinite(x) for x in s) or not sum(s) > 0:
            return 1.0
        W = self.weights
        best = self.allocate(sum(alloc), s, minimum=minimum)

        def var(a):
            return sum(w * w * x * x / max(k, 1) for w, x, k in zip(W, s, a))
        return max(1.0, var(alloc) / var(best))

    def take(self, stop: Sequence[int], start: Sequence[int] | None = None) -> Tensor:
        """Positions ``order_h[start_h:stop_h]`` of every stratum, concatenated."""
        start = start if start is not None else [0] * len(self.orders)
        return torch.cat([o[a:b] for o, a, b in zip(self.orders, start, stop)])

    def part(self, h: int, start: int, stop: int | None = None) -> Tensor:
        """Positions ``order_h[start:stop]`` of stratum ``h``."""
        return self.orders[h][start:stop]

    def pools(self, alloc: Sequence[int]) -> List[int]:
        """Per stratum, the samples a holdout draws from: the ``N - m`` outside ``S`` for the
        uniform design; for a stratified one its holdout orders (all ``N_h`` of each stratum,
        or those outside a uniform ``S``: :meth:`outside`)."""
        if not self.stratified:
            return [self.num_samples - int(alloc[0])]
        return [int(o.numel()) for o in self.holdout_orders]

    def reshuffled(self, generator: torch.Generator) -> "Design":
        """The same strata and subsample orders with fresh holdout orders: each level's
        holdout is then independent of the earlier levels' holdouts, which chose its
        subsample (its size, allocation and start vectors)."""
        return Design(self.orders, [o[torch.randperm(o.numel(), generator=generator)]
                                    for o in self.holdout_orders])

    def outside(self, subsample: Tensor) -> "Design":
        """The same strata with holdout orders restricted to the samples not in ``subsample``
        (a uniform ``S``): post-stratification of the holdout outside ``S``."""
        drop = torch.zeros(self.num_samples, dtype=torch.bool)
        drop[subsample] = True
        return Design(self.orders, [o[~drop[o]] for o in self.holdout_orders])

    def holdout_part(self, h: int, alloc: Sequence[int], start: int, stop: int | None = None) -> Tensor:
        """Positions of holdout draws ``start:stop`` of stratum ``h`` (see :meth:`pools`)."""
        if not self.stratified:
            m = int(alloc[0])
            return self.orders[0][m + start:None if stop is None else m + stop]
        return self.holdout_orders[h][start:stop]

    def holdout_allocation(self, total: int, alloc: Sequence[int], done: Sequence[int],
                           minimum: int) -> List[int]:
        """Per-stratum holdout sizes for a holdout of ``total`` samples at subsample ``alloc``.

        In proportion to the subsample's allocation (itself Neyman for the spreads
        measured last), within each stratum's pool (:meth:`pools`), at least ``minimum``
        where the pool allows, and never below what was already drawn (``done``)."""
        pools = self.pools(alloc)
        if not self.stratified:
            return [int(min(total, pools[0]))]
        total = int(min(max(total, len(pools)), sum(pools)))
        share = torch.tensor([max(a, 1) / n for a, n in zip(alloc, pools)], dtype=torch.float64)
        out = neyman_allocation(pools, share, total, minimum=minimum, spread_floor=0.0)
        return [max(a, d) for a, d in zip(out, done)]


def remap_spreads(spreads: Sequence[float], old_sizes: Sequence[int], new_sizes: Sequence[int]) -> tuple:
    """Per-stratum spreads measured on strata of ``old_sizes`` mapped onto strata of
    ``new_sizes`` (both cut by a proxy's quantiles, lowest first, e.g. last epoch's losses and
    this epoch's): each new stratum covers a band of quantiles, and its variance is the mean
    of the old strata's variances over that band.  ``()`` when ``spreads`` and ``old_sizes``
    disagree in length.  The spreads only steer the Neyman allocation: the estimates stay
    unbiased whatever they are."""
    s = [float(x) for x in spreads]
    if len(s) != len(old_sizes) or not old_sizes or not new_sizes:
        return ()
    if [int(n) for n in old_sizes] == [int(n) for n in new_sizes]:
        return tuple(s)

    def edges(sizes):
        total, out, acc = float(sum(sizes)), [0.0], 0.0
        for n in sizes:
            acc += n
            out.append(acc / total)
        return out
    a, b = edges(old_sizes), edges(new_sizes)
    out = []
    for lo, hi in zip(b, b[1:]):
        var = sum(max(0.0, min(hi, a1) - max(lo, a0)) * x * x for a0, a1, x in zip(a, a[1:], s))
        out.append(math.sqrt(var / (hi - lo)) if hi > lo else 0.0)
    return tuple(out)


class StratifiedOperator(OnParameters):
    """``H_S = sum_h W_h H_{S_h}``: the stratified subsample Hessian (see the module).

    Args:
        parts: per stratum, the operator on its drawn samples
            (:meth:`curvlab.HessianOperator.subset`).
        weights: ``W_h``, summing to one.

    ``num_samples`` is the number of samples drawn (each product costs that many
    per-sample products); ``cost`` is that of the parts (book each of :attr:`parts`).
    """

    def __init__(self, parts: Sequence, weights: Sequence[float]):
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        self.fmodel = self.parts[0].fmodel
        self.num_samples = sum(p.num_samples for p in self.parts)

    def matvec(self, V: Tensor) -> Tensor:
        """``H_S V``: one pass over every stratum's drawn samples."""
        out = None
        for w, p in zip(self.weights, self.parts):
            y = p.matvec(V)
            out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        return out

    def __call__(self, V: Tensor) -> Tensor:
        return self.matvec(V)

