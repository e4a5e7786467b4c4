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

With a control variate ``c_d`` whose mean over the samples outside ``S`` is known
exactly (the Gauss-Newton part ``v^T G_d v`` of the quadratic form: one forward-mode
pass), ``mean_{d not in S} q_d = mean_{d not in S} c_d + mean_T (q - c)``, unbiased
for any ``c``, with ``std_T(q - c)`` in place of ``std_T(q)`` in ``se``
(:func:`holdout_estimate`).

Courant-Fischer: ``lambda_min <= r(v) <= lambda_max`` for every unit ``v``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RayleighEstimate", "holdout_rayleigh", "extreme_interval", "sample_size_for",
           "HoldoutAccumulator", "HoldoutEstimate", "holdout_estimate", "holdout_size_for",
           "kato_temple_interval", "sampling_room", "guard_overturns", "stratified_estimate",
           "subsample_se", "residual_margin", "predicted_estimate", "Z_RESIDUAL",
           "span_subsample_se"]


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
      ``estimate``'s (:func:`subsample_se`): in :mod:`curvlab.multilevel`, for an end with a
      guard vector (the subsample's next Ritz vector), the largest spread over the span of
      ``v`` and the guard (:func:`span_subsample_se`, a heuristic), as ``v``'s own understates
      ``u``'s exactly when ``S`` under-represents ``u``.  A wider spread also opens this side
      less often (the contradiction test below) and settles a pair more readily.

    Mirrored for ``lambda_min``.  The width shrinks like ``1/sqrt(m)`` plus the
    gap between the subsample's extreme and the holdout's view of its vector.
    When the holdout contradicts the bound (for ``lambda_max``: the bound lies below
    ``value - z se``, which ``lambda_max`` exceeds), ``S`` under-represents the
    extreme eigenvector and the outward side is infinite.
    """
    lo, hi = estimate.value - z * estimate.se, estimate.value + z * estimate.se
    spread = z * subsample_se(estimate, m, N)
    # a bound that the holdout contradicts (the vector's Rayleigh quotient lies beyond the
    # subsample's extreme by more than both spreads: S under-represents the extreme
    # eigenvector) is no bound: that side opens
    if end == "max":
        bound = theta_subsample + residual + spread
        return lo, (max(bound, hi) if bound >= lo else math.inf)
    if end == "min":
        bound = theta_subsample - residual - spread
        return (min(bound, lo) if bound <= hi else -math.inf), hi
    raise ValueError(f"end must be 'max' or 'min', got {end!r}")


def subsample_se(estimate, m: int, N: int) -> float:
    """Standard error of ``u^T H_S u`` about ``u^T H u`` for the subsample's design: the
    estimate's own (:attr:`HoldoutEstimate.subsample_se`: stratified designs, and any estimate
    whose spread :mod:`curvlab.multilevel` widened to :func:`span_subsample_se`'s) or, for a
    uniform ``S``, ``std / sqrt(m)`` with the finite-population correction."""
    own = getattr(estimate, "subsample_se", math.nan)
    if not math.isnan(own):
        return own
    return estimate.std / math.sqrt(m) * math.sqrt(max(0.0, 1 - m / N))


def sample_size_for(m: int, half_width: float, target: float, N: int, growth: float = 2.0) -> int:
    """Next subsample size: widths shrink like ``1/sqrt(m)``, so ``m (hw/target)^2``.

    At least ``growth * m`` (progress is guaranteed), at most ``N``.
    """
    if target <= 0:
        return N
    want = m * (half_width / target) ** 2
    return int(min(N, max(growth * m, math.ceil(want))))


# -- holdout statistics from group products (no per-sample backward passes) --------------
#
# The holdout ``T`` is passed in groups ``g`` of ``n_g`` samples; each group gives the
# products ``H_g v_j`` (mean over the group) of the ``k`` unit vectors ``v_j``.  Group means
# are independent draws (up to the finite-population correction), so their spread gives
# standard errors without per-sample work: the group quadratic forms ``q_g = v^T H_g v``
# estimate the Rayleigh quotient, the products themselves bound the full-data residual
# ``||(I - v v^T) H v||`` that enters the Kato-Temple bound (their spread in every direction
# from a few blocks of groups).  Only sums are kept, so groups may come in any number of
# passes (and from any number of ranks: they add).


class HoldoutAccumulator:
    """Sufficient statistics of group products ``H_g V`` over a growing holdout.

    Args:
        V: ``(k, n)`` unit vectors (rows).

    Attributes: sums over groups ``g`` with weights ``n_g``: ``W1 = sum n_g``,
    ``W2 = sum n_g^2``, ``groups``; ``P1 = sum n_g H_g V`` and ``P2 = sum n_g^2 H_g V``
    ``(k, n)``; ``S2 = sum n_g^2 ||H_g v_j||^2``, ``Q1 = sum n_g^2 q_gj``,
    ``Q2 = sum n_g^2 q_gj^2`` ``(k,)`` in float64.

    Blocks: the groups are dealt in turn into ``blocks`` blocks (group ``g`` to block
    ``g mod blocks``, an order that does not look at the data); ``block_sums`` ``(blocks, k, n)``
    holds each block's ``sum n_g H_g V`` and ``block_weights`` ``(blocks,)`` its ``sum n_g``.
    The block means are independent estimates of the same mean product, so their spread in
    every direction is known, not only in the sum of squares: that is what bounds the
    residual (:func:`residual_margin`).  Memory: ``blocks`` copies of ``V``.

    Control variate (optional, per row): with the groups' Gauss-Newton quadratic forms
    ``c_gj = v_j^T G_g v_j`` also given (:meth:`add` ``forms=``), ``C0 = sum n_g c_gj``,
    ``C1 = sum n_g^2 c_gj``, ``C2 = sum n_g^2 c_gj^2`` and ``QC = sum n_g^2 q_gj c_gj``;
    ``has_forms`` ``(k,)`` says for which rows *every* group had its form.  Then
    ``mean_T(q - c)`` and its spread (:meth:`cv_means`, :meth:`cv_var_of_mean`) give the
    Rayleigh quotient as ``mean_pop(c) + mean_T(q - c)``: unbiased for any ``c`` whose
    population mean is known exactly, and of low variance where ``c`` follows ``q``
    (at the top of the spectrum, where the Gauss-Newton part carries the curvature).

    Cross forms (``cross=True``): ``F1 = sum n_g M_g`` and ``FQ1 = sum n_g^2 M_g`` ``(k, k)``,
    ``FQ2 = sum n_g^2 vec(M_g) vec(M_g)^T`` ``(k^2, k^2)``, with ``M_g = V H_g V^T`` the group's
    quadratic forms between the rows: the mean and spread of the form of every unit vector of
    two rows' span (:meth:`span_moments`).  ``k^4`` numbers, for the few rows that need them.
    """

    def __init__(self, V: Tensor, blocks: int = 16, cross: bool = False):
        if not isinstance(blocks, int) or blocks < 2:
            raise ValueError(f"blocks must be an int of at least 2, got {blocks!r}")
        self.V = V
        self.cross = bool(cross)
        k = V.shape[0]
        self.block_sums = V.new_zeros((blocks,) + tuple(V.shape))
        self.block_weights = torch.zeros(blocks, dtype=torch.float64, device=V.device)
        self.W1 = self.W2 = 0.0
        self.groups = 0
        self.P1 = torch.zeros_like(V)
        self.P2 = torch.zeros_like(V)
        f64 = dict(dtype=torch.float64, device=V.device)
        self.S2, self.Q1, self.Q2 = (torch.zeros(k, **f64) for _ in range(3))
        self.C0, self.C1, self.C2, self.QC = (torch.zeros(k, **f64) for _ in range(4))
        self.has_forms = torch.ones(k, dtype=torch.bool, device=V.device)
        kc = k if self.cross else 0  # (the cross forms, or nothing)
        self.F1, self.FQ1 = torch.zeros(kc, kc, **f64), torch.zeros(kc, kc, **f64)
        self.FQ2 = torch.zeros(kc * kc, kc * kc, **f64)

    _SUMS = ("P1", "P2", "S2", "Q1", "Q2", "C0", "C1", "C2", "QC", "F1", "FQ1", "FQ2")

    def add(self, products: Tensor, size: int, forms: Tensor | None = None) -> None:
        """One group of ``size`` samples with mean products ``products`` ``(k, n)``.

        ``forms``: the group's mean Gauss-Newton quadratic forms ``(k,)`` (``nan`` for a
        row without one), or ``None`` (no row has one).
        """
        w = float(size)
        # (elementwise products summed, as for the rows' own forms: no reduced-precision matmul)
        q = (products * self.V).sum(1).double()
        if self.cross:
            M = torch.stack([(p * self.V).sum(1) for p in products]).double()
            M = (M + M.T) / 2  # (H_g is symmetric: only rounding differs)
        b = self.groups % len(self.block_weights)
        self.block_sums[b].add_(products, alpha=w)
        self.block_weights[b] += w
        self.W1 += w
        self.W2 += w * w
        self.groups += 1
        self.P1.add_(products, alpha=w)
        self.P2.add_(products, alpha=w * w)
        self.S2 += w * w * products.double().pow(2).sum(1)
        self.Q1 += w * w * q
        self.Q2 += w * w * q * q
        if self.cross:
            self.F1 += w * M
            self.FQ1 += w * w * M
            self.FQ2 += w * w * torch.outer(M.flatten(), M.flatten())
        if forms is None:
            self.has_forms.zero_()
            return
        c = forms.to(q.device, torch.float64)
        self.has_forms &= ~c.isnan()
        c = c.nan_to_num(0.0)
        self.C0 += w * c
        self.C1 += w * w * c
        self.C2 += w * w * c * c
        self.QC += w * w * q * c

    def row(self, j: int) -> "HoldoutAccumulator":
        """The statistics of vector ``j`` alone (a new accumulator with ``k = 1``)."""
        out = HoldoutAccumulator(self.V[j:j + 1], blocks=len(self.block_weights), cross=self.cross)
        out.W1, out.W2, out.groups = self.W1, self.W2, self.groups
        out.block_sums = self.block_sums[:, j:j + 1].clone()
        out.block_weights = self.block_weights.clone()
        for name in self._SUMS + ("has_forms",):
            if name not in ("F1", "FQ1", "FQ2"):
                setattr(out, name, getattr(self, name)[j:j + 1].clone())
        if self.cross:
            d = j * len(self.V) + j  # (row j, column j of the k x k forms, flattened)
            out.F1, out.FQ1 = self.F1[j:j + 1, j:j + 1].clone(), self.FQ1[j:j + 1, j:j + 1].clone()
            out.FQ2 = self.FQ2[d:d + 1, d:d + 1].clone()
        return out

    def merge(self, other: "HoldoutAccumulator") -> None:
        """Add the groups of ``other`` (same vectors)."""
        # other's groups continue this one's sequence: its block b goes where dealing its first
        # group on from here would put it, block (groups + b) mod blocks (as one pass would, with
        # as many blocks; any assignment that does not look at the data keeps the bound valid)
        mine = len(self.block_weights)
        where = (self.groups + torch.arange(len(other.block_weights), device=self.block_weights.device)) % mine
        self.block_sums.index_add_(0, where, other.block_sums.to(self.block_sums.dtype))
        self.block_weights.index_add_(0, where, other.block_weights)
        self.W1 += other.W1
        self.W2 += other.W2
        self.groups += other.groups
        for name in self._SUMS:
            if name in ("F1", "FQ1", "FQ2") and not (self.cross and other.cross):
                continue
            getattr(self, name).add_(getattr(other, name))
        if self.cross and not other.cross:  # (its groups' cross forms are unknown: none kept)
            self.cross = False
            self.F1, self.FQ1, self.FQ2 = (x.new_zeros(0, 0) for x in (self.F1, self.FQ1, self.FQ2))
        self.has_forms &= other.has_forms

    def _var_factor(self) -> float:
        if self.groups < 2:
            raise ValueError("need at least two holdout groups to estimate a standard error")
        return self.groups / (self.groups - 1) / self.W1 ** 2

    def means(self) -> Tensor:
        """``(k,)`` holdout Rayleigh quotients ``v_j^T H_T v_j``."""
        return (self.P1 * self.V).sum(1).double() / self.W1

    def var_of_mean(self) -> Tensor:
        """``(k,)`` estimated variance of :meth:`means` (with-replacement form, no correction)."""
        return self._var_of(self.means(), self.Q1, self.Q2)

    def _var_of(self, mean: Tensor, first: Tensor, second: Tensor) -> Tensor:
        """Estimated variance of a holdout mean ``mean`` of group values ``x_g``, from
        ``first = sum n_g^2 x_g`` and ``second = sum n_g^2 x_g^2`` (with-replacement form)."""
        ss = second - 2 * mean * first + mean ** 2 * self.W2
        return ss.clamp_min(0) * self._var_factor()

    def span_moments(self, i: int, j: int, angles: int = 91) -> tuple[Tensor, Tensor]:
        """``(means, var_of_mean)``: :meth:`means` and :meth:`var_of_mean` of the unit vectors
        ``w = cos(phi) v_i + sin(phi) g`` of the span of rows ``i`` and ``j`` (unit vectors;
        ``g`` row ``j`` made orthogonal to row ``i``), ``phi`` on a grid of ``angles`` over
        ``[0, pi)`` (``w`` and ``-w`` have the same form), ``phi = 0`` being row ``i`` itself;
        where row ``j`` is (to rounding) parallel to row ``i``, row ``i`` alone (one entry).

        From the groups' cross forms (``cross=True``): ``w^T H_g w = alpha^T M_g alpha`` with
        ``alpha`` ``w``'s coefficients on the rows, so no product with ``w`` is needed.  Needs
        two groups (as :meth:`var_of_mean`).
        """
        if not self.cross:
            raise ValueError("span_moments needs the cross forms: build the accumulator with cross=True")
        V = self.V.double()
        c = float(V[i] @ V[j])
        s = math.sqrt(max(0.0, 1 - c * c))
        phi = torch.linspace(0, math.pi, angles + 1, dtype=torch.float64, device=V.device)[:-1]
        if s < 1e-6:
            phi = phi[:1]
        cos, sin = phi.cos(), phi.sin()
        # g = (v_j - c v_i) / s, so w = (cos - sin c / s) v_i + (sin / s) v_j
        on_i, on_j = (-c / s, 1 / s) if s >= 1e-6 else (0.0, 0.0)
        alpha = torch.zeros(len(phi), len(V), dtype=torch.float64, device=V.device)
        alpha[:, i] = cos + sin * on_i
        alpha[:, j] += sin * on_j
        outer = (alpha[:, :, None] * alpha[:, None, :]).flatten(1)  # (A, k^2): alpha (x) alpha
        means = outer @ self.F1.flatten() / self.W1
        return means, self._var_of(means, outer @ self.FQ1.flatten(), ((outer @ self.FQ2) * outer).sum(1))

    def cv_means(self) -> Tensor:
        """``(k,)`` holdout means of ``q - c`` (quadratic form minus its Gauss-Newton part);
        meaningful for the rows of :attr:`has_forms`."""
        return self.means() - self.C0 / self.W1

    def cv_var_of_mean(self) -> Tensor:
        """``(k,)`` estimated variance of :meth:`cv_means` (as :meth:`var_of_mean`)."""
        return self._var_of(self.cv_means(), self.Q1 - self.C1, self.Q2 - 2 * self.QC + self.C2)

    def perp_block_deviations(self, j: int) -> tuple[Tensor | None, int]:
        """``(X, dof)``: the rows ``sqrt(W_b / (B - 1)) (I - v v^T)(a_b - a)`` in float64 over
        the ``B`` blocks that hold groups (``a_b`` block ``b``'s mean product of vector
        ``v = V[j]``, ``W_b`` its samples, ``a`` the weighted mean of the ``a_b``), and
        ``dof = B - 1``; ``(None, 0)`` under two blocks.

        ``X^T X`` estimates the per-sample covariance of ``(I - v v^T) H_d v`` without bias:
        ``u^T X^T X u`` is the spread along ``u`` with ``B - 1`` degrees of freedom.
        """
        w = self.block_weights
        used = w > 0
        blocks = int(used.sum())
        if blocks < 2:
            return None, 0
        v = self.V[j].double()
        w = w[used]
        A = self.block_sums[used, j].double() / w[:, None]
        A = A - (A @ v)[:, None] * v
        a = (w[:, None] * A).sum(0) / w.sum()
        return (A - a) * (w / (blocks - 1)).sqrt()[:, None], blocks - 1

    def residual_sq(self, noise: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(raw, noise)``, each ``(k,)``: ``||(I - v v^T) a||^2`` and its expected noise part.

        ``a = H_T v`` estimates ``H_pop v`` (the holdout population's product) with
        noise ``E||a - H_pop v||^2``, estimated from the groups' spread; the part of
        that noise along ``v`` is the quadratic form's and is taken out.  So
        ``raw - noise`` estimates ``||(I - v v^T) H_pop v||^2`` without bias (before
        the finite-population correction, applied in :func:`holdout_estimate`).
        ``noise=False`` skips the noise part (``None``; it needs two groups).
        """
        a = self.P1.double() / self.W1
        V = self.V.double()
        perp = a - (a * V).sum(1, keepdim=True) * V  # in float64: no cancellation
        raw = perp.pow(2).sum(1)
        if not noise:
            return raw, None
        a_sq = a.pow(2).sum(1)
        cross = (a * self.P2.double()).sum(1)
        spread = (self.S2 - 2 * cross + a_sq * self.W2).clamp_min(0) * self._var_factor()
        noise_perp = (spread - self.var_of_mean()).clamp_min(0)
        return raw, noise_perp


