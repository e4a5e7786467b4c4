"""Curvature approximations as helpers of the exact solver (issue 3): HVPs and time to target.

Setting: real CIFAR-10 (``--samples`` training images, optionally average-pooled
by ``--pool`` to cut the cost of a product on a loaded CPU), a narrow CIFAR
ResNet (``--depth`` 6k+2, channels ``16, 32, 64`` times ``--width``), trained
``--epochs`` epochs with SGD (momentum 0.9, no augmentation) to get off the
initialisation; the Hessian is the full-subset mean cross-entropy's, in eval
mode (BatchNorm running statistics), as in :func:`curvlab.extremes`.

1. Reference: ``curvlab.extremes(sampling="exact", dtype=float64, tol=tol_min=--ref-tol,
   floor=0)``: plain Lanczos, long and tight.
2. For each ``curvature`` in ``none, diag, ggn, kfac``: one ``extremes`` call in
   float32 with a tight tolerance (``--tol``, ``--tol-min``) and a callback
   recording, per solver step, the running estimate, the cumulative exact-Hessian
   products (``hvps``, full-data equivalents) and the time.  The cost to target is
   read at the first step whose estimate is within 1 % of the reference
   ``lambda_max`` (resp. within 5 % of ``|lambda_min|``).

   * ``none``: one Lanczos run serves both ends, so both counts come from the same
     run (the ``both`` column is the larger of the two).
   * ``diag``/``ggn``/``kfac``: the same shared run, started from the
     approximation's top ``--rank`` eigenvectors (curvlab's default since issue 14);
     only with ``curvlab.solve.APPROX_POLICY.precondition_min`` set, ``lambda_max``
     by its own Lanczos run and then ``lambda_min`` by LOBPCG preconditioned with
     ``(C + delta I)^{-1}``: the ``lambda_min`` count is then the LOBPCG phase's own
     (products since the ``lambda_max`` phase ended) and the ``both`` column the sum.
3. Building the approximation is timed separately (``build_curvature`` +
   ``top_eigenpairs(rank)`` on the same data, with the Fisher ``extremes`` uses).
   Its data work is also in ``cost.hvps`` (since issue 14, gradient work at half an
   HVP); for ``ggn`` the top eigenpairs take a Lanczos run on GGN products, each
   about as costly as an HVP, reported as "GGN products".

Run: ``python -m experiments.bench_curvature [--data PATH] [--samples 2000] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import curvlab
from curvlab.curvature import build_curvature
from curvlab.functional import FunctionalModel, evaluation_mode
from curvlab.hvp import Cost, HessianOperator
from experiments.cifar import load_cifar10, normalize
from experiments.models import CifarResNet

CURVATURES = ("none", "diag", "ggn", "kfac")
TARGET_MAX = 0.01   # relative to |lambda_max|
TARGET_MIN = 0.05   # relative to |lambda_min|


def make_data(path, n: int, pool: int):
    """``(X, Y)``: the first ``n`` CIFAR-10 training images, standardised, pooled ``pool x pool``."""
    X, Y = load_cifar10(path, train=True, limit=n)
    X = normalize(X)
    if pool > 1:
        X = F.avg_pool2d(X, pool)
    return X, Y


def make_model(depth: int, width: float, seed: int = 0) -> CifarResNet:
    """CIFAR ResNet-``depth`` (``(depth-2)/6`` blocks per stage) at ``width``."""
    if (depth - 2) % 6:
        raise ValueError(f"--depth must be 6k+2 (8, 14, 20, ...), got {depth}")
    torch.manual_seed(seed)
    k = (depth - 2) // 6
    return CifarResNet([k, k, k], [max(1, round(c * width)) for c in (16, 32, 64)])


def train(model, X, Y, epochs: int, lr: float, seed: int = 1) -> float:
    """SGD with momentum 0.9, batch 64; returns the last epoch's mean training loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        total = 0.0
        for i in range(0, len(X), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        last = total / len(X)
    model.eval()
    return last


def first_within(trace, key: str, ref: float, target: float, since: float = 0.0):
    """First trace entry whose ``key`` is within ``target * |ref|`` of ``ref``: ``(hvps - since, t)``."""
    for e in trace:
        if key in e and abs(e[key] - ref) <= target * abs(ref):
            return e["hvps"] - since, e["t"]
    return None


def run_curvature(model, X, Y, name: str, ref_max: float, ref_min: float, args) -> dict:
    trace = []
    t0 = time.perf_counter()

    def callback(entry):
        trace.append(dict(entry, t=time.perf_counter() - t0))

    r = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="exact", curvature=name,
                         tol=args.tol, tol_min=args.tol_min, floor=0.0, max_hvps=args.max_hvps,
                         approx_samples=len(X), approx_rank=args.rank, batch_size=args.batch_size,
                         callback=callback)
    if name == "none" or not curvlab.solve.APPROX_POLICY.precondition_min:  # one shared run
        hit_max = first_within(trace, "lambda_max", ref_max, TARGET_MAX)
        hit_min = first_within(trace, "lambda_min", ref_min, TARGET_MIN)
        both = None if hit_max is None or hit_min is None else max(hit_max[0], hit_min[0])
        max_phase_end = None
    else:
        # the lambda_max (Lanczos) phase's entries carry lambda_max; the LOBPCG phase's lambda_min
        max_trace = [e for e in trace if "lambda_max" in e]
        min_trace = [e for e in trace if "lambda_min" in e and "lambda_max" not in e]
        max_phase_end = max_trace[-1]["hvps"] if max_trace else 0.0
        hit_max = first_within(max_trace, "lambda_max", ref_max, TARGET_MAX)
        hit_min = first_within(min_trace, "lambda_min", ref_min, TARGET_MIN, since=max_phase_end)
        both = None if hit_max is None or hit_min is None else hit_max[0] + hit_min[0]
    first_t = trace[0]["t"] if trace else float("nan")
    return dict(curvature=name, lambda_max=r.lambda_max, lambda_min=r.lambda_min,
                converged_max=r.converged_max, converged_min=r.converged_min,
                hvps_max=None if hit_max is None else hit_max[0],
                sec_max=None if hit_max is None else hit_max[1],
                hvps_min=None if hit_min is None else hit_min[0],
                sec_min=None if hit_min is None else hit_min[1],
                hvps_both=both, total_hvps=r.cost.hvps, products=r.cost.products,
                seconds=r.cost.seconds, first_step_seconds=first_t, max_phase_hvps=max_phase_end,
                trace=trace)


