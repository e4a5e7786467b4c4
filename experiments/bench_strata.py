"""Where to cut the strata (issue 13): equal-count strata by the per-sample loss against
strata that are finer where the curvature sits.

``extremes`` stratifies ``lambda_min``'s subsamples by the per-sample loss
(:mod:`curvlab.strata`), into equal-count strata before this script.  On a well-fit network the curvature sits in the top few per
cent of the losses, finer than an eighth, so equal-count strata lose about half of what
importance sampling gets (BENCHMARKS.md, "Sampling floors by estimator").  This script scores
ways of placing the strata's edges on the same loss, by the variance of the stratified mean of
``c_d = v^T H_d v`` along each extreme eigenvector:

* ``equal``: ``K`` strata of equal size (the rule before this script);
* ``optimal``: at most ``K`` strata whose edges minimise ``sum_h W_h S_h(loss)``, the Neyman
  standard error if the curvature followed the loss, by dynamic programming over 512
  candidate edges, none under 32 samples (``curvlab.estimators.proxy_strata(cut="optimal")``,
  the rule ``extremes`` uses now);
* ``halving``: each stratum half the size of the one below it, the top two equal (the top
  ``1/2^(K-1)`` of the losses cut finest);
* ``cum-sqrt-f``: Dalenius and Hodges' rule on the loss (equal shares of the cumulative
  square root of its histogram), the classical edges for Neyman allocation;
* ``equal-mass``: equal sums of the loss per stratum.

(``halving``, ``cum-sqrt-f`` and ``equal-mass`` keep at least ``max(32, N / 512)`` samples per
stratum.)

Each rule is scored twice, as a **variance factor** over uniform sampling (``sigma^2`` over the
estimator's variance per draw, as in ``experiments/bench_floors.py``): with the population's own
strata spreads (``limit``, the best a warm start approaches), and with spreads measured on a
pilot (``pilot``: a stratified sample of ``--pilot`` draws, proportional with at least 16 per
stratum, as a level's holdout gives them; Neyman allocation from them, with the floors
``curvlab.estimators.neyman_allocation`` adds; mean over 200 pilots of the variance at a
subsample of ``--pilot`` draws).  Importance sampling by the loss (defensive mixture, 10 %
uniform) is the reference.

Cases: ``small`` and ``small-fit`` (``experiments/bench_floors.py``: 2,048 images, weakly and
well fit; vectors: its float64 eigenvectors, cached) and ``c50k-e5``, ``c50k-e15``
(``experiments/bench_cnn50k.py``: all 50,000 images; vectors: a cold seed-0 ``extremes`` call's,
cached with ``c_d`` in ``--cache``).

Run (one process; the 50k cases cost a cold call and two passes over the data each)::

    OMP_NUM_THREADS=2 python -m experiments.bench_strata --json runs/strata.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
from curvlab.estimators import neyman_allocation, proxy_strata
from curvlab.multilevel import POLICY
from curvlab.hvp import HessianOperator
from experiments.bench_correctness import BIG, POOL, SMALL_TRAIN, big_checkpoints, load_checkpoint, small_checkpoint
from experiments.bench_curvature import make_data
from experiments.bench_floors import CASES, eigenvectors, is_factor, log, proxies, strata_spreads
from experiments.cifar import find_cifar10

RULES = ("equal", "optimal", "halving", "cum-sqrt-f", "equal-mass")


# ---------------------------------------------------------------- strata edges

def strata_by(rule: str, proxy: torch.Tensor, K: int, min_size: int) -> list:
    """Indices of ``K`` strata of ``proxy`` (lowest first) under ``rule`` (see the module)."""
    N = proxy.numel()
    order = torch.sort(proxy.double(), stable=True).indices
    if rule in ("equal", "optimal"):  # curvlab's own cuts, with the policy's floor
        return proxy_strata(proxy.double(), K, cut=rule, min_size=POLICY.stratum_size)
    if rule == "halving":
        sizes = [N / 2 ** (h + 1) for h in range(K - 1)]
        sizes.append(sizes[-1])
        return _cut(order, [max(x, min_size) for x in sizes])
    s = proxy.double()[order]
    if rule == "cum-sqrt-f":
        bins = 256
        lo, hi = float(s[0]), float(s[-1])
        hist = torch.histc(s, bins=bins, min=lo, max=hi)
        cum = torch.cumsum(hist.sqrt(), 0)
        edges = [lo + (hi - lo) * (int(torch.searchsorted(cum, cum[-1] * k / K)) + 1) / bins
                 for k in range(1, K)]
        counts = [int(torch.searchsorted(s, torch.tensor(e, dtype=s.dtype), right=True)) for e in edges]
        sizes = [b - a for a, b in zip([0] + counts, counts + [N])]
    elif rule == "equal-mass":
        cum = torch.cumsum(s - s[0] + 1e-12, 0)
        counts = [int(torch.searchsorted(cum, cum[-1] * k / K)) for k in range(1, K)]
        sizes = [b - a for a, b in zip([0] + counts, counts + [N])]
    else:
        raise ValueError(rule)
    return _cut(order, [max(x, min_size) for x in sizes])


def _cut(order: torch.Tensor, sizes: list) -> list:
    """Cut ``order`` into pieces of about ``sizes`` (rescaled to sum to ``N``; the largest
    pieces give way), dropping empty ones."""
    N = order.numel()
    sizes = [float(x) for x in sizes]
    while sum(sizes) > N + 0.5:  # the floors overshot: take the excess from the largest
        i = max(range(len(sizes)), key=lambda j: sizes[j])
        sizes[i] -= min(sum(sizes) - N, sizes[i] / 2)
    scale = N / sum(sizes)
    ends = torch.tensor([round(x) for x in torch.cumsum(torch.tensor(sizes) * scale, 0).tolist()])
    ends[-1] = N
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    return [order[a:b] for a, b in zip(starts.tolist(), ends.tolist()) if b > a]


# ---------------------------------------------------------------- scores

def limit_factor(c: torch.Tensor, groups: list) -> float:
    """Neyman with the population's own spreads: ``sigma^2 / (sum W_h S_h)^2``."""
    W, S = strata_spreads(c, groups)
    return float(c.var(unbiased=False) / (W * S).sum() ** 2)