Z_RESIDUAL = 1.959963984540054  # the residual bound's normal quantile when no ``z`` is given


def residual_margin(parts, z: float) -> float:
    """How far ``||(I - v v^T) a||`` may fall short of ``||(I - v v^T) H v||``, at quantile ``z``.

    ``parts`` is a list of ``(acc, j, c)``, one per independent
    holdout (a stratum), whose mean product ``a_h`` (row ``j`` of ``acc``) enters the estimate
    ``a = sum_h w_h a_h`` with variance factor ``c = w_h^2 fpc_h / t_h`` (``t_h`` samples,
    ``fpc_h`` the finite-population correction).  With ``r = (I - v v^T) H v`` and
    ``u = r / ||r||``, ``||r|| = u^T r = u^T a - u^T e <= ||(I - v v^T) a|| - u^T e``, and
    ``u^T e`` has variance ``u^T (sum_h c_h Sigma_h) u``, which is at most the largest
    eigenvalue of that matrix.  That eigenvalue is taken from the blocks' estimate
    (:meth:`HoldoutAccumulator.perp_block_deviations`; an estimate of the matrix is at least
    its quadratic form along ``u``, so the bound errs wide), and ``z`` is widened by
    Student's ``t`` at the parts' Satterthwaite degrees of freedom.  ``u`` is unknown, so
    no direction can be singled out: this costs a factor of about two over the truth where
    the holdout's noise is as large as the residual (BENCHMARKS.md).  ``inf`` where a part
    with ``c > 0`` has fewer than two blocks; ``0`` where every ``c`` is zero.
    """
    rows, lams, dofs = [], [], []
    for acc, j, c in parts:
        if not c > 0:
            continue
        X, dof = acc.perp_block_deviations(j)
        if X is None:
            return math.inf
        X = X * math.sqrt(c)
        rows.append(X)
        lams.append(float(torch.linalg.eigvalsh(X @ X.T)[-1]))
        dofs.append(dof)
    if not rows:
        return 0.0
    if len(rows) == 1:  # (e.g. a uniform holdout: its own top eigenvalue is the stack's)
        lam = lams[0]
    else:
        X = torch.cat(rows)
        lam = float(torch.linalg.eigvalsh(X @ X.T)[-1])
    lam = max(0.0, lam)
    spread = sum(x * x / d for x, d in zip(lams, dofs))
    dof = sum(lams) ** 2 / spread if spread > 0 else min(dofs)
    return z * student_factor(z, dof) * math.sqrt(lam)


