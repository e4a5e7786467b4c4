"""Sampling floors by estimator (issue 13): how much each estimator lowers the variance of a
Rayleigh quotient ``v^T H v`` estimated from sampled per-sample curvatures.

For a checkpoint and its data ``(X, Y)`` (``N`` images), the script finds the extreme
eigenvectors of the full-data Hessian (float64 Lanczos, cached) and, along each, the
per-sample curvatures ``c_d = v^T H_d v`` of all ``N`` samples.  Their population
variance ``sigma^2`` is the uniform-sampling floor: a holdout of ``t`` samples estimates
``v^T H v`` with variance ``sigma^2 / t`` (finite-population factor aside).  Every other
estimator is scored by its **variance factor**: ``sigma^2`` divided by its own variance per
sample at the same ``t``, i.e. how many times fewer samples it needs for the same standard
error (values above 1 pay, before the cost of what the estimator needs).

Estimators (all from quantities a forward pass gives per sample, or a cheap control variate):

* ``is:<proxy>``: importance sampling (with replacement) with the defensive mixture
  ``q_d = (1 - a) s_d / sum s + a / N`` (``a = 0.1``), ``s`` a proxy; the estimator
  ``(1/t) sum c_d / (N q_d)`` has variance ``sum c_d^2 / (N^2 q_d) - mu^2`` per draw;
* ``strata:<proxy>``: 10 strata of equal size by the proxy's quantiles, proportional
  (``prop``) or Neyman allocation (``neyman``, with the strata spreads known: the warm-start
  case, where the previous call's spreads are used); variances ``sum W_h S_h^2`` and
  ``(sum W_h S_h)^2``;
* ``cv:ggn``: the control variate ``g_d = (J_d v)^T H_out,d (J_d v)``, the Gauss-Newton part of
  ``c_d`` (one forward-mode pass per sample; its population mean needs that pass over all
  ``N``): variance ``sigma^2 (1 - rho^2)``;
* ``cv:last``: the control variate of the last layer's block alone (a forward pass to the
  features: the cheapest exact part);
* ``strata+cv``: Neyman strata by the best proxy with the GGN control variate inside each;
* ``oracle |c|``: importance sampling with ``q ∝ |c_d|``, the limit of importance sampling
  by any proxy (not of strata or control variates, which can beat it on signed ``c``).

All factors are per draw at small sampling fractions (no finite-population correction; a
holdout of ``t`` of ``N`` samples drawn without replacement gains ``1 - t/N`` more under
uniform, stratified and control-variate sampling, not under importance sampling), and the
Neyman and control-variate ones are limits: the strata spreads and the slope are the
population's own (a previous call's, or a pilot's, do worse), and ``curvlab.estimators``'
allocation adds a floor of 2 per stratum.

Proxies: ``1-p_y``, ``||p - onehot(y)||``, the loss, and ``1 - margin`` with
``margin = p_y - max_{j != y} p_j``.  Also per vector: the coefficient of variation
``sigma / |mu|`` and the share of ``sum |c_d|`` carried by the top 5 % of samples; per
checkpoint: train accuracy (eval mode, unaugmented); and per-sample FLOPs (``torch.utils.
flop_counter`` over one batch) of a forward pass, a gradient, an HVP, ``c_d`` by
forward-over-forward and ``g_d``.

Cases: ``small`` (ResNet-8 width 8, 16x16 images, 10 epochs on the first 2,048 training
images, weakly fit) and ``small-fit`` (40 epochs on the same images, well fit), both from
``experiments.bench_correctness``; Hessian over those 2,048 images.

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_floors --json runs/floors.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.utils.flop_counter import FlopCounterMode

from curvlab.functional import FunctionalModel
from curvlab.hvp import HessianOperator
from curvlab.lanczos import lanczos
from experiments.bench_correctness import POOL, SMALL_TRAIN, small_checkpoint
from experiments.bench_curvature import make_data
from experiments.cifar import find_cifar10

CASES = {"small": 10, "small-fit": 40}   # checkpoint name -> epochs on the 2,048 images
ALPHA = 0.1                              # defensive mixture weight of uniform sampling
STRATA = 10
TOP_SHARE = 0.05


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------- per-sample quantities

def eigenvectors(cache: Path, name: str, model, X, Y) -> dict:
    """Bottom and top eigenpairs of the float64 Hessian over ``(X, Y)`` (cached)."""
    path = cache / f"floors_eig_{name}.pt"
    if path.exists():
        return torch.load(path)
    H = HessianOperator(model, F.cross_entropy, (X, Y), dtype=torch.float64, batch_size=512)
    t = time.perf_counter()
    r = lanczos(H.matvec, H.n, which="both", k=2, tol=(1e-2, 1e-4), dtype=torch.float64, seed=0,
                max_matvecs=200, max_basis=80)
    out = dict(values=r.values.tolist(), residuals=r.residual_norms.tolist(),
               converged=r.converged.tolist(), min=r.vectors[0], max=r.vectors[-1],
               matvecs=r.matvecs, seconds=time.perf_counter() - t)
    log(f"  {name}: eigenvalues {out['values']}, residuals {[f'{x:.1e}' for x in out['residuals']]}, "
        f"{r.matvecs} products, {out['seconds']:.0f} s")
    torch.save(out, path)
    return out


def proxies(model, X, Y) -> dict:
    with torch.no_grad():
        logits = torch.cat([model(X[i:i + 512]) for i in range(0, len(X), 512)]).double()
    p = logits.softmax(-1)
    py = p.gather(1, Y[:, None])[:, 0]
    onehot = F.one_hot(Y, p.shape[1]).double()
    others = p.masked_fill(onehot.bool(), -1).amax(1)
    return {"1-p_y": 1 - py, "|p-onehot|": (p - onehot).norm(dim=1),
            "loss": F.cross_entropy(logits, Y, reduction="none"), "1-margin": (1 - (py - others)) / 2,
            "_acc": float((logits.argmax(1) == Y).double().mean())}


def ggn_parts(model, X, Y, v: torch.Tensor, last: str) -> tuple:
    """Per sample: ``(J_d v)^T H_out (J_d v)`` for ``v`` and for ``v`` restricted to the parameters
    whose names start with ``last`` (the last layer)."""
    fm = FunctionalModel(model, dtype=torch.float64)
    vd = fm.spec.unflatten(v.double())
    vl = {k: (t if k == last or k.startswith(last + ".") else torch.zeros_like(t)) for k, t in vd.items()}
    out_all, out_last = [], []
    for i in range(0, len(X), 256):
        x = X[i:i + 256].double()
        for tangent, acc in ((vd, out_all), (vl, out_last)):
            out, jv = jvp(lambda p: fm(p, x), (fm.params,), (tangent,))
            p = out.softmax(-1)
            acc.append((jv * jv * p).sum(1) - (jv * p).sum(1) ** 2)
    return torch.cat(out_all).detach(), torch.cat(out_last).detach()


def flops_per_sample(model, X, Y, v) -> dict:
    """FLOPs per sample (one batch of 64, float32) of the passes an estimator may use."""
    x, y = X[:64], Y[:64]
    fm = FunctionalModel(model)
    H = HessianOperator(model, F.cross_entropy, (x, y), batch_size=64)
    vd = fm.spec.unflatten(v.float())

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / len(x)

    def grad():
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, [p for p in model.parameters()])

    def ggn():
        jvp(lambda p: fm(p, x), (fm.params,), (vd,))

    with torch.no_grad():
        fwd = count(lambda: model(x))
    return {"forward": fwd, "gradient": count(grad), "hvp": count(lambda: H.matvec(v.float()[None])),
            "c_d (fwd-over-fwd)": count(lambda: H.per_sample_curvature(v.float())),
            "g_d (GGN, jvp)": count(ggn)}


# ---------------------------------------------------------------- estimator variances

def is_factor(c: torch.Tensor, s: torch.Tensor, alpha: float = ALPHA) -> float:
    N = len(c)
    q = (1 - alpha) * s / s.sum() + alpha / N
    mu = c.mean()
    v = (c * c / (N * N * q)).sum() - mu * mu
    return float(c.var(unbiased=False) / v)


def strata_of(s: torch.Tensor, K: int = STRATA) -> list:
    order = torch.sort(s, stable=True).indices
    return [idx for idx in torch.tensor_split(order, K)]


def strata_spreads(c: torch.Tensor, groups: list, z: torch.Tensor | None = None) -> tuple:
    """``(W, S)``: the strata's weights and population spreads of ``c`` (with ``z``: of
    ``c - beta z``, one pooled within-strata regression coefficient ``beta``)."""
    N = len(c)
    if z is not None:
        # pooled within-strata regression coefficient
        zc = torch.cat([z[g] - z[g].mean() for g in groups])
        cc = torch.cat([c[g] - c[g].mean() for g in groups])
        beta = (zc * cc).sum() / (zc * zc).sum()
        c = c - beta * z
    W = torch.tensor([len(g) / N for g in groups], dtype=c.dtype)
    S = torch.stack([c[g].std(unbiased=False) for g in groups])
    return W, S


def floors(c: torch.Tensor, px: dict, g: torch.Tensor, gl: torch.Tensor) -> dict:
    c = c.double()
    sigma2 = float(c.var(unbiased=False))
    mu = float(c.mean())
    absc = c.abs()
    k = max(1, int(TOP_SHARE * len(c)))
    out = {"mean": mu, "std": math.sqrt(sigma2), "cv": math.sqrt(sigma2) / abs(mu),
           "top5_share": float(absc.topk(k).values.sum() / absc.sum())}
    fac = {}
    names = [n for n in px if not n.startswith("_")]
    for n in names:
        fac[f"is:{n}"] = is_factor(c, px[n].double())
        groups = strata_of(px[n])
        W, S = strata_spreads(c, groups)
        fac[f"strata-prop:{n}"] = sigma2 / float((W * S * S).sum())
        fac[f"strata-neyman:{n}"] = sigma2 / float((W * S).sum() ** 2)
    for label, z in (("cv:ggn", g), ("cv:last", gl)):
        rho = float(torch.corrcoef(torch.stack([c, z.double()]))[0, 1]) if z.std() > 0 else 0.0
        fac[label] = 1 / max(1e-12, 1 - rho * rho)
        out[f"rho_{label}"] = rho
    best = max(names, key=lambda n: fac[f"strata-neyman:{n}"])
    W, S = strata_spreads(c, strata_of(px[best]), g.double())
    fac[f"strata-neyman+cv:ggn ({best})"] = sigma2 / float((W * S).sum() ** 2)
    v_oracle = float(absc.mean() ** 2) - mu * mu
    fac["oracle |c|"] = sigma2 / v_oracle if v_oracle > 0 else float("inf")
    out["factors"] = fac
    return out


def small_case_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark on the 2,048-image case takes: ``--data``, ``--cache``, ``--json``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--json", default=None)
    return p


def load_small_case(args) -> tuple:
    """``(cache, data, X, Y)``: the cache folder (made if missing), the CIFAR-10 folder and the
    first 2,048 training images at 16x16 with their labels."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = find_cifar10(args.data)
    X, Y = make_data(data, SMALL_TRAIN, POOL)
    return cache, data, X, Y


