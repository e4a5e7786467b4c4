"""Both extremes on a CNN trained on all 50,000 CIFAR-10 images (issue 13): where the cost goes.

Model and checkpoints as in ``experiments/bench_correctness.py``: ResNet-8 (channels 8, 16, 32,
BatchNorm) on 16x16 images, trained on all 50,000 training images with crops and flips,
``c50k-e{E}`` after ``E`` epochs (cached; trained once).  Training is repeatable on one machine
at one thread count, not across them: the checkpoint records its thread count (``threads``),
and a fresh cache is a new checkpoint whose references must be computed again
(``--reference``; BENCHMARKS.md lists which checkpoint each figure is from).  The Hessian is
over the 50,000 unaugmented images in eval mode.

Per checkpoint ``E`` in ``--epochs``:

* **cold**: ``curvlab.extremes(model, F.cross_entropy, (X, Y), seed=s)`` for each seed, default
  tolerances (1 % / 5 %); with ``--curvature none,kfac,...`` once per flag (issue 14), and with
  ``--cold-la`` also ``lambda_max`` alone, and with ``--strata-cut equal,optimal`` once per way
  of cutting ``lambda_min``'s strata (``POLICY.strata_cut``; issue 13), and with
  ``--span-spread 1,0`` with and without the subsample bound's span spread
  (``POLICY.span_spread``); ``--half-level 0`` (or ``1``) sets ``POLICY.half_level`` for the cold calls;
  ``--gap-decay 0.5,1`` runs the cold calls under each ``POLICY.gap_decay`` (how the next level's
  size is predicted), side by side (the warm calls take the first value); ``--max-basis B``
  passes ``max_basis=B`` to the cold calls;
* **warm**: the same call with ``init=`` the cold seed-0 call on ``c50k-e{E-1}`` (per-epoch use),
  both ends (seeds ``0 .. --warm-seeds - 1``; with ``--warm-shrink 1,2``, each under both values
  of ``POLICY.warm_min_shrink``, with ``--warm-split 4,2`` under both of ``POLICY.warm_split``,
  and with ``--strata-cut``, under each cut, side by side; with ``--warm-exact 0,1`` under both
  ``POLICY.warm_exact`` values, ``2``: with ``warm_guard`` too; with ``--warm-min-cap none,0.4``
  under each ``POLICY.warm_min_cap``, with ``--half-margin 1.25,2`` under each
  ``POLICY.half_margin``; ``--reuse-warm`` keeps that seed-0 call in ``--cache`` and
  reads it from there on the next run; ``--warm-all-data``: also ``sampling="exact"`` from the
  previous vectors) and
  ``lambda_max`` alone (``which="LA"``);
* per call: values, intervals, converged flags, cost in full-data HVPs and in epochs, and
  ``cost.phases`` (search, certify, exact, approximation, rounding), and seconds;
* **floors** along the first cold call's vectors (the returned approximate eigenvectors: the
  variance of ``v^T H_d v`` is a property of the direction, and these are within the
  tolerance of the extreme ones): per-sample curvatures over all 50,000 images, the forward
  proxies and the Gauss-Newton control variate, scored as in ``experiments/bench_floors.py``;
* ``--baseline``: the user's growing-batch power method (64 -> 1,000 -> all images, then the
  shifted operator for ``lambda_min``), from ``experiments/bench_budget.py``, in the same run.

References (optional, ``--refs E:lambda_min:lambda_max,...``): values from an exact full-data
Lanczos run (``experiments/bench_correctness.py``'s :func:`reference` caches them as
``ref_c50k-e{E}.json`` in ``--cache``; those are read automatically).  ``--reference`` computes
the missing ones first (float32 products over all 50,000 images, bottom three and top two
eigenvalues, a second seed confirming; ``--ref-tol``, ``--ref-confirm-tol``), and ``--score
RUN.json ...`` only scores the intervals of earlier runs against the cached references (how
many cover them, per checkpoint and end), without calling curvlab.

Epochs: full-data HVPs times the FLOPs of an HVP over those of a gradient, per sample
(``torch.utils.flop_counter``, batch of 128), plus the gradient-equivalent work (the
Gauss-Newton forms of the holdout's control variate: one forward-mode pass each, counted as
one gradient; ``CostRecord.gradients``).  ``phases`` are full-data HVPs times that ratio, so
they count a form at 1.5 gradients (their sum can exceed ``epochs`` by that much).

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_cnn50k --epochs 5,15 --json runs/cnn50k.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
from curvlab import multilevel
from curvlab.hvp import HessianOperator
from experiments.bench_budget import Counter, growing_power
from experiments.bench_correctness import BIG, POOL, big_checkpoints, load_checkpoint, reference
from experiments.bench_curvature import make_data
from experiments.bench_floors import floors, ggn_parts, log, proxies
from experiments.cifar import find_cifar10


@contextlib.contextmanager
def policy(**changes):
    """``multilevel.POLICY`` with ``changes`` for the calls inside, restored after."""
    default = multilevel.POLICY
    multilevel.POLICY = dataclasses.replace(default, **changes)
    try:
        yield
    finally:
        multilevel.POLICY = default


def hvp_over_gradient(model, X, Y) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x, y = X[:128], Y[:128]
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    g = fc.get_total_flops()
    model.zero_grad(set_to_none=True)
    H = HessianOperator(model, F.cross_entropy, (x, y), batch_size=128)
    with FlopCounterMode(display=False) as fc:
        H.matvec(torch.randn(1, H.n))
    return fc.get_total_flops() / g


def row(label, r, ratio, ref) -> dict:
    grads = getattr(r.cost, "gradients", 0.0)  # forward-mode forms etc., inside hvps at half weight
    out = dict(call=label, hvps=r.cost.hvps, gradients=grads,
               epochs=(r.cost.hvps - grads / 2) * ratio + grads, seconds=r.cost.seconds,
               phases={k: v * ratio for k, v in r.cost.phases.items()},
               sample_size=getattr(r, "sample_size", None),
               levels=[dict(sample_size=lv["sample_size"], allocation=lv.get("allocation"),
                            ends={e: {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
                                  for e, d in lv["ends"].items()}) for lv in r.levels])
    for end in ("max", "min"):
        value = getattr(r, f"lambda_{end}")
        if value is None or value != value:
            continue
        lo, hi = getattr(r, f"interval_{end}")
        d = dict(value=value, lo=lo, hi=hi, converged=bool(getattr(r, f"converged_{end}")))
        if ref is not None:
            lam = ref[end]
            d.update(ref=lam, rel_err=abs(value - lam) / abs(lam), contains=bool(lo <= lam <= hi))
        out[end] = d
    return out


def show_levels(d):
    for lv in d["levels"]:
        ends = "; ".join(f"{e}: theta_S {x.get('theta_subsample', float('nan')):.4g} res {x.get('residual', float('nan')):.2g} "
                         f"holdout {x.get('holdout')} accepted {x.get('accepted')}" for e, x in lv["ends"].items())
        log(f"      level m={lv['sample_size']}: {ends}")


def show(d):
    parts = [f"{d['call']:>10}: {d['epochs']:.1f} epochs ({d['hvps']:.2f} HVPs, {d['seconds']:.0f} s)",
             "phases " + ", ".join(f"{k} {v:.1f}" for k, v in d["phases"].items())]
    for end in ("max", "min"):
        if end in d:
            e = d[end]
            s = f"{end} {e['value']:.5g} ({e['lo']:.5g}, {e['hi']:.5g}) conv={e['converged']}"
            if "ref" in e:
                s += f" err {100 * e['rel_err']:.2f} % covers={e['contains']}"
            parts.append(s)
    log(" | ".join(parts))


def save(args, report, E, out):
    """Write the report so far (after every call: nothing is lost on interruption)."""
    report["checkpoints"][f"c50k-e{E}"] = out
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


def load_refs(cache: Path, epochs) -> dict:
    """``{E: {"min": value, "max": value, "err": {...}}}`` for the cached references of ``c50k-e{E}``."""
    refs = {}
    for E in epochs:
        f = cache / f"ref_c50k-e{E}.json"
        if f.exists():
            j = json.loads(f.read_text())
            refs[E] = {"min": j["min"]["value"], "max": j["max"]["value"],
                       "err": {e: j[e]["err"] for e in ("min", "max")}, "confirmed": j.get("confirmed")}
    return refs


def score(paths, cache: Path) -> dict:
    """Coverage of the converged intervals in earlier runs' JSON reports against the cached
    references: per checkpoint and end, how many distinct converged intervals hold the
    reference (an interval met twice, e.g. the same call in two reports, counts once), the
    largest relative error of the estimates, and every call that misses."""
    table: dict = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for ck, out in report["checkpoints"].items():
            E = int(ck.rsplit("e", 1)[1])
            ref = load_refs(cache, [E]).get(E)
            if ref is None:
                log(f"{path}: {ck}: no cached reference (run with --reference)")
                continue
            for call in out["calls"]:  # (not the warm start: it is the checkpoint before)
                for end in ("max", "min"):
                    d = call.get(end)
                    if d is None or not d["converged"]:
                        continue
                    lam = ref[end]
                    t = table.setdefault((ck, end), dict(calls=0, covered=0, worst=0.0, misses=[], seen=set()))
                    key = (round(d["lo"], 9), round(d["hi"], 9))
                    if key in t["seen"]:
                        continue  # the same call in another report (e.g. one end done before the options differ)
                    t["seen"].add(key)
                    t["calls"] += 1
                    if d["lo"] <= lam <= d["hi"]:
                        t["covered"] += 1
                    else:
                        t["misses"].append(f"{Path(path).name}: {call['call']} ({d['lo']:.6g}, {d['hi']:.6g}), "
                                           f"reference {lam:.7g}")
                    t["worst"] = max(t["worst"], abs(d["value"] - lam) / abs(lam))
    log("| checkpoint | end | distinct converged intervals | holding the reference | largest error |\n"
        "|---|---|---:|---:|---:|")
    for (ck, end), t in sorted(table.items()):
        log(f"| {ck} | lambda_{end} | {t['calls']} | {t['covered']} | {100 * t['worst']:.2f} % |")
        for m in t["misses"]:
            log(f"    misses: {m}")
    return table


def warm_knobs(args, cuts: list) -> list:
    """The warm calls' policy knobs, side by side: per knob, its values as ``(policy changes,
    label suffix)`` (the suffix names the value in a call's label when the knob has several)."""
    P = multilevel.POLICY

    def values(option, parse, default):
        return [parse(x) for x in option.split(",")] if option else [default]
    # --warm-exact: 0, levels again; 1, POLICY.warm_exact; 2, warm_exact and warm_guard
    return [
        [(dict(warm_min_shrink=k), f" shrink {k}") for k in values(args.warm_shrink, int, P.warm_min_shrink)],
        [(dict(warm_split=sp), f" split {sp:g}") for sp in values(args.warm_split, float, P.warm_split)],
        [(dict(strata_cut=c), f" {c}") for c in cuts],
        [(dict(warm_exact=x >= 1, warm_guard=x >= 2), f" exact {x}")
         for x in values(args.warm_exact, int, int(P.warm_exact) * (1 + P.warm_guard))],
        [(dict(warm_min_cap=c), f" cap {c}")
         for c in values(args.warm_min_cap, lambda x: None if x == "none" else float(x), P.warm_min_cap)],
        [(dict(half_margin=h), f" margin {h:g}") for h in values(args.half_margin, float, P.half_margin)],
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--epochs", default="5,15", help="checkpoints (c50k-e{E}; E-1 is the warm start)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0,
                   help="cold (and warm) calls use seeds first-seed .. + seeds (warm-seeds) - 1")
    p.add_argument("--refs", default="", help="E:lambda_min:lambda_max,... (reference values)")
    p.add_argument("--reference", action="store_true",
                   help="compute the missing references first (cached as ref_c50k-e{E}.json in --cache)")
    p.add_argument("--ref-tol", type=float, nargs=2, default=(1e-3, 1e-4), metavar=("BOTTOM", "TOP"),
                   help="the reference run's residual tolerances, relative to each value")
    p.add_argument("--ref-confirm-tol", type=float, nargs=2, default=(3e-3, 1e-3), metavar=("BOTTOM", "TOP"),
                   help="the confirming run's (another seed)")
    p.add_argument("--score", nargs="+", default=None, metavar="RUN.json",
                   help="only score these earlier reports' intervals against the cached references")
    p.add_argument("--baseline", action="store_true", help="also the growing-batch power method")
    p.add_argument("--no-floors", action="store_true")
    p.add_argument("--cold-only", action="store_true", help="skip the warm calls")
    p.add_argument("--json", default=None)
    p.add_argument("--strata", type=int, default=None,
                   help="extremes(strata=...) for every call (default: curvlab's)")
    p.add_argument("--warm-seeds", type=int, default=1,
                   help="seeds of the warm calls (both ends; seed 0 also lambda_max alone)")
    p.add_argument("--warm-split", default=None,
                   help="comma-separated POLICY.warm_split values for the warm calls, side by side "
                        "(default: curvlab's)")
    p.add_argument("--warm-shrink", default=None,
                   help="comma-separated POLICY.warm_min_shrink values for the warm calls, side by "
                        "side (default: curvlab's)")
    p.add_argument("--warm-exact", default=None,
                   help="comma-separated warm-call rules, side by side: 0 (levels again), 1 "
                        "(POLICY.warm_exact), 2 (warm_exact and warm_guard)")
    p.add_argument("--warm-min-cap", default=None,
                   help="comma-separated POLICY.warm_min_cap values for the warm calls, side by side "
                        "('none' for off; e.g. none,0.4)")
    p.add_argument("--half-margin", default=None,
                   help="comma-separated POLICY.half_margin values for the warm calls, side by side")
    p.add_argument("--max-basis", type=int, default=None,
                   help="extremes(max_basis=...) for the cold calls (the thick-restart basis; default 120, 40 before 2026-12-07)")
    p.add_argument("--warm-all-data", action="store_true",
                   help="also the warm call with sampling='exact' (all data, from the previous vectors); "
                        "--warm-seeds 0 leaves it and lambda_max alone")
    p.add_argument("--reuse-warm", action="store_true",
                   help="keep the warm start (the cold seed-0 call on c50k-e{E-1}) in --cache as "
                        "warm_c50k-e{E-1}_s0.pt, and read it from there when present")
    p.add_argument("--curvature", default="none",
                   help="comma-separated extremes(curvature=...) values for the cold calls, side by side")
    p.add_argument("--cold-la", action="store_true", help="also lambda_max alone (which='LA') cold, per flag")
    p.add_argument("--strata-cut", default=None,
                   help="comma-separated POLICY.strata_cut values ('equal', 'optimal') for the cold "
                        "calls, side by side (default: curvlab's)")
    p.add_argument("--half-level", type=int, choices=(0, 1), default=None,
                   help="POLICY.half_level for the cold calls (one level on N/2 before the exact stage when "
                        "it is predicted to pass; default: curvlab's, on)")
    p.add_argument("--span-spread", default=None,
                   help="comma-separated POLICY.span_spread values (1, 0) for the cold calls, side "
                        "by side (default: curvlab's)")
    p.add_argument("--gap-decay", default=None,
                   help="comma-separated POLICY.gap_decay values (0.5, 1) for the cold calls, side by "
                        "side; the warm calls take the first (default: curvlab's)")
    args = p.parse_args(argv)
    if args.score:
        return score(args.score, Path(args.cache))
    flags = args.curvature.split(",")
    basis = {} if args.max_basis is None else {"max_basis": args.max_basis}  # (the cold calls)
    half = multilevel.POLICY.half_level if args.half_level is None else bool(args.half_level)
    cuts = args.strata_cut.split(",") if args.strata_cut else [multilevel.POLICY.strata_cut]
    spans = ([bool(int(x)) for x in args.span_spread.split(",")] if args.span_spread
             else [multilevel.POLICY.span_spread])
    decays = ([float(x) for x in args.gap_decay.split(",")] if args.gap_decay
              else [multilevel.POLICY.gap_decay])
    cache = Path(args.cache)
    data = find_cifar10(args.data)
    X, Y = make_data(data, BIG, POOL)
    epochs = [int(e) for e in args.epochs.split(",")]
    paths = big_checkpoints(cache, data, sorted({e for E in epochs for e in (E - 1, E) if e >= 1}), X, Y)
    refs = {}
    for item in filter(None, args.refs.split(",")):
        E, lo, hi = item.split(":")
        refs[int(E)] = {"min": float(lo), "max": float(hi)}
    if args.reference:
        for E in epochs:
            # float32 products (float64 over 50,000 images costs 4-6x more a product here); the
            # bottom's tolerance is relative to |lambda_min|, far tighter than the 5 % checked
            model, _ = load_checkpoint(paths[E])
            reference(cache, f"c50k-e{E}", model, X, Y, dtype=torch.float32, tol=tuple(args.ref_tol),
                      confirm_tol=tuple(args.ref_confirm_tol), seeds=[0, 1], max_matvecs=600)
    for E, r in load_refs(cache, epochs).items():
        refs.setdefault(E, r)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                  library=curvlab.__file__, checkpoints={})
    for E in epochs:
        model, meta = load_checkpoint(paths[E])
        ratio = hvp_over_gradient(model, X, Y)
        ref = refs.get(E)
        log(f"c50k-e{E}: train acc {meta['train_acc']:.4f}, HVP/gradient FLOPs {ratio:.2f}, ref {ref}")
        out = dict(train_acc=meta["train_acc"], hvp_over_gradient=ratio, ref=ref, calls=[])
        first, first_flag = None, None
        for s in range(args.first_seed, args.first_seed + args.seeds):
            for flag, cut, span, decay in [(f, c, sp, d) for f in flags for c in cuts for sp in spans
                                           for d in decays]:
                for which in ("both", "LA") if args.cold_la else ("both",):
                    with policy(strata_cut=cut, span_spread=span, half_level=half, gap_decay=decay):
                        r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=s, strata=args.strata,
                                             curvature=flag, which=which, **basis)
                    if which == "both" and (first is None or (flag == "none" and first_flag != "none")):
                        first, first_flag = r, flag  # the floors' vectors: the first seed's, "none" first
                    label = f"cold s{s}" + (f" {flag}" if len(flags) > 1 or flag != "none" else "") + (
                        f" {cut}" if len(cuts) > 1 else "") + (
                        f" span {int(span)}" if len(spans) > 1 else "") + (
                        f" gap {decay:g}" if len(decays) > 1 else "") + (" LA" if which == "LA" else "")
                    out["calls"].append(row(label, r, ratio, ref))
                    show(out["calls"][-1])
                    show_levels(out["calls"][-1])
                    save(args, report, E, out)
        if E - 1 >= 1 and not args.cold_only:
            # (the file names the call's settings where they differ from the defaults)
            tag = (f"_strata{args.strata}" if args.strata is not None else "") + (
                f"_gap{decays[0]:g}" if decays[0] != multilevel.POLICY.gap_decay else "")
            kept = cache / f"warm_c50k-e{E - 1}_s0{tag}.pt"
            if args.reuse_warm and kept.exists():
                prev = torch.load(kept, weights_only=False)
                out["warm_start_file"] = str(kept)
                log(f"  (warm start read from {kept}, made {prev.options.get('made', '?')})")
            else:
                prev_model, _ = load_checkpoint(paths[E - 1])
                with policy(gap_decay=decays[0]):
                    prev = curvlab.extremes(prev_model, F.cross_entropy, (X, Y), seed=0, strata=args.strata)
                if args.reuse_warm:
                    prev.options["made"] = time.strftime("%Y-%m-%d %H:%M")
                    torch.save(prev, kept)
            out["warm_start"] = row(f"cold e{E - 1}", prev, ratio, None)
            log(f"  (warm start: e{E - 1} call, {out['warm_start']['epochs']:.1f} epochs)")
            show_levels(out["warm_start"])
            calls = [(f"warm s{s}" if args.warm_seeds > 1 else "warm", s, {})
                     for s in range(args.first_seed, args.first_seed + args.warm_seeds)]
            calls.append(("warm LA", args.first_seed, {"which": "LA"}))
            knobs = warm_knobs(args, cuts)
            for label, seed, kw in calls:
                # (lambda_max alone: no split, no strata; each knob at its first value)
                for choice in itertools.product(*[values if not kw else values[:1] for values in knobs]):
                    changes = dict(gap_decay=decays[0])
                    name = label
                    for values, (change, suffix) in zip(knobs, choice):
                        changes.update(change)
                        if len(values) > 1 and not kw:
                            name += suffix
                    with policy(**changes):
                        r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=seed, init=prev,
                                             strata=args.strata, **kw)
                    out["calls"].append(row(name, r, ratio, ref))
                    show(out["calls"][-1])
                    show_levels(out["calls"][-1])
                    save(args, report, E, out)
            if args.warm_all_data:  # the exact regime on all data, from the previous vectors
                r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=args.first_seed, init=prev,
                                     sampling="exact")
                out["calls"].append(row("warm sampling=exact", r, ratio, ref))
                show(out["calls"][-1])
                save(args, report, E, out)
        if args.baseline:
            counter = Counter()
            t = time.perf_counter()
            lmax, lmin = growing_power(model, X, Y, counter)
            hv = counter.samples / len(X)
            out["growing_batch"] = dict(max=lmax, min=lmin, hvps=hv, epochs=hv * ratio,
                                        seconds=time.perf_counter() - t)
            log(f"  growing-batch power: max {lmax:.5g} min {lmin:.5g}, {hv * ratio:.1f} epochs")
        if not args.no_floors:
            px = proxies(model, X, Y)
            last = [k for k, _ in model.named_parameters()][-1].rsplit(".", 1)[0]
            H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=512)
            out["floors"] = {}
            for end in ("max", "min"):
                v = getattr(first, f"vector_{end}").float()
                v = v / v.norm()
                c = H.per_sample_curvature(v).double()
                g, gl = ggn_parts(model, X, Y, v, last)
                out["floors"][end] = fl = floors(c, px, g, gl)
                best = sorted(fl["factors"].items(), key=lambda kv: -kv[1])[:6]
                log(f"  floor {end}: cv {fl['cv']:.2f}, top5 {fl['top5_share']:.2f}, "
                    + ", ".join(f"{k} {v:.2f}" for k, v in best))
        save(args, report, E, out)


if __name__ == "__main__":
    main()