def pilot_factor(c: torch.Tensor, groups: list, pilot: int, trials: int, seed: int) -> float:
    """Neyman from spreads measured on a stratified pilot of ``pilot`` draws (proportional,
    at least 16 per stratum), scored at a subsample of ``pilot`` draws (mean variance over
    ``trials`` pilots), as a factor over uniform sampling."""
    g = torch.Generator().manual_seed(seed)
    sizes = [len(x) for x in groups]
    W, S = strata_spreads(c, groups)
    prop = neyman_allocation(sizes, torch.ones(len(sizes), dtype=torch.float64), pilot, minimum=16,
                             spread_floor=0.0)
    var = 0.0
    for _ in range(trials):
        est = []
        for x, k in zip(groups, prop):
            pick = x[torch.randperm(len(x), generator=g)[:max(k, 2)]]
            est.append(float(c[pick].std()) if len(pick) > 1 else 0.0)
        alloc = neyman_allocation(sizes, torch.tensor(est, dtype=torch.float64), pilot, minimum=8)
        var += float((W * W * S * S / torch.tensor(alloc, dtype=torch.float64)).sum())
    var /= trials
    return float(c.var(unbiased=False) / pilot / var)


# ---------------------------------------------------------------- per-sample curvature

def small_case(cache: Path, data, name: str) -> dict:
    path = cache / f"strata_c_{name}.pt"
    if path.exists():
        return torch.load(path)
    X, Y = make_data(data, SMALL_TRAIN, POOL)
    model, meta = small_checkpoint(cache, data, name, CASES[name])
    eig = eigenvectors(cache, name, model, X, Y)
    H = HessianOperator(model, F.cross_entropy, (X, Y), dtype=torch.float64, batch_size=512)
    out = dict(train_acc=meta["train_acc"], loss=proxies(model, X, Y)["loss"],
               c={end: H.per_sample_curvature(eig[end].double()).double() for end in ("min", "max")})
    torch.save(out, path)
    return out


def big_case(cache: Path, data, E: int, X, Y) -> dict:
    path = cache / f"strata_c_c50k-e{E}.pt"
    if path.exists():
        return torch.load(path)
    paths = big_checkpoints(cache, data, [E], X, Y)
    model, meta = load_checkpoint(paths[E])
    t = time.perf_counter()
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=0)
    log(f"  c50k-e{E}: cold call {time.perf_counter() - t:.0f} s, min {r.lambda_min:.4f}, max {r.lambda_max:.4f}")
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=512)
    c = {}
    for end in ("min", "max"):
        v = getattr(r, f"vector_{end}").float()
        c[end] = H.per_sample_curvature(v / v.norm()).double()
    out = dict(train_acc=meta["train_acc"], loss=proxies(model, X, Y)["loss"], c=c)
    torch.save(out, path)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--cases", default="small,small-fit,c50k-e5,c50k-e15")
    p.add_argument("--strata", type=int, default=8)
    p.add_argument("--pilot", type=int, default=None, help="pilot draws (default: N / 8, at most 2,048)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = find_cifar10(args.data)
    big = None
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), strata=args.strata, cases={})
    for name in args.cases.split(","):
        if name.startswith("c50k-e"):
            if big is None:
                big = make_data(data, BIG, POOL)
            case = big_case(cache, data, int(name[len("c50k-e"):]), *big)
        else:
            case = small_case(cache, data, name)
        loss = case["loss"]
        N = loss.numel()
        pilot = args.pilot or min(2048, N // 8)
        min_size = max(2 * 16, N // 512)
        rec = dict(train_acc=case["train_acc"], N=N, pilot=pilot, ends={})
        for end, c in case["c"].items():
            c = c.double()
            row = {"cv": float(c.std(unbiased=False) / c.mean().abs()),
                   "is:loss": is_factor(c, loss.double()), "rules": {}}
            for rule in RULES:
                groups = strata_by(rule, loss, args.strata, min_size)
                row["rules"][rule] = dict(
                    sizes=[len(x) for x in groups], limit=limit_factor(c, groups),
                    pilot=pilot_factor(c, groups, pilot, args.trials, seed=1))
            rec["ends"][end] = row
            log(f"{name} {end}: cv {row['cv']:.2f}, is:loss {row['is:loss']:.2f}, " + ", ".join(
                f"{k} {v['limit']:.2f}/{v['pilot']:.2f}" for k, v in row["rules"].items()))
        log(f"{name}: sizes " + "; ".join(f"{k} {v['sizes']}" for k, v in row["rules"].items()))
        report["cases"][name] = rec
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
