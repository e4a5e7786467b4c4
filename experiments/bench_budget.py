"""The per-epoch budget (issue 4): both Hessian extremes, cost in training epochs.

Setting that this CPU can afford at the user's data size: an MLP on CIFAR-10
downsampled to 8x8 (192 inputs), trained on all 50,000 training images;
checkpoints early and late in one run.  At each checkpoint, side by side:

* reference: curvlab exact Lanczos on all data in float64, tight (1e-7);
* (a) PyHessian-style power iteration on all data (stop at relative change
  1e-3, at most 100 iterations); lambda_min by power on ``H - lambda_max I``;
* (b) plain full-data Lanczos (``sampling="exact"``, default tolerances);
* (c) the user's method: power iteration with the batch growing 64 -> 1000 ->
  all data, lambda_min again by the shift;
* (d) curvlab ``extremes`` multilevel, cold and warm (``init=`` the result of a
  cold call one epoch earlier, as in per-epoch use), default tolerances
  (1 % / 5 %, 95 % intervals);
* (e) the same for lambda_max alone (``which="LA"``);
* (f) curvlab with the issue's budget as ``max_hvps``: 3 epochs cold, 1 warm
  (it returns its best intervals, ``converged=False`` where short);
* floors: the cost of certifying the true eigenvector's Rayleigh quotient to
  the tolerance by sampling, from its measured per-sample variance.

Cost in epochs: per-sample HVP evaluations times the FLOPs of one HVP per
sample over the FLOPs of one gradient per sample, divided by N (one epoch = one
gradient pass over all N images), FLOPs from ``torch.utils.flop_counter``;
wall seconds over the seconds of one full gradient pass measured in the same
process.

Run: ``python -m experiments.bench_budget [--data PATH] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import curvlab
from curvlab.hvp import HessianOperator
from experiments.cifar import load_cifar10, normalize


def make_data(path, n):
    X, Y = load_cifar10(path, train=True, limit=n)
    X = F.avg_pool2d(normalize(X), 4).flatten(1)  # 8x8x3 = 192 features
    return X, Y


def make_model(seed=0, width=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(192, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


def train(model, X, Y, epochs, lr, gen):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()


def flops_per_sample(model, X, Y):
    """FLOPs of one gradient and of one HVP, per sample (batch of 256)."""
    xb, yb = X[:256], Y[:256]
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
    g = fc.get_total_flops() / len(xb)
    H = HessianOperator(model, F.cross_entropy, (xb, yb), batch_size=256)
    v = torch.randn(H.n)
    with FlopCounterMode(display=False) as fc:
        H.matvec(v)
    h = fc.get_total_flops() / len(xb)
    with FlopCounterMode(display=False) as fc:
        H.per_sample_curvature(v)
    q = fc.get_total_flops() / len(xb)
    model.zero_grad(set_to_none=True)
    return g, h, q


def gradient_pass_seconds(model, X, Y):
    model.eval()
    t = time.perf_counter()
    for i in range(0, len(X), 256):
        model.zero_grad()
        F.cross_entropy(model(X[i:i + 256]), Y[i:i + 256]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


class Counter:
    """Per-sample HVP evaluations of the baselines."""

    def __init__(self):
        self.samples = 0


def power(H: HessianOperator, counter: Counter, shift=0.0, v=None, tol=1e-3, max_iter=100, seed=0):
    """Power iteration on ``H - shift I``; returns (eigenvalue of H, vector)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(H.n, generator=g) if v is None else v.clone()
    v = v / v.norm()
    mu_old = None
    for _ in range(max_iter):
        Hv = H.matvec(v)
        counter.samples += H.num_samples
        mu = float(v @ Hv) - shift
        w = Hv - shift * v
        v = w / w.norm()
        if mu_old is not None and abs(mu - mu_old) <= tol * abs(mu_old) + 1e-30:
            break
        mu_old = mu
    return mu + shift, v


def pyhessian(model, X, Y, counter):
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=1000)
    lmax, _ = power(H, counter)
    lmin, _ = power(H, counter, shift=lmax)
    return lmax, lmin