def main(argv=None):
    p = small_case_parser(__doc__)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cache, data, X, Y = load_small_case(args)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                  alpha=ALPHA, strata=STRATA, cases={})
    for name in args.cases.split(","):
        model, meta = small_checkpoint(cache, data, name, CASES[name])
        model = model.eval()
        eig = eigenvectors(cache, name, model, X, Y)
        px = proxies(model, X, Y)
        last = [k for k, _ in model.named_parameters()][-1].rsplit(".", 1)[0]
        H = HessianOperator(model, F.cross_entropy, (X, Y), dtype=torch.float64, batch_size=256)
        case = dict(N=len(X), n=H.n, train_acc=px["_acc"], eigenvalues=eig["values"],
                    residuals=eig["residuals"], ends={})
        for end in ("max", "min"):
            v = eig[end].double()
            v = v / v.norm()
            c = H.per_sample_curvature(v)
            g, gl = ggn_parts(model, X, Y, v, last)
            case["ends"][end] = floors(c, px, g, gl)
            case["ends"][end]["check_mean_vs_eigenvalue"] = [float(c.mean()),
                                                              eig["values"][-1 if end == "max" else 0]]
        case["flops_per_sample"] = flops_per_sample(model, X, Y, eig["max"])
        report["cases"][name] = case
        log(f"{name}: train acc {case['train_acc']:.3f}")
        for end, e in case["ends"].items():
            log(f"  {end}: mean {e['mean']:.4g} cv {e['cv']:.2f} top5 {e['top5_share']:.2f} "
                f"rho ggn {e['rho_cv:ggn']:.3f} last {e['rho_cv:last']:.3f}")
            for k, f in sorted(e["factors"].items(), key=lambda kv: -kv[1]):
                log(f"      {k:40s} {f:7.2f}")
        log("  flops/sample", {k: f"{v:.3g}" for k, v in case["flops_per_sample"].items()})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