@dataclass(frozen=True)
class HoldoutEstimate:
    """Full-data Rayleigh quotient and residual of one vector from a subsample and a holdout.

    ``value``: ``v^T H v`` estimate (unbiased); ``se`` its standard error;
    ``std``: per-sample standard deviation of ``v^T H_d v`` (for sizing);
    ``residual``: upper confidence bound on ``||(I - v v^T) H v||`` (see
    :func:`holdout_estimate`); ``residual_parts``: ``(fixed, perp_sq, noise_sq, margin)`` with
    ``residual = fixed + sqrt(perp_sq) + margin``: ``fixed`` the subsample's share, ``perp_sq``
    the holdout's squared share (``noise_sq`` of it the holdout's expected noise) and
    ``margin`` the allowance for the noise's direction (:func:`residual_margin`), for
    predicting the residual of a larger holdout (:func:`predicted_estimate`);
    ``se``, ``std`` and ``holdout_std`` are infinite when the holdout is a single group
    (no spread can be estimated) unless it is everything outside ``S`` (then ``se = 0``);
    ``holdout``: holdout samples used;
    ``holdout_std``: per-sample standard deviation of what the holdout averages (``std``
    itself, or that of ``v^T (H_d - G_d) v`` with the Gauss-Newton control variate),
    for sizing the holdout; ``control_variate``: whether the estimate used it;
    ``subsample_se``: standard error of a subsample's quadratic form ``u^T H_S u`` about
    ``u^T H u`` (the subsample bound's spread; ``nan`` for a uniform ``S``, meaning ``std /
    sqrt(m)`` with the finite-population correction, :func:`stratified_estimate`'s for a
    stratified one, or :func:`span_subsample_se`'s where that is larger);
    ``stratum_std``: per-stratum ``std`` (stratified designs; the next allocation's
    Neyman spreads).
    """

    value: float
    se: float
    std: float
    residual: float
    holdout: int
    holdout_std: float = math.nan
    control_variate: bool = False
    subsample_se: float = math.nan
    stratum_std: tuple = ()
    residual_parts: tuple = ()

    def __post_init__(self):
        if math.isnan(self.holdout_std):
            object.__setattr__(self, "holdout_std", self.std)


