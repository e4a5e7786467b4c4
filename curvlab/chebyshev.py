"""Chebyshev polynomial filters and Chebyshev-filtered subspace iteration.

Matrix-free like :mod:`curvlab.lanczos`: ``matvec`` maps a block ``(b, n)`` to
its row-wise products with a symmetric ``A``.

The filter.  With ``c = (upper + lower) / 2`` and ``e = (upper - lower) / 2``,
``L = (A - c I) / e`` maps the interval ``[lower, upper]`` onto ``[-1, 1]``, and

    p_m(A) = T_m(L),   T_0 = 1,  T_1(x) = x,  T_{j+1}(x) = 2 x T_j(x) - T_{j-1}(x),

with ``T_m`` the Chebyshev polynomial of the first kind.  On ``[-1, 1]``
``|T_m| <= 1``; outside it ``|T_m(x)| = cosh(m * arccosh|x|)`` grows as fast as
any degree-``m`` polynomial bounded by one on the interval can.  So ``p_m(A) V``
damps the eigencomponents of ``V`` inside ``[lower, upper]`` and amplifies those
outside, the more the farther out.  Placing ``[lower, upper]`` over the
unwanted part of the spectrum (for the smallest eigenvalues: from just above
them to ``lambda_max``) turns a block of vectors towards the wanted eigenvectors.
Cost: ``m`` ``matvec`` calls of ``b`` rows.

Subspace iteration (Zhou & Saad 2007, "A Chebyshev-Davidson algorithm";
Zhou, Saad, Tiago & Chelikowsky 2006, "ChFSI"): filter a block, orthonormalise
it, Rayleigh-Ritz, repeat, with the damped interval's inner end moved to the
outermost Ritz value of the block (so the filter gets more selective as the
block converges).

When it helps (measured, honestly: mostly it does not).  On the near-zero
test spectrum of ``tests/test_lobpcg.py`` (n = 1000, outliers up to 100, a
dense bulk in [-0.5, 0.5], ``lambda_min = -0.5`` at the bulk's edge), products
to reach ``lambda_min`` within 1e-2 relative, seeds 0-2:

* thick-restart Lanczos 30-34; LOBPCG with an outlier preconditioner 22-45;
* this subspace iteration with the outliers in (``upper = 101``): 412-494 at
  degree 40, 800-1094 at degree 20 -- a fixed polynomial cannot remove a few
  outliers the way a Krylov method does (Lanczos puts Ritz values on them);
* with the outliers deflated (``upper = 0.6``): 68 at degree 10, against 21-24
  for Lanczos or LOBPCG on the same deflated operator.

So in products it loses by 3x (deflated) to 15x.  What it offers is structure:
the products of an iteration are block products of ``b`` rows with no inner
products or orthogonalisation between them (per product it spent about
a third of Lanczos's wall time on this dense test), memory of ``3 b``
vectors, and it needs only a bound of the spectrum, no preconditioner.  That
pays only where a block of ``b`` products costs far less than ``b`` single ones.
On this CPU it does not: ``curvlab.hvp.HessianOperator`` on a small CNN
(n = 1562, 512 samples, one thread) costs 0.65-0.85x per vector in blocks of
4-8 compared with single products, far from the 3x the deflated filter would
need.  A GPU batching HVPs with ``vmap`` may come closer (not measured here).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .lanczos import LanczosResult, orthonormalize

__all__ = ["chebyshev_filter", "chebyshev_subspace"]

WHICH = ("SA", "LA")


def chebyshev_filter(matvec: Callable[[Tensor], Tensor], V: Tensor, degree: int, lower: float,
                     upper: float, *, scale_at: Optional[float] = None) -> Tensor:
    """``p(A) V`` for the degree-``m`` Chebyshev polynomial mapped to ``[lower, upper]``.

    ``p(t) = T_m((t - c) / e)`` with ``c = (upper + lower) / 2``, ``e = (upper - lower) / 2``
    (see the module docstring), by the three-term recurrence

        Y_0 = V,  Y_1 = (A V - c V) / e,  Y_{j+1} = 2 (A Y_j - c Y_j) / e - Y_{j-1}.

    With ``scale_at = a`` (outside ``[lower, upper]``) the result is divided by
    ``p(a)``, computed stably by the scaled recurrence of Zhou & Saad (2007):
    ``sigma_1 = e / (a - c)``, ``sigma_{j+1} = 1 / (2 / sigma_1 - sigma_j)``,
    ``Y_{j+1} = 2 sigma_{j+1} (A Y_j - c Y_j) / e - sigma_j sigma_{j+1} Y_{j-1}``.
    Choosing ``a`` near the wanted eigenvalue keeps the rows of order one
    instead of growing like ``cosh(m arccosh|x|)`` (which would overflow
    float32 for high degrees).

    Args:
        matvec: ``(b, n) -> (b, n)``, row-wise products with the symmetric ``A``.
        V: ``(n,)`` or ``(b, n)``.
        degree: ``m >= 0``.
        lower, upper: the interval mapped onto ``[-1, 1]`` (damped), ``lower < upper``.
        scale_at: optional point where the filter is normalised to one.

    Returns:
        ``p(A) V`` (or ``p(A) V / p(a)``), the shape of ``V``.  Cost: ``degree``
        ``matvec`` calls of ``b`` rows.

    Example:
        >>> A = torch.diag(torch.tensor([-1., 0., 1., 2.], dtype=torch.float64))
        >>> Y = chebyshev_filter(lambda V: V @ A, torch.eye(4, dtype=torch.float64), 3, 0., 2.)
        >>> Y.diagonal()  # T_3(t - 1) at t = -1, 0, 1, 2
        tensor([-26.,  -1.,   0.,   1.], dtype=torch.float64)
    """
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    lower, upper = float(lower), float(upper)
    if not (math.isfinite(lower) and math.isfinite(upper)) or not lower < upper:
        raise ValueError(f"need finite lower < upper, got lower={lower}, upper={upper}")
    if scale_at is not None and lower <= float(scale_at) <= upper:
        raise ValueError(f"scale_at={scale_at} lies inside [lower, upper] = [{lower}, {upper}], "
                         "where the filter may vanish; pick a point outside (the wanted end)")
    single = V.dim() == 1
    Y0 = V[None] if single else V
    if Y0.dim() != 2:
        raise ValueError(f"V must have shape (n,) or (b, n), got {tuple(V.shape)}")
    if degree == 0:
        return V.clone()
    c, e = (upper + lower) / 2, (upper - lower) / 2

    def L(Y: Tensor) -> Tensor:
        AY = matvec(Y)
        if AY.shape != Y.shape:
            raise ValueError(f"matvec returned shape {tuple(AY.shape)} for a block of shape {tuple(Y.shape)}")
        return (AY.to(Y.dtype) - c * Y) / e

    if scale_at is None:
        Y1 = L(Y0)
        for _ in range(degree - 1):
            Y0, Y1 = Y1, 2 * L(Y1) - Y0
    else:
        sigma1 = e / (float(scale_at) - c)
        sigma = sigma1
        Y1 = sigma1 * L(Y0)
        for _ in range(degree - 1):
            sigma_next = 1.0 / (2.0 / sigma1 - sigma)
            Y0, Y1 = Y1, 2 * sigma_next * L(Y1) - sigma * sigma_next * Y0
            sigma = sigma_next
    return Y1[0] if single else Y1


def chebyshev_subspace(matvec: Callable[[Tensor], Tensor], n: int, *, which: str = "SA", k: int = 1,
                       lower: Optional[float] = None, upper: Optional[float] = None,
                       degree: int = 20, block_size: Optional[int] = None, X0: Optional[Tensor] = None,
                       tol: float = 1e-3, atol: float = 0.0, floor: float = 0.0,
                       max_matvecs: int = 500, deflate: Optional[Tensor] = None,
                       dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
                       callback: Optional[Callable[[dict], None]] = None) -> LanczosResult:
    """Extreme eigenpairs by Chebyshev-filtered subspace iteration.

    Each iteration filters the block ``X`` (``b`` orthonormal rows) with
    :func:`chebyshev_filter` of degree ``m`` on the damped interval ``[cut, upper]``
    (``"SA"``) or ``[lower, cut]`` (``"LA"``), orthonormalises the result,
    multiplies it once by ``A`` and does Rayleigh-Ritz; the residuals are exact,
    from the stored products, and the stopping rule is that of
    :func:`curvlab.lanczos.lanczos`.

    The outer end must bound the spectrum: for ``"SA"``, ``upper >= lambda_max``
    (e.g. a Lanczos estimate of ``lambda_max`` plus its residual bound, times a
    small safety factor); for ``"LA"``, ``lower <= lambda_min``.  Eigenvalues beyond
    it would be amplified too.  A Ritz value found beyond it proves the bound
    wrong and raises ``ValueError``.

    The inner end ``cut`` is the other argument when given (e.g. the edge of the
    bulk for ``"SA"``: eigenvalues below it are amplified) and is otherwise
    adaptive: the outermost Ritz value of the block, the ``b``-th smallest
    (``"SA"``), which lies above ``lambda_b``; the rate per iteration for the
    wanted ``lambda_1`` is then ``1 / T_m(x(lambda_1))`` relative to the damped
    ``lambda_{b+1}, ...``.  With ``b = k`` the cut would sit on the wanted
    eigenvalue itself, so ``b > k`` is required for the adaptive cut.

    Args:
        matvec: ``(b, n) -> (b, n)``, row-wise products with the symmetric ``A``.
        n: dimension.
        which: ``"SA"`` or ``"LA"``.
        k: pairs wanted.
        lower, upper: the damped interval's ends (see above).
        degree: polynomial degree ``m >= 1`` per iteration.  The best degree grows
            like ``sqrt(spread / gap)``: on the near-zero test spectrum 40 was best
            of 5-160 with the outliers in (``upper = 101``), 10 with them deflated
            (``upper = 0.6``: 68 products against 86 at degree 20); much higher
            degrees overshoot (the last filter application is paid in full).
        block_size: ``b`` rows; default ``k + 1``, the least that the adaptive cut
            allows (measured on the near-zero test spectrum: ``k + 1`` took fewer
            products than ``k + 2`` or ``k + 4`` at every degree tried).
        X0: start rows ``(n,)`` or ``(r, n)``, completed by random rows.
        tol, atol, floor: stopping rule per wanted pair,
            ``||r|| <= max(tol * |theta|, atol, floor * max_i |theta_i|)``.
        max_matvecs: budget in vectors multiplied; the solver stops before an
            iteration that would exceed it.
        deflate: orthonormal rows ``(d, n)`` whose span is excluded (products
            are projected, as in :func:`curvlab.lobpcg.lobpcg`).
        dtype, device: of the basis.
        seed: seeds the random start rows.
        callback: called after every iteration with its history entry
            ``{"matvecs", "lambda_min", "res_min"}`` or ``{"matvecs", "lambda_max",
            "res_max"}``, plus ``"cut"``.

    Returns:
        :class:`~curvlab.lanczos.LanczosResult` with the ``k`` wanted pairs,
        ascending.  Cost: ``b`` products to start, then ``(m + 1) b`` per iteration.

    Example:
        >>> A = torch.diag(torch.arange(1., 101., dtype=torch.float64))
        >>> r = chebyshev_subspace(lambda V: V @ A, 100, upper=101., tol=1e-8,
        ...                        max_matvecs=2000, dtype=torch.float64)
        >>> round(float(r.values[0]), 6)
        1.0
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    if min(tol, atol, floor) < 0 or tol == atol == floor == 0:
        raise ValueError(f"need tol, atol, floor >= 0, not all zero; got {tol}, {atol}, {floor}")
    bound, cut = (upper, lower) if which == "SA" else (lower, upper)
    if bound is None:
        end = "upper >= lambda_max" if which == "SA" else "lower <= lambda_min"
        raise ValueError(f"which={which!r} needs {end}: the filter amplifies everything beyond it")
    sign = 1.0 if which == "SA" else -1.0
    # work on sign * A, always for the smallest end: damped interval [cut, bound]
    bound = sign * float(bound)
    cut = None if cut is None else sign * float(cut)
    if cut is not None and not cut < bound:
        raise ValueError(f"need lower < upper, got lower={lower}, upper={upper}")

    like = torch.empty(0, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    U = None
    if deflate is not None and deflate.numel():
        if deflate.shape[-1] != n:
            raise ValueError(f"deflate must have rows of length n={n}, got shape {tuple(deflate.shape)}")
        U = orthonormalize(deflate.reshape(-1, n).to(like.device, dtype))
    room = n - (0 if U is None else U.shape[0])
    b = k + 1 if block_size is None else block_size
    if not isinstance(b, int) or b < k:
        raise ValueError(f"block_size must be an int >= k={k}, got {block_size!r}")
    if cut is None and b == k:
        raise ValueError("the adaptive cut needs block_size > k (or pass the inner end of the interval)")
    b = min(b, room)
    if b < k:
        raise ValueError(f"only {room} dimensions are left after deflation, fewer than k={k}")
    if X0 is not None:
        if X0.dim() not in (1, 2) or X0.shape[-1] != n:
            raise ValueError(f"X0 must have shape (n,) or (r, n) with n={n}, got {tuple(X0.shape)}")
        X0 = X0.reshape(-1, n).to(like.device, dtype)
        if X0.shape[0] > b:
            raise ValueError(f"X0 has {X0.shape[0]} rows, more than block_size={b}")
    if max_matvecs < b:
        raise ValueError(f"max_matvecs={max_matvecs} cannot pay for the start block of {b} rows")

    matvecs = calls = 0

    def project(V: Tensor) -> Tensor:
        return V if U is None else V - (V @ U.T) @ U

    def op(V: Tensor) -> Tensor:
        nonlocal matvecs, calls
        AV = matvec(V)
        if AV.shape != V.shape:
            raise ValueError(f"matvec returned shape {tuple(AV.shape)} for a block of shape {tuple(V.shape)}")
        matvecs += V.shape[0]
        calls += 1
        return project(sign * AV.to(like.device, dtype))

    def fill(Y: Tensor) -> Tensor:
        while Y.shape[0] < b:
            extra = torch.randn(b - Y.shape[0], n, generator=gen, dtype=torch.float64).to(like.device, dtype)
            Y = torch.cat([Y, orthonormalize(extra, _cat(U, Y))])
        return Y

    X = fill(orthonormalize(X0, U) if X0 is not None and X0.shape[0] else like.new_zeros(0, n))
    AX = op(X)
    history: List[dict] = []
    while True:
        G = (X @ AX.T).double().cpu()
        theta, S = torch.linalg.eigh((G + G.T) / 2)
        Sd = S.to(like.device, dtype)
        X, AX = Sd.T @ X, Sd.T @ AX
        R = AX - theta.to(like.device, dtype)[:, None] * X
        res = R.double().norm(dim=1).cpu()
        scale = float(theta.abs().max())
        conv = res <= torch.clamp(tol * theta.abs(), min=max(atol, floor * scale))
        if float(theta[-1]) > bound:
            end = "upper" if which == "SA" else "lower"
            raise ValueError(f"a Ritz value {sign * float(theta[-1]):.6g} lies beyond {end}="
                             f"{sign * bound:.6g}, so {end} does not bound the spectrum; pass a safer bound")
        cut_now = float(theta[-1]) if cut is None else cut
        entry = {"matvecs": matvecs}
        if which == "SA":
            entry.update(lambda_min=float(theta[0]), res_min=float(res[0]))
        else:
            entry.update(lambda_max=-float(theta[0]), res_max=float(res[0]))
        entry["cut"] = sign * cut_now
        history.append(entry)
        if callback is not None:
            callback(entry)
        if bool(conv[:k].all()) or matvecs + (degree + 1) * b > max_matvecs:
            break
        if not cut_now < bound:
            break  # the block already spans the whole damped interval: nothing left to filter
        scale_at = min(float(theta[0]), cut_now - 1e-3 * (bound - cut_now))
        Y = chebyshev_filter(op, X, degree, cut_now, bound, scale_at=scale_at)
        X = fill(orthonormalize(project(Y), U))
        AX = op(X)

    vals = (sign * theta[:k]).clone()
    vecs, res_k, conv_k = X[:k], res[:k], conv[:k]
    if which == "LA":
        vals, vecs, res_k, conv_k = vals.flip(0), vecs.flip(0), res_k.flip(0), conv_k.flip(0)
    return LanczosResult(values=vals, vectors=vecs, residual_norms=res_k, converged=conv_k,
                         matvecs=matvecs, calls=calls, restarts=0, history=history)


def _cat(*blocks: Optional[Tensor]) -> Optional[Tensor]:
    blocks = [x for x in blocks if x is not None and x.shape[0] > 0]
    return torch.cat(blocks) if blocks else None