def time_build(model, X, Y, name: str, rank: int, batch_size: int) -> dict:
    """Wall time and data work of ``build_curvature(name)`` + ``top_eigenpairs(rank)``."""
    with evaluation_mode(model):
        fmodel = FunctionalModel(model)
        H = HessianOperator(None, F.cross_entropy, (X, Y), batch_size=batch_size, fmodel=fmodel)
        cost = Cost()
        t = time.perf_counter()
        fisher = {"fisher": curvlab.solve.APPROX_POLICY.fisher} if name in ("kfac", "diag") else {}
        C = build_curvature(name, fmodel, F.cross_entropy, H.batches, max_samples=len(X), cost=cost,
                            **fisher)
        t_build = time.perf_counter() - t
        values, _ = C.top_eigenpairs(rank)
        seconds = time.perf_counter() - t
    return dict(seconds=seconds, build_seconds=t_build, eig_seconds=seconds - t_build,
                grad_samples=cost.grad_samples,
                # GGN products: 2 per-sample gradient evaluations per vector and sample
                ggn_products=cost.grad_samples / (2 * len(X)) if name == "ggn" else None,
                top_values=[float(v) for v in values])


def fmt(x, digits=1):
    return "not reached" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CURVLAB_DATA or ../shared/data)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--pool", type=int, default=1, help="average-pool the 32x32 images by this factor")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--curvatures", default=",".join(CURVATURES))
    p.add_argument("--rank", type=int, default=1, help="approx_rank")
    p.add_argument("--tol", type=float, default=1e-4, help="residual tolerance of the timed runs, lambda_max")
    p.add_argument("--tol-min", type=float, default=1e-2, help="the same for lambda_min (relative to |lambda_min|)")
    p.add_argument("--max-hvps", type=float, default=200)
    p.add_argument("--ref-tol", type=float, default=1e-6)
    p.add_argument("--ref-max-hvps", type=float, default=600)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.curvatures.split(",")
    for c in names:
        if c not in CURVATURES:
            raise ValueError(f"unknown curvature {c!r}: choose from {CURVATURES}")

    X, Y = make_data(args.data, args.samples, args.pool)
    model = make_model(args.depth, args.width)
    n = sum(q.numel() for q in model.parameters())
    t = time.perf_counter()
    loss = train(model, X, Y, args.epochs, args.lr)
    print(f"N={len(X)} images {tuple(X.shape[1:])}, ResNet-{args.depth} width {args.width}: n={n}; "
          f"trained {args.epochs} epochs in {time.perf_counter() - t:.0f} s, last train loss {loss:.3f}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}", flush=True)

    t = time.perf_counter()
    ref = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="exact", dtype=torch.float64,
                           tol=args.ref_tol, tol_min=args.ref_tol, floor=0.0,
                           max_hvps=args.ref_max_hvps, batch_size=args.batch_size)
    ref_s = time.perf_counter() - t
    lmax, lmin = ref.lambda_max, ref.lambda_min
    print(f"reference (float64 Lanczos, tol {args.ref_tol:g}): lambda_max={lmax:.8g} "
          f"(res {ref.error_parts['max']['solver']:.1e}, converged {ref.converged_max}), "
          f"lambda_min={lmin:.8g} (res {ref.error_parts['min']['solver']:.1e}, converged {ref.converged_min}); "
          f"{ref.cost.hvps:.0f} HVPs, {ref_s:.0f} s", flush=True)

    rows = []
    for name in names:
        build = time_build(model, X, Y, name, args.rank, args.batch_size) if name != "none" else None
        row = run_curvature(model, X, Y, name, lmax, lmin, args)
        row["build"] = build
        rows.append(row)
        extra = "" if build is None else (
            f"; build {build['seconds']:.1f} s (factors {build['build_seconds']:.1f} s, eigenpairs "
            f"{build['eig_seconds']:.1f} s" + (f", {build['ggn_products']:.0f} GGN products" if
                                              build["ggn_products"] is not None else "") +
            f"), top values {', '.join(f'{v:.3g}' for v in build['top_values'][:3])}")
        print(f"{name:5s}: lambda_max {row['lambda_max']:.6g} -> 1 % at {fmt(row['hvps_max'])} HVPs; "
              f"lambda_min {row['lambda_min']:.4g} -> 5 % at {fmt(row['hvps_min'])} HVPs; "
              f"call {row['total_hvps']:.0f} HVPs, {row['seconds']:.1f} s "
              f"(first step at {row['first_step_seconds']:.1f} s){extra}", flush=True)

    print(f"\nReference: lambda_max = {lmax:.6g}, lambda_min = {lmin:.4g} "
          f"(N={len(X)}, n={n}, {ref.cost.hvps:.0f} HVPs, {ref_s:.0f} s)\n")
    print("| curvature | HVPs to lambda_max 1 % | HVPs to lambda_min 5 % | HVPs to both | "
          "seconds (whole call) | approximation build seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = r["build"]
        bs = "-" if b is None else f"{b['seconds']:.1f}" + (
            f" ({b['ggn_products']:.0f} GGN products)" if b["ggn_products"] is not None else "")
        print(f"| {r['curvature']} | {fmt(r['hvps_max'])} | {fmt(r['hvps_min'])} | {fmt(r['hvps_both'])} | "
              f"{r['seconds']:.1f} | {bs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), N=len(X), n=n, ref=dict(
                lambda_max=lmax, lambda_min=lmin, hvps=ref.cost.hvps, seconds=ref_s,
                res_max=ref.error_parts["max"]["solver"], res_min=ref.error_parts["min"]["solver"]),
                rows=rows, torch=torch.__version__, date=time.strftime("%Y-%m-%d")), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
