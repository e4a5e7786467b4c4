"""What each ``curvature=`` flag costs and returns, with the approximation's build counted (issue 14).

The case of the issue: the ResNet-8 (BatchNorm) of ``experiments/bench_floors.py`` fit 10 epochs
to the first 2,048 CIFAR-10 images at 16x16 (``small``; ``small-fit``: 40 epochs, 100 % train
accuracy, as a late-training case), the Hessian over the first ``--samples`` (512) of them,
default tolerances.  Per flag (``none``, ``diag``, ``ggn``, ``kfac``), per ``approx_rank`` of
``--ranks`` and per seed of ``--seeds``, both ends and ``lambda_max`` alone (``which="LA"``):
``cost.hvps`` (full-data HVP equivalents, the build included: gradient work at half an HVP),
``cost.phases`` (``approximation`` is the build), the values and intervals, and whether each
interval holds the reference (``none`` at a tight tolerance, ``tol=tol_min=1e-4``, float64).
Variants, for comparison with what the defaults were before (``--variants``): ``precond``
(``lambda_min`` by the preconditioned LOBPCG route, ``APPROX_POLICY.precondition_min``) and
``exact-fisher`` (K-FAC and the diagonal built with the exact Fisher, ten backward passes per
sample here instead of one).  ``--perfect-start``: also each ``which`` warm-started from the
reference itself (``init=`` the float64 call, its eigenvectors converged to ``1e-4``), the
least any start vector, and so any approximation's, could leave to the solver: what a flag
could save at most, build aside; and both ends from the reference's top vector alone
(``perfect top start``: what a perfect Gauss-Newton or K-FAC start would give).

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_flags --json runs/flags.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
import curvlab.solve
from experiments.bench_correctness import small_checkpoint
from experiments.bench_floors import CASES, load_small_case, log, small_case_parser

FLAGS = ("none", "diag", "ggn", "kfac")
VARIANTS = {"default": {}, "precond": dict(precondition_min=True), "exact-fisher": dict(fisher="exact")}


def call(model, X, Y, flag: str, which: str, rank: int, seed: int, variant: str = "default",
         init=None) -> dict:
    policy = curvlab.solve.APPROX_POLICY
    saved = dict(vars(policy))
    vars(policy).update(VARIANTS[variant])
    try:
        r = curvlab.extremes(model, F.cross_entropy, (X, Y), curvature=flag, which=which, seed=seed,
                             approx_rank=rank, init=init)
    finally:
        vars(policy).update(saved)
    out = dict(flag=flag, variant=variant, rank=rank, seed=seed, which=which, hvps=r.cost.hvps,
               phases=r.cost.phases, seconds=r.cost.seconds)
    for end in ("max", "min"):
        v = getattr(r, f"lambda_{end}")
        if v is not None and v == v:
            out[end] = dict(value=v, interval=getattr(r, f"interval_{end}"),
                            converged=bool(getattr(r, f"converged_{end}")))
    return out


def configurations(ranks, variants):
    """``(flag, rank, variant)``: ``none`` once, each approximation per rank, the variants at rank 1."""
    yield "none", 1, "default"
    for flag in FLAGS[1:]:
        for rank in ranks:
            yield flag, rank, "default"
        for variant in variants:
            if variant == "precond" or (variant == "exact-fisher" and flag != "ggn"):
                yield flag, ranks[0], variant


def main(argv=None):
    p = small_case_parser(__doc__)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ranks", default="1,8", help="approx_rank values (the first also for the variants)")
    p.add_argument("--variants", default="precond,exact-fisher")
    p.add_argument("--perfect-start", action="store_true",
                   help="also each which warm-started from the reference (flag none): the floor under any start")
    p.add_argument("--flags", default=",".join(FLAGS), help="comma-separated curvature flags")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    cache, data, X, Y = load_small_case(args)
    X, Y = X[:args.samples], Y[:args.samples]
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), cases={})
    for case, epochs in CASES.items():
        model, meta = small_checkpoint(cache, data, case, epochs)
        ref = curvlab.extremes(model, F.cross_entropy, (X, Y), tol=1e-4, tol_min=1e-4, dtype=torch.float64,
                               sampling="exact", seed=1)
        out = dict(train_acc=meta["train_acc"], ref=dict(max=ref.lambda_max, min=ref.lambda_min,
                                                         hvps=ref.cost.hvps), calls=[], summary=[])
        report["cases"][case] = out
        log(f"{case} (train acc {meta['train_acc']:.3f}): reference max {ref.lambda_max:.6g} "
            f"min {ref.lambda_min:.6g} ({ref.cost.hvps:.0f} HVPs)")
        flags = args.flags.split(",")
        # (the best any start could do: both reference vectors; the top one alone, which is all
        # that a Gauss-Newton or K-FAC start can hold, for both ends)
        starts = {"perfect start": ref, "perfect top start": dataclasses.replace(ref, vector_min=None)}
        for which in ("both", "LA"):
            perfect = ([("none", 1, v) for v in starts if which == "both" or v == "perfect start"]
                       if args.perfect_start else [])
            for flag, rank, variant in [c for c in configurations(ranks, variants) if c[0] in flags] + perfect:
                calls = []
                for seed in range(args.seeds):
                    if variant in starts:
                        d = call(model, X, Y, flag, which, rank, seed, init=starts[variant])
                        d["variant"] = variant
                    else:
                        d = call(model, X, Y, flag, which, rank, seed, variant)
                    for end in ("max", "min"):
                        if end in d:
                            lo, hi = d[end]["interval"]
                            lam = out["ref"][end]
                            d[end].update(rel_err=abs(d[end]["value"] - lam) / abs(lam),
                                          holds=bool(lo <= lam <= hi))
                    calls.append(d)
                out["calls"] += calls
                hv = [d["hvps"] for d in calls]
                build = [d["phases"].get("approximation", 0.0) for d in calls]
                errs = {e: max(d[e]["rel_err"] for d in calls) for e in ("max", "min") if e in calls[0]}
                holds = all(d[e]["holds"] for d in calls for e in errs)
                summary = dict(which=which, flag=flag, rank=rank, variant=variant, mean_hvps=sum(hv) / len(hv),
                               min_hvps=min(hv), max_hvps=max(hv), mean_build=sum(build) / len(build),
                               max_rel_err=errs, all_hold=holds)
                out["summary"].append(summary)
                log(f"  {which:>4} {flag:>4} rank {rank} {variant:>12}: mean {summary['mean_hvps']:6.1f} HVPs "
                    f"({min(hv):.1f}-{max(hv):.1f}; build {summary['mean_build']:.1f}) | max error "
                    + ", ".join(f"{e} {100 * v:.2f} %" for e, v in errs.items()) + f" | all hold: {holds}")
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