def holdout_estimate(acc: HoldoutAccumulator, j: int, theta_subsample: float,
                     residual_subsample: float, m: int, N: int,
                     population_form: float | None = None, z: float | None = None) -> HoldoutEstimate:
    """Combine subsample ``S`` (``m`` samples) and holdout ``T`` into full-data estimates.

    ``v^T H v = (m theta_S + (N - m) mean_{rest} q) / N`` with the holdout mean for the
    rest (sample splitting: ``T`` is independent of the choice of ``v``).  The
    standard error has the finite-population correction ``1 - t / (N - m)``, so it
    is zero when the holdout is everything outside ``S``.

    With ``population_form``, the exact mean of the Gauss-Newton form ``v^T G_d v``
    over all samples outside ``S``, and the groups' forms in ``acc`` (row ``j`` of
    :attr:`HoldoutAccumulator.has_forms`), the rest's mean is
    ``population_form + mean_T(q - c)``: a control variate with coefficient one, so
    unbiased whatever the forms are, its standard error that of ``q - c``.

    Residual: ``(I - v v^T) H v = (m/N) r_S + ((N-m)/N) (I - v v^T) H_rest v``, where
    ``r_S`` is the solver's residual on ``S`` (``v`` is a Ritz vector of ``H_S``); by the
    triangle inequality ``||.|| <= (m/N) ||r_S|| + ((N-m)/N) ||(I - vv^T) H_rest v||``, the
    last norm bounded by the holdout's ``||(I - v v^T) a||`` (``a`` its mean product, the
    ``raw`` of :meth:`HoldoutAccumulator.residual_sq`, noise and all) plus
    :func:`residual_margin` at quantile ``z`` (:data:`Z_RESIDUAL` without one): an upper
    confidence bound, exact when the holdout is everything outside ``S``.  Estimates alone
    fell short: along a ``lambda_max`` vector of a CIFAR-10 CNN (exact residual 4.10), the
    noise-free estimate from 2,048 samples spread 0.6-6.7 over 20 holdouts and put a
    converged Kato-Temple side below the reference; with the noise in (4.6-8.1) it is still
    below the truth in a fifth of the splits of a low-dimensional synthetic population.
    The bound is 2-3 times the truth at that size (BENCHMARKS.md, "A bound on the residual").

    With ``z`` (the normal quantile the caller's intervals use), ``se`` and the spreads
    ``std``, ``holdout_std`` are widened by Student's ``t`` over ``z`` at ``groups - 1``
    degrees of freedom (:func:`student_factor`; 3.5 % at 32 groups): the variance comes
    from the groups' spread.  Few groups happen when batches cannot be cut into them
    (e.g. inputs that are not all tensors with one row per sample).
    """
    t = int(round(acc.W1))
    rest = N - m
    if t > rest:
        raise ValueError(f"holdout of {t} samples cannot be disjoint from a subsample of {m} of {N}")
    fpc = max(0.0, 1 - t / rest) if rest > 0 else 0.0
    cv = population_form is not None
    if cv and not bool(acc.has_forms[j]):
        raise ValueError("population_form given, but not every holdout group has its Gauss-Newton form")
    mean = float(acc.means()[j])
    if acc.groups < 2:  # no spread can be estimated from one group
        var, var_h = math.inf, math.inf
    else:
        var = float(acc.var_of_mean()[j])
        var_h = float(acc.cv_var_of_mean()[j]) if cv else var
    if cv:
        mean = float(population_form) + float(acc.cv_means()[j])
    # (the noise left in: see above; its estimate, which needs two groups, only sizes the holdout)
    raw, noise = acc.residual_sq(noise=fpc > 0 and acc.groups >= 2)
    perp_sq = float(raw[j])
    if fpc > 0:
        noise_sq = fpc * float(noise[j]) if noise is not None else math.inf
        margin = residual_margin([(acc, j, fpc / acc.W1)], Z_RESIDUAL if z is None else z)
    else:
        noise_sq = margin = 0.0
    if z is not None and math.isfinite(var):
        widen = student_factor(z, acc.groups - 1) ** 2
        var, var_h = var * widen, var_h * widen
    # a holdout that is everything outside S makes the Rayleigh quotient exact (se = 0), but
    # the per-sample spread ``std`` is still needed: the subsample bound's sampling term
    # (how far u^T H_S u may sit from u^T H u) does not vanish with the holdout's error
    return HoldoutEstimate(
        value=(m * theta_subsample + rest * mean) / N,
        se=rest / N * math.sqrt(var_h * fpc) if fpc > 0 else 0.0,
        std=math.sqrt(var * t),
        residual=m / N * residual_subsample + rest / N * (math.sqrt(perp_sq) + margin),
        holdout=t, holdout_std=math.sqrt(var_h * t), control_variate=cv,
        residual_parts=(m / N * residual_subsample, (rest / N) ** 2 * perp_sq,
                        (rest / N) ** 2 * noise_sq, rest / N * margin))


