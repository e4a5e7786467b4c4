"""Sampling statistics for subsampled Rayleigh quotients (pure functions).

Setting: a vector ``v`` was found on a random subsample ``S`` of ``m`` of the
``N`` samples, with in-sample Rayleigh quotient ``theta_S = v^T H_S v``.  On an
independent holdout ``T`` (drawn without replacement from the ``N - m`` samples
outside ``S``) the per-sample second directional derivatives
``q_d = v^T H_d v`` are known.  The full-data Rayleigh quotient is

    r(v) = v^T H v = (m * theta_S + (N - m) * mean_{d not in S} q_d) / N,

and ``mean_T q`` estimates the unknown mean outside ``S`` without the selection
bias that ``theta_S`` carries (``v`` was chosen to make ``theta_S`` extreme):
this is sample splitting.  Its standard error, with the finite-population
correction for drawing ``|T|`` of ``N - m`` without replacement, is

    se = (N - m) / N * std_T(q) / sqrt(|T|) * sqrt(1 - |T| / (N - m)).

Courant-Fischer: ``lambda_min <= r(v) <= lambda_max`` for every unit ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RayleighEstimate", "holdout_rayleigh", "extreme_interval", "sample_size_for"]


@dataclass(frozen=True)
class RayleighEstimate:
    """``value`` estimates ``v^T H v`` over all ``N`` samples, with standard error ``se``."""

    value: float
    se: float
    std: float
    holdout: int


def holdout_rayleigh(theta_subsample: float, m: int, q_holdout: Tensor, N: int) -> RayleighEstimate:
    """Unbiased full-data Rayleigh quotient from a subsample value and holdout values.

    Args:
        theta_subsample: ``v^T H_S v`` on the ``m`` subsample points.
        m: subsample size.
        q_holdout: ``(t,)`` per-sample ``v^T H_d v`` on a holdout disjoint from ``S``.
        N: total number of samples.
    """
    t = q_holdout.numel()
    if t < 2:
        raise ValueError("need at least two holdout samples to estimate a standard error")
    rest = N - m
    if rest < t:
        raise ValueError(f"holdout of {t} samples cannot be disjoint from a subsample of {m} of {N}")
    mean = float(q_holdout.double().mean())
    std = float(q_holdout.double().std())
    fpc = math.sqrt(max(0.0, 1 - t / rest))
    return RayleighEstimate(value=(m * theta_subsample + rest * mean) / N,
                            se=rest / N * std / math.sqrt(t) * fpc, std=std, holdout=t)


def extreme_interval(end: str, estimate: RayleighEstimate, theta_subsample: float,
                     residual: float, z: float, m: int, N: int) -> tuple[float, float]:
    """Confidence interval for ``lambda_max`` (``end="max"``) or ``lambda_min``.

    For ``lambda_max`` with top eigenvector ``u``:

    * below: ``lambda_max >= r(v)`` (Courant-Fischer), and ``r(v) >= value - z se``
      with confidence (``estimate`` is unbiased, from the holdout);
    * above: ``lambda_max = u^T H u`` and ``u^T H_S u <= lambda_max(H_S) <=
      theta_S + residual``; ``u^T H u - u^T H_S u`` is a mean of ``m`` draws
      without replacement, so it is below ``z * sigma / sqrt(m) * sqrt(1 - m/N)``
      with confidence, where ``sigma``, the spread of ``u^T H_d u``, is
      estimated by that of ``v^T H_d v`` on the holdout.

    Mirrored for ``lambda_min``.  The width shrinks like ``1/sqrt(m)`` plus the
    gap between the subsample's extreme and the holdout's view of its vector.
    """
    lo, hi = estimate.value - z * estimate.se, estimate.value + z * estimate.se
    spread = z * estimate.std / math.sqrt(m) * math.sqrt(max(0.0, 1 - m / N))
    if end == "max":
        return lo, max(theta_subsample + residual + spread, hi)
    if end == "min":
        return min(theta_subsample - residual - spread, lo), hi
    raise ValueError(f"end must be 'max' or 'min', got {end!r}")


def sample_size_for(m: int, half_width: float, target: float, N: int, growth: float = 2.0) -> int:
    """Next subsample size: widths shrink like ``1/sqrt(m)``, so ``m (hw/target)^2``.

    At least ``growth * m`` (progress is guaranteed), at most ``N``.
    """
    if target <= 0:
        return N
    want = m * (half_width / target) ** 2
    return int(min(N, max(growth * m, math.ceil(want))))
