"""How far the holdout's estimate of a vector's full-data residual strays (issue 13).

Kato-Temple's outward side for ``lambda_max`` is ``r + z se + res^2 / gap``, with ``res`` the
full-data residual ``||(I - v v^T) H v||`` estimated from the holdout's mean product
(:func:`curvlab.sampling.holdout_estimate`).  This script takes the vector a default
``which="LA"`` call returns at ``c50k-e15`` (``--seed``), computes its exact residual with one
full-data product, and draws ``--holdouts`` random holdouts of ``--size`` images in 32 groups:
per holdout, the norm with its noise left in (``raw``, what ``holdout_estimate`` used before this
became a bound), with the noise estimate taken out (``debiased``, what it used before that), the
noise, and the upper confidence bound ``holdout_estimate`` now uses (``bound``: ``raw`` plus
:func:`curvlab.sampling.residual_margin` at ``z = 1.96``, from 16 blocks of the 32 groups).

Run (2 threads, alone; about 3 minutes)::

    OMP_NUM_THREADS=2 python -m experiments.bench_residual --seed 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
from curvlab.hvp import HessianOperator
from curvlab.sampling import Z_RESIDUAL, residual_margin
from experiments.bench_correctness import BIG, POOL, big_checkpoints, load_checkpoint
from experiments.bench_curvature import make_data
from experiments.bench_floors import log
from experiments.cifar import find_cifar10


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--epoch", type=int, default=15, help="checkpoint c50k-e{E}")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--holdouts", type=int, default=20)
    p.add_argument("--size", type=int, default=2048)
    args = p.parse_args(argv)
    data = find_cifar10(args.data)
    X, Y = make_data(data, BIG, POOL)
    paths = big_checkpoints(Path(args.cache), data, [args.epoch], X, Y)
    model, _ = load_checkpoint(paths[args.epoch])
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=args.seed, which="LA")
    H = HessianOperator(model.eval(), F.cross_entropy, (X, Y), batch_size=512)
    N = len(X)
    v = r.vector_max.float()
    v = v / v.norm()
    Hv, vd = H.matvec(v[None])[0].double(), v.double()
    rq = float(vd @ Hv)
    res = float((Hv - rq * vd).norm())
    log(f"c50k-e{args.epoch}, seed {args.seed}: interval {r.interval_max}; exact Rayleigh quotient {rq:.5f}, "
        f"exact residual {res:.4f} (squared {res * res:.2f})")
    raws, debiased, noises, bounds = [], [], [], []
    for k in range(args.holdouts):
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(900 + k))[:args.size]
        acc = H.subset(idx).holdout_statistics(v[None], group_size=max(1, args.size // 32))
        raw, noise = (float(x[0]) for x in acc.residual_sq())
        fpc = 1 - args.size / N
        raws.append(raw ** 0.5)
        debiased.append(max(0.0, raw - fpc * noise) ** 0.5)
        noises.append(noise)
        bounds.append(raws[-1] + residual_margin([(acc, 0, fpc / args.size)], Z_RESIDUAL))
        log(f"  holdout {k}: residual raw {raws[-1]:.3f}, debiased {debiased[-1]:.3f}, bound "
            f"{bounds[-1]:.3f}, noise (squared) {noise:.2f}")
    for name, xs in (("raw", raws), ("debiased", debiased), ("bound", bounds)):
        t = torch.tensor(xs, dtype=torch.float64)
        log(f"{name}: mean {float(t.mean()):.3f}, sd {float(t.std()):.3f}, range {float(t.min()):.3f}-"
            f"{float(t.max()):.3f}, mean square {float((t * t).mean()):.2f}, below the exact residual in "
            f"{int((t < res).sum())} of {len(xs)}")
    log(f"noise (squared): mean {sum(noises) / len(noises):.2f}")


if __name__ == "__main__":
    main()
