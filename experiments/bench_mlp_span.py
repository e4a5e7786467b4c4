"""The subsample bound's span spread and the half level, on the tests' MLP against its dense truth.

The MLP (:func:`experiments.models.noisy_mlp`: 6-8-3 tanh, 83 parameters, 3,000 samples,
float64) is small enough for exact per-sample Hessians ``H_d`` and the exact spectrum, so this
script measures, with no reference of its own to trust:

* ``spread`` (exact Ritz vectors, no solver): for 40 uniform subsamples ``S`` of each size in
  ``--sizes`` (seeds ``1000 + i``), the top eigenvector ``v`` of ``H_S`` and the next one (its
  guard), the cosine of the full Hessian's top eigenvector ``u`` with ``v`` and with span(``v``,
  guard), and the population spread (standard deviation of ``w^T H_d w`` over all samples) of
  ``u``, of ``v``, and the largest over unit ``w`` in span(``v``, guard) (720 angles) and in the
  span of the top three (20,000 random directions): how often each understates ``u``'s spread
  (below 0.8 of it), and how often the subsample bound ``theta_S + z spread sqrt((1 - m/N)/m)``
  with that spread falls below ``lambda_max``.  What :func:`curvlab.sampling.span_subsample_se`
  estimates from a holdout (BENCHMARKS.md, "The subsample bound's spread over the extreme and
  guard span").
* ``span``: ``curvlab.extremes(..., sampling="multilevel", sample_size=m, tol=tol_min=0.05)`` for
  ``m`` in ``--sizes`` and ``--seeds`` seeds, with ``POLICY.span_spread`` on and off, side by
  side: intervals that miss the dense truth (per end), and the mean full-data HVPs.
* ``half``: the same calls at ``--half-sizes`` with ``POLICY.half_level`` off, on (the default:
  the half level runs when it is predicted to pass) and forced (``half_margin = inf``: whenever
  the rule's sizes call for it): HVPs, the levels' sizes, and the misses.
* ``gap``: the same calls at ``--gap-sizes``, ``--gap-seeds`` seeds and ``floor`` 0 and 0.03, with
  ``POLICY.gap_decay`` 0.5 (a level's gap predicted to shrink like the spread) and 1 (like the
  variance, the default): how the next level's size rule fares where the exact stage is cheap
  (BENCHMARKS.md, "How the gap shrinks").

Run (1 thread, about ten minutes)::

    OMP_NUM_THREADS=1 python -m experiments.bench_mlp_span --json runs/mlp_span.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, vmap

import curvlab
from experiments.bench_cnn50k import log, policy
from experiments.models import noisy_mlp

Z = 1.96  # curvlab's default confidence (95 %, two-sided)


def per_sample_hessians(model, X, Y) -> torch.Tensor:
    """``(N, P, P)``: the Hessian of each sample's loss in the model's parameters (flattened in
    curvlab's layout, :func:`curvlab.unflatten`)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(f, x, y):
        return F.cross_entropy(functional_call(model, curvlab.unflatten(model, f), (x[None],)), y[None])

    return vmap(hessian(loss), in_dims=(None, 0, 0))(flat, X, Y)


def spread_along(Hd, w) -> float:
    return float(torch.einsum("i,nij,j->n", w, Hd, w).std())


def span_spread(Hd, B, angles: int = 720) -> float:
    """The largest spread of ``w^T H_d w`` over unit ``w`` in the span of the rows of ``B``."""
    Q, _ = torch.linalg.qr(B.T)
    M = torch.einsum("pi,npq,qj->nij", Q, Hd, Q)
    if Q.shape[1] == 2:
        phi = torch.linspace(0, math.pi, angles, dtype=Hd.dtype)
        A = torch.stack([phi.cos(), phi.sin()], 1)
    else:
        A = torch.randn(20000, Q.shape[1], generator=torch.Generator().manual_seed(0), dtype=Hd.dtype)
        A = A / A.norm(dim=1, keepdim=True)
    return float(torch.einsum("ai,nij,aj->an", A, M, A).std(1).max())


def spread_study(Hd, sizes, subsamples: int = 40) -> dict:
    N = Hd.shape[0]
    ev, U = torch.linalg.eigh(Hd.mean(0))
    u, lmax = U[:, -1], float(ev[-1])
    su = spread_along(Hd, u)
    log(f"spread: lambda_max {lmax:.5g}, u's spread {su:.4g}")
    rows = []
    for m in sizes:
        for i in range(subsamples):
            S = torch.randperm(N, generator=torch.Generator().manual_seed(1000 + i))[:m]
            eS, US = torch.linalg.eigh(Hd[S].mean(0))
            v, guard, theta = US[:, -1], US[:, -2], float(eS[-1])
            row = dict(m=m, seed=1000 + i, cos_v=float(abs(u @ v)), cos_span=float((US[:, -2:].T @ u).norm()),
                       spread_u=su, spread_v=spread_along(Hd, v), spread_span=span_spread(Hd, torch.stack([v, guard])),
                       spread_span3=span_spread(Hd, US[:, -3:].T))
            scale = Z * math.sqrt((1 - m / N) / m)
            for key in ("u", "v", "span", "span3"):
                row[f"bound_below_{key}"] = theta + scale * row[f"spread_{key}"] < lmax
            rows.append(row)
    summary = {}
    for key in ("v", "span", "span3"):
        summary[key] = dict(understated=sum(r[f"spread_{key}"] < 0.8 * su for r in rows),
                            bound_below=sum(r[f"bound_below_{key}"] for r in rows))
    summary["u"] = dict(bound_below=sum(r["bound_below_u"] for r in rows))
    summary["cos_v"] = (min(r["cos_v"] for r in rows), max(r["cos_v"] for r in rows))
    summary["cos_span"] = (min(r["cos_span"] for r in rows), max(r["cos_span"] for r in rows))
    log(f"spread over {len(rows)} subsamples: {summary}")
    return dict(lambda_max=lmax, spread_u=su, summary=summary, rows=rows)


def calls(model, X, Y, truth: dict, sizes, seeds, variants: dict, floors=(0.0,)) -> dict:
    """``extremes`` at each size, seed and ``floor`` under each of ``variants`` (``{label:
    POLICY changes}``), side by side."""
    out = {}
    for label, changes in variants.items():
        runs = []
        with policy(**changes):
            for m, seed, floor in [(m, s, f) for m in sizes for s in seeds for f in floors]:
                r = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="multilevel", sample_size=m,
                                     tol=0.05, tol_min=0.05, floor=floor, seed=seed, batch_size=500)
                run = dict(m=m, seed=seed, floor=floor, hvps=r.cost.hvps,
                           levels=[lv["sample_size"] for lv in r.levels], sizes=dict(r.sample_sizes))
                for end in ("max", "min"):
                    lo, hi = getattr(r, f"interval_{end}")
                    run[end] = dict(value=getattr(r, f"lambda_{end}"), lo=lo, hi=hi,
                                    converged=bool(getattr(r, f"converged_{end}")),
                                    covers=bool(lo - truth["slack"] <= truth[end] <= hi + truth["slack"]))
                runs.append(run)
        misses = {e: sum(not r[e]["covers"] for r in runs) for e in ("max", "min")}
        hvps = [r["hvps"] for r in runs]
        out[label] = dict(runs=runs, misses=misses, mean_hvps=sum(hvps) / len(hvps),
                          hvps_range=(min(hvps), max(hvps)))
        log(f"{label}: {len(runs)} calls, misses {misses}, HVPs mean {sum(hvps) / len(hvps):.1f} "
            f"({min(hvps):.1f}-{max(hvps):.1f})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="spread,span,half,gap", help="comma-separated: spread, span, half, gap")
    p.add_argument("--sizes", default="200,400", help="subsample sizes of the spread study and the span calls")
    p.add_argument("--seeds", type=int, default=20, help="seeds 0 .. n-1 of the span calls")
    p.add_argument("--half-sizes", default="100,150", help="sample_size of the half-level calls")
    p.add_argument("--half-seeds", type=int, default=3)
    p.add_argument("--gap-sizes", default="100,200", help="sample_size of the gap-decay calls")
    p.add_argument("--gap-seeds", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    model, X, Y = noisy_mlp()
    Hd = per_sample_hessians(model, X, Y).detach()
    ev = torch.linalg.eigvalsh(Hd.mean(0))
    truth = dict(min=float(ev[0]), max=float(ev[-1]),
                 slack=ev.numel() * torch.finfo(torch.float64).eps * float(ev.abs().max()))
    log(f"MLP: {len(X)} samples, {Hd.shape[1]} parameters; dense lambda_min {truth['min']:.6g}, "
        f"lambda_max {truth['max']:.6g}")
    report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), threads=torch.get_num_threads(),
                  library=curvlab.__version__, truth=truth)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))

    if "spread" in parts:
        report["spread"] = spread_study(Hd, sizes)
        save()
    if "span" in parts:
        report["span"] = calls(model, X, Y, truth, sizes, range(args.seeds),
                               {"span": dict(span_spread=True), "no span": dict(span_spread=False)})
        save()
    if "half" in parts:
        half = [int(s) for s in args.half_sizes.split(",")]
        report["half"] = calls(model, X, Y, truth, half, range(args.half_seeds),
                               {"off": dict(half_level=False), "predicted": dict(half_level=True),
                                "forced": dict(half_level=True, half_margin=math.inf)})
        save()
    if "gap" in parts:
        gap = [int(s) for s in args.gap_sizes.split(",")]
        report["gap"] = calls(model, X, Y, truth, gap, range(args.gap_seeds),
                              {"gap 0.5": dict(gap_decay=0.5), "gap 1": dict(gap_decay=1.0)},
                              floors=(0.0, 0.03))
        save()
    return report


if __name__ == "__main__":
    main()
