"""Thick-restart block Lanczos for the extreme eigenpairs of a symmetric operator.

The solver knows nothing of models or data: it takes ``matvec``, a function
that maps a block ``V`` of shape ``(b, n)`` to ``(A V^T)^T`` (each row
multiplied by the symmetric matrix ``A``), and returns Ritz pairs at one or
both ends of the spectrum with their residual norms.

Method.  A block Krylov basis ``V`` (orthonormal rows) is grown from a start
block; each step multiplies the newest block by ``A`` (one ``matvec`` call), and
orthogonalises the product against the whole basis twice (full
reorthogonalisation, classical Gram-Schmidt applied twice, so the basis stays
orthonormal to working precision and no spurious copies of converged
eigenvalues appear).  Products ``AV`` are *stored* next to ``V``; so the projected
matrix ``T = V A V^T`` is exact rather than a recurrence, and the residual of a
Ritz pair ``(theta, y = s^T V)`` is computed exactly as
``r = s^T (AV) - theta y``, not estimated.

Restarts are *thick* (Wu & Simon 2000): when the basis reaches ``max_basis``
rows, it is replaced by the best Ritz vectors at the wanted end(s), and their
products ``A y`` are recombined from the stored ``AV`` at no matvec cost.  The
residuals of these Ritz vectors all lie in the span of the next, still
unmultiplied block, so the iteration continues as a Krylov method: nothing the
basis has learnt about the wanted ends is thrown away, unlike an explicit
restart from a single vector.  With ``deflate`` vectors ``U`` the operator is
``(I - UU^T) A (I - UU^T)`` on the complement of their span, and residuals are
those of that operator (so they converge when ``U`` is only approximately
invariant; the eigenvalue error is then second order in ``U``'s error).

Error bound.  For a unit vector ``y`` and ``theta = y^T A y``, some eigenvalue of
``A`` lies within ``||A y - theta y||`` of ``theta``.  That residual norm is
returned as the error bound of each Ritz value.  The largest Ritz value is a
lower bound of ``lambda_max`` and the smallest an upper bound of
``lambda_min`` (Courant-Fischer), so a Ritz value can only err inward.

Stopping rule.  A wanted pair is converged when ``||r|| <= max(tol * |theta|, atol,
floor * max_i |theta_i|)``: the tolerance is relative to the eigenvalue *itself*, not to the
spread ``lambda_max - lambda_min``.  With ``lambda_max = 100`` and ``lambda_min = -0.5`` a rule
relative to the spread would accept ``lambda_min`` with an error of 100 * tol,
i.e. no digits at all; ``atol`` and ``floor`` only matter when ``lambda_min`` is (near) zero
at the spectrum's scale, or as a precision floor.  With ``guard=True`` the next pair inward
at each end must settle too (see :func:`lanczos`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["lanczos", "EigenResult", "LanczosResult", "orthonormalize"]

WHICH = ("LA", "SA", "both")


@dataclass(frozen=True)
class EigenResult:
    """Ritz pairs at the wanted end(s), ascending by value: what every curvlab solver
    (:func:`lanczos`, :func:`curvlab.lobpcg.lobpcg`) returns.

    For ``which="both"`` and ``k`` pairs per end, the first ``k`` entries are the
    smallest Ritz values and the last ``k`` the largest.

    Attributes:
        values: Ritz values ``(m,)`` (float64).
        vectors: Ritz vectors ``(m, n)`` (rows, unit norm, operator dtype).
        residual_norms: ``||A y - theta y||`` per pair ``(m,)``: error bounds.
        converged: per pair, whether the stopping rule held ``(m,)``.
        matvecs: vectors multiplied by ``A`` (a block of ``b`` counts ``b``).
        calls: calls of ``matvec`` (blocks).
        restarts: thick restarts done.
        history: per step, ``{"matvecs", "lambda_min", "res_min", "lambda_max", "res_max"}``
            (only the entries of the wanted ends).
        thresholds: per pair, the residual threshold of the stopping rule at the last step
            ``(m,)`` (:func:`lanczos`; ``None`` from solvers that do not set it).
    """

    values: Tensor
    vectors: Tensor
    residual_norms: Tensor
    converged: Tensor
    matvecs: int
    calls: int
    restarts: int
    history: List[dict] = field(default_factory=list)
    thresholds: Optional[Tensor] = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


LanczosResult = EigenResult  # the name before the solvers shared one result type


def orthonormalize(W: Tensor, basis: Optional[Tensor] = None, *, passes: int = 2,
                   drop_tol: float | None = None) -> Tensor:
    """Rows of ``W`` made orthonormal to ``basis`` (rows) and to each other.

    Classical Gram-Schmidt against ``basis`` applied ``passes`` times, then a
    QR factorisation.  Rows that were (numerically) inside the span are
    dropped, so the result may have fewer rows than ``W``.
    """
    if W.numel() == 0:
        return W
    norms0 = W.norm(dim=1)
    for _ in range(passes):
        if basis is not None and basis.shape[0] > 0:
            W = W - (W @ basis.T) @ basis
    if drop_tol is None:
        drop_tol = 100 * torch.finfo(W.dtype).eps * max(1, W.shape[1]) ** 0.5
    # QR of the n x b matrix; the diagonal of R says which directions are new.
    Q, R = torch.linalg.qr(W.T)
    keep = R.diagonal().abs() > drop_tol * norms0.clamp_min(torch.finfo(W.dtype).tiny)
    Q = Q.T[keep]
    if Q.shape[0] and basis is not None and basis.shape[0] > 0:
        Q = Q - (Q @ basis.T) @ basis  # one more pass: QR may reintroduce tiny components
        Q = Q / Q.norm(dim=1, keepdim=True)
    return Q


def _random_block(b: int, n: int, like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(b, n, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def lanczos(matvec: Callable[[Tensor], Tensor], n: int, *, which: str = "both", k: int = 1,
            X0: Optional[Tensor] = None, block_size: Optional[int] = None,
            tol: float | tuple[float, float] = 1e-3, atol: float = 0.0, floor: float = 0.0,
            max_matvecs: int = 500, max_basis: int = 60,
            deflate: Optional[Tensor] = None, dtype: torch.dtype = torch.float32,
            device=None, seed: int = 0, callback: Optional[Callable[[dict], None]] = None,
            guard: bool = False, v0: Optional[Tensor] = None) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Args:
        matvec: ``(b, n) -> (b, n)``, row-wise products with the symmetric ``A``.
        n: dimension.
        which: ``"LA"`` (largest), ``"SA"`` (smallest) or ``"both"``.
        k: pairs wanted at each wanted end.
        X0: start block ``(n,)`` or ``(r, n)``; completed by random vectors to
            ``block_size`` rows.  ``None``: random.  (``v0``, its former name, still
            works and warns.)
        block_size: rows multiplied per step (default: ``max(1, r)``).
        tol, atol, floor: stopping rule per wanted pair,
            ``||r|| <= max(tol * |theta|, atol, floor * max_i |theta_i|)``: relative to
            the pair's own value, with an absolute floor and one relative to the
            spectrum's scale (for eigenvalues that are zero at that scale).
            ``tol`` may be a pair ``(tol_smallest, tol_largest)``, one per end.
        max_matvecs: budget in vectors multiplied (the solver stops when the
            next block would exceed it).
        max_basis: basis rows before a thick restart.
        deflate: orthonormal rows ``(d, n)`` whose span is excluded from the search.
        dtype, device: of the basis (that of the operator's products).
        seed: seeds the random start and refill vectors.
        callback: called after every step with the step's history entry.
        guard: with ``k >= 2``, the innermost wanted pair at each end is a *guard*
            of the extreme one: it also counts as converged when its residual is
            below a quarter of its distance to the end's extreme Ritz value.  It
            then only has to show that the Krylov space has resolved a distinct
            eigenvalue inside the extreme one (what rules out a Ritz vector that
            mixes a cluster's outer members), not to meet the tolerance itself:
            for an isolated extreme that is far cheaper; in a cluster tighter
            than the tolerance nothing changes.  The guard's own threshold takes
            only a quarter of the ``floor`` term (``floor / 4 * max_i |theta_i|``):
            at a floor above the spacing of the end's eigenvalues, an interior mix
            and its neighbour both pass the floor's test after a few steps while the
            extreme eigenvalue is farther off than the floor (a bottom at -1.0
            reported as -0.57 at a threshold of 0.25); the guard must first resolve
            its neighbour at a finer scale than the extreme is asked for.  No pair
            counts as converged before the basis holds an extreme and a guard at each
            wanted end (``k`` Ritz values per end), unless it spans the whole space; the
            relaxation to a quarter of the distance waits for more than ``2 k`` Ritz
            values.

    Returns:
        :class:`EigenResult`.  Cost: ``result.matvecs`` products with ``A``.

    Example:
        >>> A = torch.diag(torch.arange(1., 101.))
        >>> r = lanczos(lambda V: V @ A, 100, tol=1e-8, dtype=torch.float64)
        >>> [round(float(v), 6) for v in r.values]
        [1.0, 100.0]
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if v0 is not None:
        if X0 is not None:
            raise TypeError("pass the start block as X0 only (v0 is its former name)")
        warnings.warn("lanczos(v0=...) is deprecated: pass the start block as X0 (the name "
                      "lobpcg uses too)", DeprecationWarning, stacklevel=2)
        X0 = v0
    v0 = X0
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tol_lo, tol_hi = (tol, tol) if isinstance(tol, (int, float)) else tuple(tol)
    if min(tol_lo, tol_hi, atol, floor) < 0 or min(tol_lo, tol_hi) == atol == floor == 0:
        raise ValueError(f"need tol, atol, floor >= 0, not all zero; got {tol}, {atol}, {floor}")
    gen = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=dtype, device=device)
    U = None
    if deflate is not None and deflate.numel():
        U = orthonormalize(deflate.reshape(-1, n).to(like.device, dtype))
    d = 0 if U is None else U.shape[0]
    room = n - d
    if room < 1:
        raise ValueError("deflation leaves no room: the deflated vectors span the whole space")
    if v0 is not None:
        v0 = v0.reshape(-1, n).to(like.device, dtype)
    rows = 0 if v0 is None else v0.shape[0]
    b = block_size or max(1, rows)
    b = min(b, room)
    n_ends = 2 if which == "both" else 1
    b0 = min(max(b, rows), room)  # the start block may be wider than the later ones
    max_basis = max(min(max_basis, room), min(room, n_ends * k + b0 + b))

    # start block: given vectors, then random ones, orthonormal and orthogonal to U
    P = orthonormalize(v0, U) if rows else like.new_zeros(0, n)
    while P.shape[0] < b:
        P = torch.cat([P, orthonormalize(_random_block(b - P.shape[0], n, like, gen), _cat(U, P))])
    wide_start = P.shape[0] > b

    V = like.new_zeros(0, n)
    AV = like.new_zeros(0, n)
    T = torch.zeros(0, 0, dtype=torch.float64)
    matvecs = calls = restarts = 0
    history: List[dict] = []
    result = None
    while True:
        W = matvec(P)
        if W.shape != P.shape:
            raise ValueError(f"matvec returned shape {tuple(W.shape)} for a block of shape {tuple(P.shape)}")
        W = W.to(like.device, dtype)
        if U is not None:  # the deflated operator (I - UU^T) A (I - UU^T): its residuals converge
            W = W - (W @ U.T) @ U  # even when U is only approximately invariant
        matvecs += P.shape[0]
        calls += 1
        # extend the projected matrix with the new block's rows and columns
        C = (torch.cat([V, P]) @ W.T).double()  # (m + b, b)
        m = V.shape[0]
        Tn = torch.zeros(m + P.shape[0], m + P.shape[0], dtype=torch.float64)
        Tn[:m, :m] = T
        Tn[:, m:] = C.cpu()
        Tn[m:, :m] = C[:m].T.cpu()
        T = (Tn + Tn.T) / 2
        V, AV = torch.cat([V, P]), torch.cat([AV, W])

        theta, S = torch.linalg.eigh(T)
        idx = _wanted(theta.numel(), which, k)
        Y, R, res = _ritz(V, AV, theta, S, idx)
        scale = float(theta.abs().max())
        tols = torch.where(idx < theta.numel() / 2, tol_lo, tol_hi).double()
        if which != "both":
            tols.fill_(tol_lo if which == "SA" else tol_hi)
        own = torch.clamp(tols * theta[idx].abs(), min=atol)
        thr = torch.clamp(own, min=floor * scale)
        guarded = guard and k >= 2
        paired = idx.numel() >= (2 if which == "both" else 1) * k  # an extreme and a guard per end
        if guarded and paired:  # a guard's own threshold takes a quarter of the floor
            thr = _guard_thresholds(thr, theta[idx], which, k,
                                    torch.clamp(own, min=GUARD_SHARE * floor * scale),
                                    relax=theta.numel() > 2 * k)
        conv = res <= thr
        if guarded and not paired and V.shape[0] < room:
            conv = torch.zeros_like(conv)  # too few Ritz pairs yet to hold a guard apart
        entry = {"matvecs": matvecs}
        if which in ("SA", "both"):
            entry.update(lambda_min=float(theta[0]), res_min=float(res[0]))
        if which in ("LA", "both"):
            entry.update(lambda_max=float(theta[-1]), res_max=float(res[-1]))
        history.append(entry)
        if callback is not None:
            callback(entry)
        result = (theta[idx], Y, res, conv, thr)
        exhausted = V.shape[0] >= room
        if bool(conv.all()) or exhausted or matvecs + b > max_matvecs:
            break

        # next block: A P orthogonalised against the basis (and the deflated span).
        # After a start block wider than b (a subspace, e.g. an approximation's top
        # eigenvectors), keep only the wanted Ritz vectors Y of that subspace and go on
        # from their residuals R: A Y = Y Theta + R, so the iteration is again a
        # (block) Krylov method, started from the subspace's best vectors.
        W_next = W
        if wide_start:
            Sk = S[:, idx].to(like.device, dtype)
            V, AV, T = Sk.T @ V, Sk.T @ AV, torch.diag(theta[idx])
            W_next, wide_start = R, False
        P = orthonormalize(W_next, _cat(U, V))
        if P.shape[0] < b:  # an invariant subspace was found: continue from fresh directions
            free = room - V.shape[0] - P.shape[0]
            extra = min(b - P.shape[0], free)
            if extra > 0:
                P = torch.cat([P, orthonormalize(_random_block(extra, n, like, gen), _cat(U, V, P))])
        if P.shape[0] == 0:
            break
        if V.shape[0] + P.shape[0] > max_basis:
            keep = _restart_indices(theta.numel(), which, k, max_basis, P.shape[0])
            Sk = S[:, keep].to(like.device, dtype)
            V, AV = Sk.T @ V, Sk.T @ AV
            T = torch.diag(theta[keep])
            restarts += 1

    values, vectors, res, conv, thr = result
    return EigenResult(values=values.clone(), vectors=vectors, residual_norms=res.cpu(),
                         converged=conv.cpu(), matvecs=matvecs, calls=calls, restarts=restarts,
                         history=history, thresholds=thr.cpu())


# a guard pair settles at this share of its distance to the extreme (see lanczos): a half lets
# tests/test_traps.py's warm start on a cluster's second eigenvector converge on it
GUARD_SHARE = 0.25


def _guard_thresholds(thr: Tensor, values: Tensor, which: str, k: int,
                      own: Optional[Tensor] = None, relax: bool = True) -> Tensor:
    """Residual thresholds with each end's guard pair relaxed (see ``lanczos(guard=True)``).

    ``values`` are the wanted Ritz values in ``_wanted``'s (ascending) order, ``k`` per
    wanted end (``2 k`` for ``"both"``).  A guard's threshold is the larger of ``own`` (its
    tolerance with a quarter of the floor; default ``thr``) and, with ``relax`` (``lanczos``:
    once the basis holds more than ``2 k`` Ritz values), a quarter of its distance to the
    extreme; the extremes keep ``thr``.
    """
    own = thr if own is None else own
    thr = thr.clone()
    ends = []
    if which in ("SA", "both"):
        ends.append((0, k - 1))  # (extreme, guard) positions at the bottom
    if which in ("LA", "both"):
        top = len(values) - 1
        ends.append((top, top - k + 1))
    for e, g in ends:
        thr[g] = torch.maximum(own[g], (values[g] - values[e]).abs() * GUARD_SHARE) if relax else own[g]
    return thr


def _cat(*blocks: Optional[Tensor]) -> Optional[Tensor]:
    blocks = [x for x in blocks if x is not None and x.shape[0] > 0]
    return torch.cat(blocks) if blocks else None


def _wanted(m: int, which: str, k: int) -> Tensor:
    if which == "LA":
        return torch.arange(max(0, m - k), m)
    if which == "SA":
        return torch.arange(0, min(k, m))
    if m <= 2 * k:
        return torch.arange(m)
    return torch.cat([torch.arange(k), torch.arange(m - k, m)])


def _restart_indices(m: int, which: str, k: int, max_basis: int, b: int) -> Tensor:
    """Ritz vectors kept at a thick restart: about half the basis, at the wanted end(s)."""
    ends = 2 if which == "both" else 1
    keep = max(ends * (k + 1), (max_basis - b) // 2)
    keep = min(keep, max_basis - b, m)
    if which == "LA":
        return torch.arange(m - keep, m)
    if which == "SA":
        return torch.arange(0, keep)
    lo = (keep + 1) // 2
    return torch.cat([torch.arange(0, lo), torch.arange(m - (keep - lo), m)])


def _ritz(V: Tensor, AV: Tensor, theta: Tensor, S: Tensor, idx: Tensor):
    """Ritz vectors ``y = s^T V`` and exact residual norms ``||s^T AV - theta y||``."""
    Si = S[:, idx].to(V.device, V.dtype)
    Y = Si.T @ V
    R = Si.T @ AV - theta[idx].to(V.device, V.dtype)[:, None] * Y
    return Y, R, R.double().norm(dim=1).cpu()