def growing_power(model, X, Y, counter, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    out = []
    for shift_mode in ("max", "min"):
        v, lmax = None, out[0] if out else 0.0
        for b in (64, 1000, len(X)):
            idx = perm[:b]
            H = HessianOperator(model, F.cross_entropy, (X[idx], Y[idx]), batch_size=1000)
            lam, v = power(H, counter, shift=0.0 if shift_mode == "max" else lmax, v=v, seed=seed)
        out.append(lam)
    return out[0], out[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--checkpoints", default="1,3,10,30", help="epochs at which to measure")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable figures on a shared 2-core machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    X, Y = make_data(args.data, args.samples)
    N = len(X)
    model = make_model(width=args.width)
    n = sum(p.numel() for p in model.parameters())
    g_flops, h_flops, q_flops = flops_per_sample(model, X, Y)
    grad_s = gradient_pass_seconds(model, X, Y)
    print(f"N={N}, n={n} parameters; FLOPs/sample: gradient {g_flops:.3g}, HVP {h_flops:.3g} "
          f"({h_flops / g_flops:.2f}x), v^T H_d v {q_flops:.3g} ({q_flops / g_flops:.2f}x); "
          f"one gradient epoch {grad_s:.2f} s; torch {torch.__version__}, {platform.processor() or platform.machine()}")

    def epochs_of(hvp_samples, curv_samples=0):
        return (hvp_samples * h_flops + curv_samples * q_flops) / (g_flops * N)

    gen = torch.Generator().manual_seed(1)
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    rows, floors, done = [], [], 0
    for ep in checkpoints:
        prev = None
        if ep > 1:
            # per-epoch use: the warm start comes from the call one epoch earlier
            train(model, X, Y, ep - 1 - done, args.lr, gen)
            prev = curvlab.extremes(model, F.cross_entropy, (X, Y), batch_size=1000, sampling="multilevel")
            done = ep - 1
        train(model, X, Y, ep - done, args.lr, gen)
        done = ep
        t = time.perf_counter()
        ref = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="exact", tol=1e-7,
                               tol_min=1e-7, floor=0.0, dtype=torch.float64, max_hvps=2000,
                               batch_size=5000)
        ref_s = time.perf_counter() - t
        lmax, lmin = ref.lambda_max, ref.lambda_min
        print(f"\nepoch {ep}: reference lambda_max={lmax:.6g} (+-{ref.lambda_max_error:.1e}), "
              f"lambda_min={lmin:.6g} (+-{ref.lambda_min_error:.1e}), {ref.cost.hvps:.0f} HVPs, {ref_s:.0f} s")

        def row(name, vmax, vmin, epochs, seconds, imax=None, imin=None):
            r = dict(epoch=ep, method=name, lambda_max=vmax, lambda_min=vmin,
                     err_max=abs(vmax - lmax) / abs(lmax),
                     err_min=abs(vmin - lmin) / abs(lmin) if vmin == vmin else None,
                     cover_max=None if imax is None else imax[0] <= lmax <= imax[1],
                     cover_min=None if imin is None else imin[0] <= lmin <= imin[1],
                     epochs=epochs, seconds=seconds, seconds_in_epochs=seconds / grad_s,
                     ref_max=lmax, ref_min=lmin)
            rows.append(r)
            print(f"  {name:22s} lmax {vmax:10.5g} ({100 * r['err_max']:6.2f}%)  lmin {vmin:10.4g} "
                  f"({100 * (r['err_min'] or 0):7.2f}% of |lmin|)  cover {r['cover_max']}/{r['cover_min']}  "
                  f"{epochs:7.2f} epochs  {seconds:6.1f} s")

        if not args.skip_baselines:
            for name, fn in (("(a) pyhessian power", pyhessian), ("(c) growing-batch power", growing_power)):
                c = Counter()
                t = time.perf_counter()
                vmax, vmin = fn(model, X, Y, c)
                row(name, vmax, vmin, epochs_of(c.samples), time.perf_counter() - t)
        ratio = h_flops / g_flops  # epochs per full-data HVP
        runs = [("(b) full Lanczos", dict(sampling="exact"), None),
                ("(d) curvlab cold", dict(sampling="multilevel"), None),
                ("(d) curvlab warm", dict(sampling="multilevel"), "warm"),
                ("(e) curvlab lmax only, cold", dict(sampling="multilevel", which="LA"), None),
                ("(e) curvlab lmax only, warm", dict(sampling="multilevel", which="LA"), "warm"),
                ("(f) curvlab budget 3 epochs, cold", dict(sampling="multilevel", max_hvps=3 / ratio), None),
                ("(f) curvlab budget 1 epoch, warm", dict(sampling="multilevel", max_hvps=1 / ratio), "warm")]
        for name, kw, warm in runs:
            if warm and prev is None:
                continue
            if warm:
                kw = dict(kw, init=prev)
            t = time.perf_counter()
            r = curvlab.extremes(model, F.cross_entropy, (X, Y), batch_size=1000, **kw)
            sec = time.perf_counter() - t
            vmin = r.lambda_min if kw.get("which") != "LA" else float("nan")
            row(name, r.lambda_max, vmin, epochs_of(r.cost.samples), sec,
                r.interval_max, None if kw.get("which") == "LA" else r.interval_min)
            rows[-1].update(converged_max=r.converged_max, converged_min=r.converged_min,
                            bounded_max=all(map(math.isfinite, r.interval_max)),
                            bounded_min=all(map(math.isfinite, r.interval_min)),
                            halfwidth_max=(r.interval_max[1] - r.interval_max[0]) / 2 / abs(lmax),
                            halfwidth_min=(r.interval_min[1] - r.interval_min[0]) / 2 / abs(lmin),
                            sample_size=r.sample_size)
            if name.startswith("(d)") or name.startswith("(f)"):
                print("      levels:", [(lv["sample_size"], {e: (d["holdout"], d["accepted"]) for e, d in lv["ends"].items()})
                                        for lv in r.levels], "final sample", r.sample_size,
                      "converged", r.converged_max, r.converged_min,
                      "interval max", tuple(round(x, 4) for x in r.interval_max),
                      "min", tuple(round(x, 4) for x in r.interval_min))
        # floor: the cost of certifying the *true* eigenvector's Rayleigh quotient to the
        # tolerance (z = 1.96) by sampling, given its per-sample variance: no search at all
        H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=5000)
        for end, vec, lam, tol in (("max", ref.vector_max, lmax, 1e-2), ("min", ref.vector_min, lmin, 5e-2)):
            sd = float(H.per_sample_curvature(vec.float()).double().std())
            n_star = 1 / ((tol * abs(lam) / (1.959964 * sd)) ** 2 + 1 / N)
            floors.append(dict(epoch=ep, end=end, cv=sd / abs(lam), samples=n_star,
                               epochs=n_star * ratio / N))
            print(f"  floor {end}: per-sample CV {sd / abs(lam):.2f}; certifying u^T H u to {tol:.0%} "
                  f"needs {n_star:.0f} samples = {n_star * ratio / N:.2f} epochs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, floors=floors, N=N, n=n, flops=dict(grad=g_flops, hvp=h_flops, curv=q_flops),
                           grad_epoch_seconds=grad_s, torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d")), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