def student_factor(z: float, dof: float) -> float:
    """Student's ``t`` quantile over the normal one ``z`` at ``dof`` degrees of freedom.

    For ``dof >= 3`` a Cornish-Fisher expansion (within 1 % of the exact quantile at
    95 %); below, the exact closed forms at one and two degrees of freedom, a fractional
    ``dof`` rounded down (the larger quantile); ``inf`` below one."""
    if dof == math.inf:
        return 1.0
    if not dof >= 1:  # (nan, or under one degree of freedom: no usable spread)
        return math.inf
    if dof < 3:
        p = 0.5 * (1 + math.erf(z / math.sqrt(2)))  # the normal quantile's probability
        if dof < 2:
            t = math.tan(math.pi * (p - 0.5))
        else:
            t = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
        return t / z
    t = (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
         + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))
    return t / z


def stratified_estimate(accs, j: int, ms, Ns, population_forms=None, pools=None,
                        subsample=None, z: float | None = None) -> HoldoutEstimate:
    """:func:`holdout_estimate` for a stratified holdout (:mod:`curvlab.strata`).

    Stratum ``h`` has ``N_h`` samples; its holdout ``T_h`` (``accs[h]``, row ``j``) is drawn
    without replacement from a pool of ``P_h`` of them, independently of the subsample
    ``S`` (so of ``v``).  Two designs:

    * **stratified** ``S`` (``m_h = ms[h]`` drawn from stratum ``h``), pools the whole strata
      (``pools=None``, ``T_h`` may overlap ``S_h``):
      ``v^T H v = sum_h (N_h / N) mean_{d in h} q_d``, estimated by ``sum_h (N_h / N) mean_{T_h} q``;
    * **uniform** ``S`` of ``m`` samples (``subsample=(m, theta_S, residual_S)``), pools the
      ``P_h`` samples of each stratum outside ``S`` (post-stratification):
      ``v^T H v = (m theta_S + sum_h P_h mean_{d in pool h} q_d) / N``.

    Either is unbiased, with variance ``sum_h (P_h / N)^2 var(mean_{T_h} q) (1 - t_h / P_h)``
    (strata are drawn independently); exact when every ``T_h`` is its whole pool.  With
    ``population_forms[h]``, the exact mean of the Gauss-Newton forms over pool ``h``, each
    stratum's mean is that plus ``mean_{T_h}(q - c)``, as in :func:`holdout_estimate`.

    The residual ``||(I - v v^T) H v||`` is bounded by the norm of ``(I - v v^T) sum_h
    (P_h / N) H_{T_h} v`` (plus ``(m / N) residual_S`` for a uniform ``S``, by the triangle
    inequality) and :func:`residual_margin` over the strata, as in :func:`holdout_estimate`.

    ``subsample_se``: the standard error of the subsample's quadratic form along ``v``:
    ``sqrt(sum_h W_h^2 sigma_h^2 (1 - m_h / N_h) / m_h)`` for a stratified ``S``
    (``W_h = N_h / N``), ``sigma sqrt((1 - m / N) / m)`` for a uniform one, with ``sigma^2 =
    sum_h W_h sigma_h^2 + sum_h W_h (mu_h - mu)^2`` the population variance put together
    from the strata's spreads ``sigma_h`` (``stratum_std``) and means.  ``std`` is the
    per-sample spread that gives ``subsample_se`` under uniform sampling of ``m``, and
    ``holdout_std`` that of the holdout at its current allocation, read as a uniform
    holdout from the pools (so that :func:`holdout_size_for` sizes it with ``m = N - sum P_h``).

    With ``z`` (the normal quantile the caller's intervals use), ``se`` and
    ``subsample_se`` are widened by Student's ``t`` over ``z`` at their Satterthwaite
    degrees of freedom (:func:`student_factor`): each stratum's variance comes from its own
    groups, and the stratum that carries the heavy tail dominates the sum with few of them.
    """
    N = sum(Ns)
    pools = list(Ns) if pools is None else list(pools)
    if not len(accs) == len(ms) == len(Ns) == len(pools):
        raise ValueError(f"got {len(accs)} holdouts, {len(ms)} allocations, {len(pools)} pools "
                         f"and {len(Ns)} strata")
    if any(a is None for a in accs):
        raise ValueError("a stratified estimate needs a holdout in every stratum")
    v = accs[0].V[j].double()
    cv = population_forms is not None
    a = torch.zeros_like(v)
    total = se2 = spread = dof_se = 0.0
    t_all = sum(int(round(acc.W1)) for acc in accs)
    stds, means, noise_parts = [], [], []
    noise_sq = 0.0
    for h, (acc, P) in enumerate(zip(accs, pools)):
        w = P / N
        t_h = int(round(acc.W1))
        if not 0 < t_h <= P:
            raise ValueError(f"stratum {h}: holdout of {t_h} samples from a pool of {P}")
        if cv and not bool(acc.has_forms[j]):
            raise ValueError(f"population_forms given, but stratum {h}'s holdout groups lack "
                             "Gauss-Newton forms")
        fpc = max(0.0, 1 - t_h / P)
        if acc.groups < 2:
            var = var_h = math.inf
        else:
            var = float(acc.var_of_mean()[j])
            var_h = float(acc.cv_var_of_mean()[j]) if cv else var
        plain = float(acc.means()[j])
        total += w * (float(population_forms[h]) + float(acc.cv_means()[j]) if cv else plain)
        a += w * acc.P1[j].double() / acc.W1
        if fpc > 0:
            noise_parts.append((acc, j, w * w * fpc / acc.W1))
            noise_sq += w * w * fpc * float(acc.residual_sq()[1][j]) if acc.groups >= 2 else math.inf
        if fpc > 0:
            se2 += w ** 2 * var_h * fpc
            dof_se += (w ** 2 * var_h * fpc) ** 2 / max(acc.groups - 1, 1)
        spread += w ** 2 * var_h * t_all  # w_h^2 s_h^2 / alpha_h with alpha_h = t_h / t
        stds.append(math.sqrt(var * t_h))
        means.append(plain)
    perp = a - float(a @ v) * v
    raw = float(perp.pow(2).sum())
    margin = residual_margin(noise_parts, Z_RESIDUAL if z is None else z)
    residual = math.sqrt(raw) + margin
    fixed = 0.0
    if subsample is not None:  # a uniform S: its exact part
        m, theta, res_s = subsample
        total += m * theta / N
        residual += m / N * res_s
        fixed = m / N * res_s
    else:
        m = sum(ms)
    dofs = [acc.groups - 1 for acc in accs]
    sub_var = _subsample_var(stds, means, dofs, Ns, ms=None if subsample is not None else ms,
                             m=m, z=z if math.isfinite(se2) else None)
    if z is not None and math.isfinite(se2) and se2 > 0:  # Student's t (Satterthwaite)
        se2 *= student_factor(z, se2 ** 2 / dof_se) ** 2 if dof_se > 0 else 1.0
    rest = sum(pools)
    fpc_m = max(0.0, 1 - m / N)
    return HoldoutEstimate(
        value=total, se=math.sqrt(se2), std=math.sqrt(sub_var * m / fpc_m) if fpc_m > 0 else 0.0,
        residual=residual, holdout=t_all, holdout_std=math.sqrt(spread) * N / rest if rest > 0 else 0.0,
        control_variate=cv, subsample_se=math.sqrt(sub_var), stratum_std=tuple(stds),
        residual_parts=(fixed, raw, noise_sq, margin))


