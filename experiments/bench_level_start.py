"""Products a subsample level's ``lambda_min`` search takes, by its start vector (issue 13).

On a checkpoint ``c50k-e{E}`` of ``experiments/bench_cnn50k.py`` (ResNet-8, all 50,000
unaugmented CIFAR-10 images, eval mode), with the search's own settings (``lanczos(which="SA",
k=2, guard=True)`` at half of the default 5 % tolerance, as ``multilevel._solve_ends`` runs it):

1. a level of ``--small`` images (the first of a fixed permutation) from a random vector;
2. a level of ``--big`` images (the first ``--big`` of the same permutation, so that the small
   level's images are among them) from: a random vector; the small level's extreme Ritz vector
   plus a tenth of a random unit vector (what ``_start_vector`` makes of it); the sum of the
   small level's extreme and guard vectors plus the same random part.

Per run: products until the extreme pair and its guard both pass the test, and each step's two
Ritz values and residuals.  What it tells: how much a level's search gains from the vector of a
smaller level of the same call (and, compared with a warm call's search cost, from the previous
epoch's vector).

With ``--bases 40,120`` only the ``--big`` level from a random start, once per thick-restart
basis size (``max_basis``).

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_level_start --epoch 5 --small 2048 --big 8192
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from curvlab.hvp import HessianOperator
from experiments.bench_correctness import BIG, POOL, big_checkpoints, load_checkpoint
from experiments.bench_curvature import make_data
from experiments.bench_floors import log
from experiments.cifar import find_cifar10

lanczos_module = importlib.import_module("curvlab.lanczos")  # (curvlab.lanczos is also the function)


def search(H, perm, m: int, X0, tol: float = 0.025, max_matvecs: int = 80, max_basis: int = 60,
           block_size: int | None = None) -> tuple:
    """The level search on the first ``m`` images of ``perm``: (result, per-step trace).
    ``block_size``: rows per Lanczos step (``None``: one, or the start block's rows)."""
    trace = []
    ritz = lanczos_module._ritz

    def traced(V, AV, theta, S, idx):
        out = ritz(V, AV, theta, S, idx)
        trace.append(dict(basis=V.shape[0], time=time.perf_counter(), values=[float(t) for t in theta[idx]],
                          residuals=[float(r) for r in out[2]]))
        return out

    lanczos_module._ritz = traced
    try:
        HS = H.subset(perm[:m])
        r = lanczos_module.lanczos(HS.matvec, HS.n, which="SA", k=2, X0=X0, tol=(tol, tol),
                                   max_matvecs=max_matvecs, max_basis=max_basis, guard=True, seed=0,
                                   block_size=block_size)
    finally:
        lanczos_module._ritz = ritz
    return r, trace


def level_arguments(description: str, epoch: int) -> argparse.ArgumentParser:
    """The options shared by the level benchmarks (this one and ``bench_deflate``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--epoch", type=int, default=epoch)
    p.add_argument("--small", type=int, default=2048)
    p.add_argument("--big", type=int, default=8192)
    p.add_argument("--json", default=None)
    return p


def level_problem(args) -> tuple:
    """``(H, perm, rnd)``: the checkpoint's full-data Hessian (trained once if missing), the
    fixed permutation whose first ``m`` images make a level, and a fixed random unit vector."""
    data = find_cifar10(args.data)
    X, Y = make_data(data, BIG, POOL)
    paths = big_checkpoints(Path(args.cache), data, [args.epoch], X, Y)
    model, _ = load_checkpoint(paths[args.epoch])
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=512)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(10_007)
    rnd = torch.randn(H.n, generator=g)
    return H, perm, rnd / rnd.norm()


def main(argv=None):
    p = level_arguments(__doc__.split("\n")[0], epoch=5)
    p.add_argument("--bases", default=None,
                   help="comma-separated max_basis values: only the --big level from a random start, "
                        "once per value (the search's thick-restart basis; extremes' default is 120)")
    p.add_argument("--max-products", type=int, default=200, help="with --bases: products per run at most")
    p.add_argument("--blocks", default="1",
                   help="with --bases: comma-separated Lanczos block sizes (rows per step), each run "
                        "per basis size; a block of k costs (1 + 2k)/3 single HVPs in FLOPs (rev-rev)")
    args = p.parse_args(argv)
    H, perm, rnd = level_problem(args)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                  epoch=args.epoch, runs=[])

    def record(label, m, X0, **kw):
        t = time.perf_counter()
        r, trace = search(H, perm, m, X0, **kw)
        row = dict(label=label, m=m, products=r.matvecs, block_size=kw.get("block_size") or 1,
                   converged=r.converged.tolist(),
                   values=r.values.tolist(), residuals=r.residual_norms.tolist(),
                   seconds=time.perf_counter() - t, trace=trace)
        report["runs"].append(row)
        log(f"{label} (m={m}): {r.matvecs} products, converged {row['converged']}, "
            f"values {[round(v, 4) for v in row['values']]}, residuals "
            f"{[f'{x:.3g}' for x in row['residuals']]}, {row['seconds']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return r

    if args.bases:  # the --big level from a random start, per thick-restart basis size
        for b in (int(x) for x in args.bases.split(",")):
            for k in (int(x) for x in args.blocks.split(",")):
                label = f"random start, max_basis {b}" + (f", block {k}" if k > 1 else "")
                record(label, args.big, None, max_basis=b, max_matvecs=args.max_products,
                       block_size=k)
        return
    small = record("random start", args.small, None)
    v = small.vectors[0] / small.vectors[0].norm()
    w = small.vectors[1] / small.vectors[1].norm()
    both = (v + w) / (v + w).norm()
    record("random start", args.big, None)
    record("small level's extreme vector", args.big, v + 0.1 * rnd)
    record("small level's extreme + guard", args.big, both + 0.1 * rnd)


if __name__ == "__main__":
    main()
