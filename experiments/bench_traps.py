"""How often a converged ``lambda_min`` interval excludes the truth under a ``floor``.

On the spectra of :data:`experiments.synthetic.TRAP_SPECTRA` (outliers, a bulk, and a bottom
that a loose stopping rule passes at an interior Ritz value: a pair 7 % apart, one deep
eigenvalue, a geometric tail, a bottom near zero), ``curvlab.extremes`` at each ``--floors``
value (relative to ``lambda_max``) from ``--seeds`` random starts, at the default tolerances,
float64, four samples (the full-data stage runs; a product is one HVP).  Per spectrum and
floor: the calls whose ``lambda_min`` interval says converged but excludes the dense
eigenvalue, the calls converged, and the mean HVPs.

What it tells: whether the solver's stopping rule with a floor above the spacing of the
bottom's eigenvalues still certifies the extreme one (``lanczos(guard=True)``: the guard pair
settles at a quarter of the floor), and what that costs.

Run (1 thread, about twenty seconds)::

    OMP_NUM_THREADS=1 python -m experiments.bench_traps --json runs/traps.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import curvlab
from experiments.bench_floors import log
from experiments.synthetic import TRAP_SPECTRA, mean_loss, quadratic_problem


def run(floors, seeds: int, spectra=None) -> dict:
    """Rows ``{"<spectrum> <floor>": {...}}`` for the named ``spectra`` (default: all)."""
    out = {}
    for name in spectra or list(TRAP_SPECTRA):
        ev = TRAP_SPECTRA[name]
        model, data, H = quadratic_problem(ev, samples=4)
        truth = float(torch.linalg.eigvalsh(H)[0])
        for floor in floors:
            wrong = converged = 0
            hvps = []
            for seed in range(seeds):
                r = curvlab.extremes(model, mean_loss, data, batch_size=4, seed=seed, floor=floor)
                lo, hi = r.interval_min
                converged += bool(r.converged_min)
                wrong += bool(r.converged_min and not lo <= truth <= hi)
                hvps.append(r.cost.hvps)
            row = dict(spectrum=name, floor=floor, lambda_min=truth, wrong=wrong,
                       converged=converged, seeds=seeds, mean_hvps=sum(hvps) / seeds)
            out[f"{name} {floor}"] = row
            log(f"{name:10s} floor {floor:<6g} wrong {wrong:2d} / {seeds}, converged {converged}, "
                f"mean HVPs {row['mean_hvps']:.1f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--floors", type=float, nargs="+", default=[0.001, 0.003, 0.005, 0.01, 0.02])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the table here")
    args = ap.parse_args(argv)
    rows = run(args.floors, args.seeds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
