"""How well the half level's prediction foretells the half level (issue 13): forced half levels.

A call's levels end, once the next size passes ``N / 2`` after a level of at most ``N / 4``,
either with one level on ``N / 2`` images (when every end left is predicted to pass there
within ``POLICY.half_margin`` times its target, on the tighter of the subsample bound's side,
:func:`curvlab.multilevel._half_prediction`, and Kato-Temple's,
:func:`curvlab.multilevel._half_kato_temple`) or with the exact stage on all data.  This script measures the prediction against what the
half level then finds, wherever the decision arises: every call runs with the half level
forced (``half_margin = inf``) and, with ``--stub-exact``, with the exact stage replaced by a
stub that returns nothing (the call stops after its half level, or after the decision when
the half level could not run; its intervals are then not results, and the script reports no
values).  Per call, at the decision: the prediction over the target (``predicted``; the two
sides in the level record, ``at_level``), the half
level's half-width over its own target (``found``), their ratio (``found / predicted``, the
prediction's conservatism), whether the half level passed, and the cost in epochs (HVP-equivalents
times the HVP's FLOPs over a gradient's) up to the decision and of the half level alone.

Cases:

* ``--epochs E,...`` (with ``--stop-at-decision``, each call stops at the decision: the
  predictions without the half level): the ResNet-8 checkpoints ``c50k-e{E}`` of ``experiments/bench_cnn50k.py``
  (all 50,000 images), cold calls for ``--seeds`` seeds from ``--first-seed``; with ``--warm``,
  also the warm call from the cached seed-0 call on ``c50k-e{E-1}`` (``bench_cnn50k
  --reuse-warm`` writes it; it is never computed here);
* ``--mlp``: the tests' MLP (:func:`experiments.models.noisy_mlp`, 3,000 samples, float64), for
  ``--mlp-seeds`` seeds, sample sizes ``--mlp-sizes`` and floors ``--mlp-floors``, with the exact
  stage run (it is cheap there) and its cost reported beside the half level's.

Run (2 threads, alone; a CNN call costs about 100 epochs, 10 minutes here)::

    OMP_NUM_THREADS=2 python -m experiments.bench_half --epochs 30,28 --seeds 1 --warm \
        --stub-exact --json runs/half_cnn.json
    OMP_NUM_THREADS=1 python -m experiments.bench_half --mlp --json runs/half_mlp.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab
from curvlab import multilevel
from experiments.bench_cnn50k import hvp_over_gradient, log, policy
from experiments.bench_correctness import BIG, POOL, big_checkpoints, load_checkpoint
from experiments.bench_curvature import make_data
from experiments.cifar import find_cifar10
from experiments.models import noisy_mlp


@contextlib.contextmanager
def stubbed_exact():
    """``multilevel._exact`` replaced by a stub that spends nothing and returns open,
    unconverged ends: the call stops where its exact stage would begin."""
    real = multilevel._exact

    def stub(ctx, H, start, todo, guards=None):
        return {e: dict(value=math.nan, interval=(-math.inf, math.inf), vector=None, converged=False,
                        solver=math.inf, sampling=math.inf) for e in todo}

    multilevel._exact = stub
    try:
        yield
    finally:
        multilevel._exact = real


def decisions(r, ratio: float, N: int, stopped: bool = False) -> list:
    """The calls' half-level decisions, from ``r.levels``: per end that a level of at most
    ``N / 4`` left short with a ``half_prediction``, and whose next level was a half level or
    the exact stage, the prediction, what the half level found (half-width over its target), and
    the costs (in epochs, with ``ratio`` the HVP's FLOPs over a gradient's); ``stopped``: the
    call ran with ``--stop-at-decision``."""
    out, levels = [], r.levels
    for i, lv in enumerate(levels):
        before = levels[i - 1]["hvps_so_far"] if i else 0.0
        for end, d in lv["ends"].items():
            if "half_prediction" not in d or 4 * lv["sample_size"] > N:
                continue
            row = dict(end=end, level=lv["sample_size"], predicted=d["half_prediction"], target=d["target"],
                       epochs_to_decision=lv["hvps_so_far"] * ratio, level_epochs=(lv["hvps_so_far"] - before) * ratio)
            row["at_level"] = parts(d)
            nxt = levels[i + 1] if i + 1 < len(levels) else None
            if nxt is not None and nxt.get("half_level") and end in nxt["ends"]:
                h = nxt["ends"][end]
                lo, hi = h["interval"]
                found = (hi - lo) / 2 / h["target"]
                row.update(half_size=nxt["sample_size"], found=found, passed=bool(h["accepted"]),
                           found_over_predicted=found * h["target"] / (d["half_prediction"] * d["target"]),
                           half_epochs=(nxt["hvps_so_far"] - lv["hvps_so_far"]) * ratio, at_half=parts(h))
            elif nxt is None:
                row.update(half_size=None, note="stopped at the decision" if stopped
                           else "no half level (budget, or the last level's size)")
            else:
                continue  # an ordinary level followed: not a decision
            out.append(row)
    return out


def parts(d: dict) -> dict:
    """A level's record of one end, the parts of its width: the holdout's Rayleigh quotient and
    standard error, the subsample's Ritz value, residual and bound's standard error (the
    span spread's, :func:`curvlab.sampling.span_subsample_se`), the half-width and target."""
    lo, hi = d["interval"]
    return dict(rayleigh=d["rayleigh_holdout"], se=d["standard_error"], theta_subsample=d["theta_subsample"],
                residual=d["residual"], subsample_se=d["subsample_se"], holdout=d["holdout"],
                half_width=(hi - lo) / 2, target=d["target"], residual_full=d["residual_full"],
                kato_temple=d["kato_temple"], guard_theta=d.get("guard_theta"),
                guard_residual=d.get("guard_residual"), half_prediction_stat=d.get("half_prediction_stat"),
                half_prediction_kt=d.get("half_prediction_kt"))


def show(label, r, ratio, rows):
    log(f"  {label}: {r.cost.hvps * ratio:.1f} epochs ({r.cost.hvps:.2f} HVPs, {r.cost.seconds:.0f} s), "
        f"levels {[lv['sample_size'] for lv in r.levels]}")
    for d in rows:
        a = d["at_level"]
        s = (f"    {d['end']} after {d['level']}: predicted {d['predicted']:.2f} (subsample side "
             f"{a.get('half_prediction_stat', math.nan):.2f}, Kato-Temple {a.get('half_prediction_kt', math.nan):.2f})")
        if d.get("half_size"):
            s += (f", found {d['found']:.2f} at {d['half_size']} (found/predicted {d['found_over_predicted']:.2f}), "
                  f"passed {d['passed']}; {d['epochs_to_decision']:.1f} epochs to the decision, "
                  f"half level {d['half_epochs']:.1f}")
        log(s)


def cnn(args, report, save):
    data = find_cifar10(args.data)
    X, Y = make_data(data, BIG, POOL)
    cache = Path(args.cache)
    epochs = [int(e) for e in args.epochs.split(",")]
    paths = big_checkpoints(cache, data, epochs, X, Y)
    for E in epochs:
        model, meta = load_checkpoint(paths[E])
        ratio = hvp_over_gradient(model, X, Y)
        log(f"c50k-e{E}: train acc {meta['train_acc']:.4f}, HVP/gradient FLOPs {ratio:.2f}")
        calls = [(f"cold s{s}", s, None) for s in range(args.first_seed, args.first_seed + args.seeds)]
        kept = cache / f"warm_c50k-e{E - 1}_s0.pt"
        if args.warm:
            if kept.exists():
                calls.append(("warm", args.first_seed, torch.load(kept, weights_only=False)))
            else:
                log(f"  (no cached warm start {kept}: run bench_cnn50k --reuse-warm first)")
        # (--stop-at-decision: no half level and no exact stage, only the levels up to the decision)
        knob = dict(half_level=False) if args.stop_at_decision else dict(half_margin=math.inf)
        stub = args.stub_exact or args.stop_at_decision
        for label, seed, prev in calls:
            with policy(**knob), (stubbed_exact() if stub else contextlib.nullcontext()):
                r = curvlab.extremes(model, F.cross_entropy, (X, Y), seed=seed, init=prev)
            rows = decisions(r, ratio, len(X), args.stop_at_decision)
            report["calls"].append(dict(case=f"c50k-e{E}", call=label, train_acc=meta["train_acc"],
                                        epochs=r.cost.hvps * ratio, seconds=r.cost.seconds,
                                        levels=[lv["sample_size"] for lv in r.levels], decisions=rows,
                                        stubbed=stub, stopped_at_decision=args.stop_at_decision))
            show(f"c50k-e{E} {label}", r, ratio, rows)
            save()


def mlp(args, report, save):
    model, X, Y = noisy_mlp()
    for floor in [float(x) for x in args.mlp_floors.split(",")]:
        for m in [int(x) for x in args.mlp_sizes.split(",")]:
            for s in range(args.mlp_seeds):
                kw = dict(sampling="multilevel", sample_size=m, tol=0.05, tol_min=0.05, floor=floor, seed=s)
                with policy(half_margin=math.inf):
                    r = curvlab.extremes(model, F.cross_entropy, (X, Y), **kw)
                with policy(half_level=False):
                    e = curvlab.extremes(model, F.cross_entropy, (X, Y), **kw)
                rows = decisions(r, 1.0, len(X))
                report["calls"].append(dict(case=f"mlp m{m} floor{floor:g}", call=f"s{s}", hvps=r.cost.hvps,
                                            hvps_exact_path=e.cost.hvps,
                                            levels=[lv["sample_size"] for lv in r.levels], decisions=rows))
                show(f"mlp m{m} floor {floor:g} s{s} (exact path {e.cost.hvps:.1f} HVPs)", r, 1.0, rows)
                save()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--epochs", default="", help="CNN checkpoints c50k-e{E}, comma-separated")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--warm", action="store_true", help="also the warm call from the cached e{E-1} call")
    p.add_argument("--stub-exact", action="store_true", help="stop each CNN call where its exact stage would begin")
    p.add_argument("--stop-at-decision", action="store_true",
                   help="no half level and no exact stage: each CNN call stops at its decision (the predictions only)")
    p.add_argument("--mlp", action="store_true", help="the tests' MLP")
    p.add_argument("--mlp-seeds", type=int, default=10)
    p.add_argument("--mlp-sizes", default="100,150,400")
    p.add_argument("--mlp-floors", default="0,0.03")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                  library=curvlab.__file__, calls=[])

    def save():  # after every call: nothing is lost on interruption
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1, default=float))

    if args.epochs:
        cnn(args, report, save)
    if args.mlp:
        mlp(args, report, save)
    save()


if __name__ == "__main__":
    main()
