"""What each ``curvature=`` flag costs and returns, with the approximation's build counted (issue 14).

The case of the issue: the ResNet-8 (BatchNorm) of ``experiments/bench_floors.py`` fit 10 epochs
to the first 2,048 CIFAR-10 images at 16x16 (``small``; ``small-fit``: 40 epochs, 100 % train
accuracy, as a late-training case), the Hessian over the first ``--samples`` (512) of them,
default tolerances.  Per flag (``none``, ``diag``, ``ggn``, ``kfac`` and, for comparison,
``kfac`` with the "expand" factorisation of convolutions that was the default before), both
ends and ``lambda_max`` alone (``which="LA"``): ``cost.hvps`` (full-data HVP equivalents, the
build included: gradient work at half an HVP), ``cost.phases`` (``approximation`` is the build),
the values and intervals, and whether each interval holds the reference (``none`` at a tight
tolerance, ``tol=tol_min=1e-4``, float64).

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_flags --json runs/flags.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
import curvlab.curvature.kfac as kfac_module
from experiments.bench_correctness import small_checkpoint
from experiments.bench_floors import CASES, load_small_case, log, small_case_parser

FLAGS = ("none", "diag", "ggn", "kfac", "kfac-expand")


def call(model, X, Y, flag: str, which: str) -> dict:
    name = "kfac" if flag.startswith("kfac") else flag
    init = kfac_module.KFAC.__init__
    if flag == "kfac-expand":  # the option is the class's; extremes builds with the default
        kfac_module.KFAC.__init__ = lambda self, *a, **k: init(self, *a, **dict(k, conv="expand"))
    try:
        r = curvlab.extremes(model, F.cross_entropy, (X, Y), curvature=name, which=which, seed=0)
    finally:
        kfac_module.KFAC.__init__ = init
    out = dict(flag=flag, which=which, hvps=r.cost.hvps, phases=r.cost.phases, seconds=r.cost.seconds)
    for end in ("max", "min"):
        v = getattr(r, f"lambda_{end}")
        if v is not None and v == v:
            out[end] = dict(value=v, interval=getattr(r, f"interval_{end}"),
                            converged=bool(getattr(r, f"converged_{end}")))
    return out


def main(argv=None):
    p = small_case_parser(__doc__)
    p.add_argument("--samples", type=int, default=512)
    args = p.parse_args(argv)
    cache, data, X, Y = load_small_case(args)
    X, Y = X[:args.samples], Y[:args.samples]
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), cases={})
    for case, epochs in CASES.items():
        model, meta = small_checkpoint(cache, data, case, epochs)
        ref = curvlab.extremes(model, F.cross_entropy, (X, Y), tol=1e-4, tol_min=1e-4, dtype=torch.float64,
                               sampling="exact", seed=1)
        out = dict(train_acc=meta["train_acc"], ref=dict(max=ref.lambda_max, min=ref.lambda_min,
                                                         hvps=ref.cost.hvps), calls=[])
        log(f"{case} (train acc {meta['train_acc']:.3f}): reference max {ref.lambda_max:.6g} "
            f"min {ref.lambda_min:.6g} ({ref.cost.hvps:.0f} HVPs)")
        for which in ("both", "LA"):
            for flag in FLAGS:
                d = call(model, X, Y, flag, which)
                for end in ("max", "min"):
                    if end in d:
                        lo, hi = d[end]["interval"]
                        lam = out["ref"][end]
                        d[end].update(rel_err=abs(d[end]["value"] - lam) / abs(lam), holds=bool(lo <= lam <= hi))
                out["calls"].append(d)
                ends = "; ".join(f"{e} {d[e]['value']:.5g} err {100 * d[e]['rel_err']:.2f} % holds={d[e]['holds']}"
                                 for e in ("max", "min") if e in d)
                log(f"  {which:>4} {flag:>11}: {d['hvps']:6.1f} HVPs (" + ", ".join(
                    f"{k} {v:.1f}" for k, v in d["phases"].items()) + f"), {d['seconds']:.0f} s | {ends}")
                report["cases"][case] = out
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