def _subsample_var(stds, means, dofs, Ns, ms=None, m: int = 0, z: float | None = None) -> float:
    """Variance of a subsample's quadratic form about the population's, from per-stratum
    spreads ``stds`` and ``means`` (each with ``dofs`` degrees of freedom) of strata of ``Ns``
    samples (``N`` in all).

    A stratified subsample (``ms[h]`` from stratum ``h``): ``sum_h W_h^2 sigma_h^2 (1 - m_h /
    N_h) / m_h`` (``W_h = N_h / N``).  A uniform one of ``m`` samples (``ms=None``): ``sigma^2
    (1 - m / N) / m``, with ``sigma^2 = sum_h W_h sigma_h^2 + sum_h W_h (mu_h - mu)^2`` put together
    from the strata (one stratum: its own spread).  With ``z``, widened by Student's ``t`` over
    ``z`` at the Satterthwaite degrees of freedom; ``inf`` where a spread is unknown.
    """
    N = sum(Ns)
    W = [n / N for n in Ns]
    groups = [max(d, 1) for d in dofs]
    if ms is None:  # a uniform S
        mu = sum(wh * x for wh, x in zip(W, means))
        var_pop = sum(wh * (s * s + (x - mu) ** 2) for wh, s, x in zip(W, stds, means))
        sub_var = var_pop * max(0.0, 1 - m / N) / max(m, 1)
        parts = [wh * s * s for wh, s in zip(W, stds)]
    else:
        parts = [wh ** 2 * s * s * max(0.0, 1 - mh / nh) / max(mh, 1)
                 for wh, s, mh, nh in zip(W, stds, ms, Ns)]
        sub_var = sum(parts)
    dof_sub = sum(x * x / g for x, g in zip(parts, groups))
    if z is not None and math.isfinite(sub_var) and sub_var > 0 and dof_sub > 0:
        sub_var *= student_factor(z, sum(parts) ** 2 / dof_sub) ** 2
    return math.inf if math.isnan(sub_var) else sub_var  # (a stratum without a spread: unknown)


