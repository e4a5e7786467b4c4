"""Would deflating the top outliers shorten a level's ``lambda_min`` search? (issue 13)

On a checkpoint ``c50k-e{E}`` of ``experiments/bench_cnn50k.py`` (ResNet-8, all 50,000
unaugmented CIFAR-10 images, eval mode), on the first ``--small`` and ``--big`` images of a fixed
permutation (the small level's images among the big one's, as in
``experiments/bench_level_start.py``):

1. the shared search of the small level (``lanczos(which="both", k=2, guard=True)`` at the
   search tolerance, 2.5 %), and the same run with ``k=12`` to get the top twelve Ritz vectors
   (the outliers: about 98, 63, 56, 32, 28, 20, ... at ``c50k-e15``, over a bulk within a few
   units of zero);
2. the big level's ``lambda_min`` search (``which="SA", k=2, guard=True``) from the small
   level's extreme vector plus a tenth of a random unit vector, with the operator deflated by
   the small level's top ``K`` Ritz vectors, ``K`` in ``--deflate``, and from a random vector
   with and without; per run the products until the extreme and its guard pass, the Ritz values
   and residuals of the deflated operator, and the *true* residual ``||H_S y - theta y||`` of
   the extreme Ritz vector on the undeflated subsample Hessian (one more product);
3. a tight (``tol=1e-4``) undeflated run for the subsample's ``lambda_min``.

What it tells: whether the top outliers, known only from a smaller level, can be taken out of a
level's Krylov space.  Deflation with vectors that are not invariant for ``H_S`` leaves the
Rayleigh quotient an upper bound (a compression) but not the residual: what the subsample bound
``theta_S - res`` needs is the true one.

Run (2 threads, about seven minutes)::

    OMP_NUM_THREADS=2 python -m experiments.bench_deflate --epoch 15 --json runs/deflate_e15.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from curvlab.lanczos import lanczos
from experiments.bench_floors import log
from experiments.bench_level_start import level_arguments, level_problem


def main(argv=None):
    p = level_arguments(__doc__.split("\n")[0], epoch=15)
    p.add_argument("--deflate", default="0,1,3,6,10", help="numbers K of top vectors deflated")
    args = p.parse_args(argv)
    H, perm, rnd = level_problem(args)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), epoch=args.epoch,
                  parameters=H.n, runs=[])

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    HS = H.subset(perm[:args.small])
    t = time.perf_counter()
    wide = lanczos(HS.matvec, HS.n, which="both", k=12, tol=(0.025, 0.025), max_matvecs=80, max_basis=80,
                   guard=True, seed=0)
    report["small_k12"] = dict(products=wide.matvecs, values=wide.values.tolist(),
                               residuals=wide.residual_norms.tolist(), seconds=time.perf_counter() - t)
    log(f"small level ({args.small}), k=12: {wide.matvecs} products; Ritz values "
        f"{[round(v, 3) for v in wide.values.tolist()]}")
    search = lanczos(HS.matvec, HS.n, which="both", k=2, tol=(0.025, 0.025), max_matvecs=80, max_basis=60,
                     guard=True, seed=0)
    report["small_search"] = dict(products=search.matvecs, values=search.values.tolist())
    log(f"small level search (k=2): {search.matvecs} products; values {search.values.tolist()}")
    top = wide.vectors[-12:].flip(0)  # descending
    v = search.vectors[0] / search.vectors[0].norm()
    HB = H.subset(perm[:args.big])

    def run(label, X0, K, tol=0.025, max_matvecs=80):
        t = time.perf_counter()
        r = lanczos(HB.matvec, HB.n, which="SA", k=2, X0=X0, tol=(tol, tol), max_matvecs=max_matvecs,
                    max_basis=60, guard=True, seed=0, deflate=top[:K] if K else None)
        y = r.vectors[0] / r.vectors[0].norm()
        Hy = HB.matvec(y[None])[0]
        theta = float(y @ Hy)
        row = dict(label=label, deflated=K, products=r.matvecs, converged=r.converged.tolist(),
                   values=r.values.tolist(), residuals=r.residual_norms.tolist(), rayleigh=theta,
                   true_residual=float((Hy - theta * y).norm()), seconds=time.perf_counter() - t)
        report["runs"].append(row)
        log(f"{label}: {r.matvecs} products, values {[round(x, 5) for x in row['values']]}, residuals "
            f"{[f'{x:.3g}' for x in row['residuals']]}; true residual {row['true_residual']:.3g}")
        save()

    for K in (int(k) for k in args.deflate.split(",")):
        run(f"from the small level's vector, top {K} deflated", v + 0.1 * rnd, K)
    for K in (0, 6):
        run(f"random start, top {K} deflated", None, K)
    run("tight reference (undeflated, tol 1e-4)", v + 0.1 * rnd, 0, tol=1e-4, max_matvecs=200)
    return report


if __name__ == "__main__":
    main()