def span_subsample_se(accs, i: int, j: int, Ns, ms=None, m: int = 0, z: float | None = None,
                      angles: int = 91) -> float:
    """The largest subsample standard error (as :func:`subsample_se` gives it for
    :func:`holdout_estimate` and :func:`stratified_estimate`, Student's ``t`` included) over the
    unit vectors of the span of rows ``i`` and ``j`` (``accs`` built with ``cross=True``).

    ``accs``: the holdout's accumulators, one per stratum (one for a uniform holdout, with
    ``Ns = [N]``), over the same rows; ``ms``: a stratified subsample's allocation, or ``None``
    and ``m`` a uniform one's size; ``inf`` where a stratum has fewer than two groups.

    The subsample bound needs the spread of ``u^T H_d u`` along the *extreme eigenvector*
    ``u``.  The vector ``v`` found on ``S`` understates it exactly when ``S`` under-represents
    ``u``: ``u``'s heavy samples missing from ``S`` are what turned ``v`` away from it.  A
    heuristic, not a bound: ``u`` is not in the span of ``v`` and the subsample's next Ritz
    vector (its guard), but nearer it than to ``v``.  On the tests' MLP (80 uniform subsamples
    of 200 and 400 of its 3,000 samples, exact Ritz vectors and exact spreads), the cosine of
    ``u`` with the span is 0.76-0.99 where with ``v`` it is 0.06-0.99, and the largest spread
    over the span, at least ``v``'s own (``phi = 0``), fell below 0.8 of ``u``'s in 7
    subsamples, ``v``'s own in 26.
    """
    if any(acc.groups < 2 for acc in accs):  # (no spread can be estimated: unknown)
        return math.inf
    moments = [acc.span_moments(i, j, angles) for acc in accs]
    dofs = [acc.groups - 1 for acc in accs]
    t = [acc.W1 for acc in accs]
    best = 0.0
    for a in range(len(moments[0][0])):
        stds = [math.sqrt(float(var[a]) * th) for (_, var), th in zip(moments, t)]
        means = [float(mean[a]) for mean, _ in moments]
        best = max(best, _subsample_var(stds, means, dofs, Ns, ms=ms, m=m, z=z))
    return math.sqrt(best)


def holdout_size_for(estimate: HoldoutEstimate, z: float, target: float, m: int, N: int) -> int:
    """Holdout size at which ``z * se`` reaches ``target`` (at most ``N - m``), from the
    spread of what the holdout averages (:attr:`HoldoutEstimate.holdout_std`)."""
    rest = N - m
    std = getattr(estimate, "holdout_std", estimate.std)
    if target <= 0 or std == 0:
        return rest if target <= 0 else estimate.holdout
    # z (rest/N) std sqrt(1/t - 1/rest) <= target
    inv = (target * N / (z * rest * std)) ** 2 + 1 / rest
    return int(min(rest, math.ceil(1 / inv)))


def predicted_estimate(estimate: HoldoutEstimate, t: int, m: int, N: int) -> HoldoutEstimate:
    """``estimate`` as a holdout of ``t`` samples (outside ``m`` of ``N``) should give it, for sizing.

    The holdout's variances scale with ``1/t - 1/(N - m)``: ``se`` and the residual's margin
    as its square root, the residual's noise part as itself; its signal part
    (``perp_sq - noise_sq``, at least zero) and the subsample's share stay; never above the
    residual it has.  The result is a
    prediction (a holdout's estimates move when it grows), never an interval's input.
    """
    rest, t0 = N - m, estimate.holdout
    if not 0 < t0 < rest:
        return estimate
    ratio = max(0.0, 1 / min(t, rest) - 1 / rest) / (1 / t0 - 1 / rest)
    change = dict(se=estimate.se * math.sqrt(ratio), holdout=min(t, rest))
    if estimate.residual_parts:
        fixed, perp_sq, noise_sq, margin = estimate.residual_parts
        if math.isfinite(noise_sq) and math.isfinite(margin):
            # the signal's unbiased estimate (noisy: 0.6-6.7 around a residual of 4.1 in
            # BENCHMARKS.md; a holdout grown on it is judged again after it grows)
            signal = max(0.0, perp_sq - noise_sq)
            perp_sq, noise_sq, margin = signal + noise_sq * ratio, noise_sq * ratio, margin * math.sqrt(ratio)
            change.update(residual=min(estimate.residual, fixed + math.sqrt(perp_sq) + margin),
                          residual_parts=(fixed, perp_sq, noise_sq, margin))
    return dataclasses.replace(estimate, **change)


def kato_temple_interval(end: str, estimate: HoldoutEstimate, z: float, neighbour: float
                         ) -> tuple[float, float]:
    """Interval for an extreme eigenvalue from a Rayleigh quotient and its residual.

    Kato-Temple: if ``rho = v^T H v`` and ``||H v - rho v|| = r``, and the next
    eigenvalue satisfies ``lambda_2 <= a < rho`` (top end), then
    ``rho <= lambda_max <= rho + r^2 / (rho - a)``.  Here ``rho`` is known to
    ``z * se`` and ``a`` is ``neighbour``, meant to bound ``lambda_2`` from
    above; the caller takes it from the subsample (its second Ritz value plus
    its residual), a heuristic: a subsample's second eigenvalue is not a bound
    on the full data's, and ``r`` is itself an estimate
    (:func:`holdout_estimate`), so this side is first-order honest rather than
    guaranteed (its coverage is measured in the tests).  Mirrored for ``lambda_min`` (``neighbour`` a lower bound of the second
    smallest).  The quadratic term is what makes this tight for an isolated
    eigenvalue (``r^2 / gap``, second order in the vector's error); in a cluster
    (``rho - a <= 0``) there is no bound and the interval is infinite on that side.
    """
    lo, hi = estimate.value - z * estimate.se, estimate.value + z * estimate.se
    r2 = estimate.residual ** 2
    if end == "max":
        gap = lo - neighbour
        return lo, (hi + r2 / gap) if gap > 0 else math.inf
    if end == "min":
        gap = neighbour - hi
        return (lo - r2 / gap) if gap > 0 else -math.inf, hi
    raise ValueError(f"end must be 'max' or 'min', got {end!r}")


def sampling_room(e_stat: float, e_kt: float, target: float) -> float:
    """Largest ``s = z se`` with a half-width within ``target`` (``<= 0``: none).

    Half-width: ``(e_stat + s) / 2`` when the subsample bound binds, ``s + e_kt / 2``
    when Kato-Temple does; the better of the two.
    """
    room = 2 * target - e_stat
    if math.isfinite(e_kt):
        room = max(room, target - e_kt / 2)
    return room


def guard_overturns(end: str, extreme, guard, z: float) -> bool:
    """Whether the holdout puts the subsample's guard vector beyond its extreme one.

    For ``lambda_min``: the guard's unbiased Rayleigh quotient is below the extreme's by
    more than ``z`` standard errors of the difference.  Then ``lambda_min`` is below the
    guard's quotient (Courant-Fischer) and the subsample's extreme pair is not the full
    data's: the outward bounds built on it (subsample extreme, Kato-Temple) do not hold.
    """
    gap = extreme.value - guard.value if end == "min" else guard.value - extreme.value
    return gap > z * math.hypot(extreme.se, guard.se)
