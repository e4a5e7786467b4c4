"""Benchmark of the user's setting: both Hessian extremes of CIFAR ResNet-18 on all of CIFAR-10.

What it measures, on one GPU (``--device``, default ``cuda`` when available):

1. train the CIFAR ResNet-18 (width 1, about 11.2M parameters) for one epoch
   on the 50,000 training images (SGD, momentum 0.9, flips and crops), timed:
   this gets the network off its initialisation, where BatchNorm's running
   statistics are meaningless;
2. time ``curvlab.extremes`` for ``lambda_max`` and ``lambda_min`` of the
   Hessian of the mean cross-entropy over the 50,000 unaugmented training
   images (eval mode), from a cold start;
3. ``--warm-epochs`` more times (default 1): one more training epoch, then the
   extremes warm-started from the previous result, as a per-epoch run
   (``experiments.train_cifar``) does after its first epoch.

Reported per solve: seconds, full-data HVP equivalents, the estimates with
their intervals, and the ratio *seconds of the solve / seconds of a training
epoch*.  The target is under one minute for both extremes.  The JSON written
to ``--out`` holds the device name, the figures, the configuration and the
date.

On a machine without a GPU (or with ``--smoke``) it runs a tiny configuration
as a smoke test of the script itself: width 0.125, 512 images, one epoch (and
synthetic CIFAR-shaped data when CIFAR-10 is not found); its timings say
nothing about the GPU setting.

Usage (from the repository root)::

    python -m experiments.bench_gpu                        # the GPU benchmark
    python -m experiments.bench_gpu --smoke --device cpu   # the smoke test
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import curvlab

from .cifar import normalize
from .models import build_model
from curvlab.tracker import json_safe

from .train_cifar import extremes_options, extremes_record, load_data, train_epoch

__all__ = ["main", "cli", "SMOKE", "TARGET_SECONDS"]

#: Overrides that make the smoke test (CPU) quick.
SMOKE = dict(width=0.125, subset=512, epochs=1, warm_epochs=1, max_hvps=20, hvp_batch_size=128)
#: The goal for both extremes together on the full setting.
TARGET_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (smoke test)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE.items()) + " (automatic without a GPU)")
    p.add_argument("--data", default=None, help="cifar-10-batches-py folder or its parent (or $CURVLAB_DATA)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=None, help="default 1 (smoke: 0.125)")
    p.add_argument("--subset", type=int, default=None, help="training images (default: all; smoke: 512)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs before the first solve (default 1)")
    p.add_argument("--warm-epochs", type=int, default=None,
                   help="further epochs, each followed by a warm-started solve (default 1)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--tol-min", type=float, default=5e-2)
    p.add_argument("--max-hvps", type=float, default=None, help="default 300 (smoke: 20)")
    p.add_argument("--max-basis", type=int, default=40)
    p.add_argument("--sampling", default=None, choices=("auto", "exact", "multilevel"),
                   help="default: the library's ('auto': subsampled on the full data set)")
    p.add_argument("--sample-size", type=int, default=None)
    p.add_argument("--confidence", type=float, default=None)
    p.add_argument("--hvp-batch-size", type=int, default=None, help="default 256 (smoke: 128)")
    p.add_argument("--curvature", default="none", choices=curvlab.CURVATURES)
    p.add_argument("--approx-samples", type=int, default=None)
    p.add_argument("--approx-rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", default="runs/bench_gpu.json", help="JSON file with the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    smoke = args.smoke = args.smoke or device.type != "cuda"
    defaults = dict(SMOKE) if smoke else dict(width=1.0, subset=None, epochs=1, warm_epochs=1,
                                              max_hvps=300, hvp_batch_size=256)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.test_subset = 1
    args.extremes_subset = None

    Xtr, Ytr, _, _, source = load_data(args, allow_synthetic=smoke)
    X, Y = normalize(Xtr).to(device), Ytr.to(device)
    N = X.shape[0]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.model, args.width).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"{'SMOKE TEST (tiny configuration, timings not representative)' if smoke else 'benchmark'}: "
          f"{args.model} width {args.width:g} ({n_params:,} parameters), {N} images ({source}), "
          f"on {device} ({name})")
    opts = extremes_options(args)
    progress = not args.quiet
    rows, previous = [], None
    epoch = 0
    for stage in range(1 + args.warm_epochs):
        train_s = 0.0
        for _ in range(args.epochs if stage == 0 else 1):
            epoch += 1
            loss, acc, secs = train_epoch(model, optimizer, X, Y, args.batch_size, generator, progress,
                                          desc=f"train epoch {epoch}")
            train_s = secs  # the last epoch's time: the per-epoch figure
        _sync(device)
        t0 = time.perf_counter()
        result = curvlab.extremes(model, F.cross_entropy, (X, Y), init=previous, seed=args.seed + epoch,
                                  progress=progress, **opts)
        _sync(device)
        wall = time.perf_counter() - t0
        rec = extremes_record(result, train_s, N)
        rec.update(epoch=epoch, start="warm" if previous is not None else "cold", train_loss=loss,
                   train_acc=acc, train_seconds=train_s, extremes_seconds=wall,
                   cost_epochs_time=wall / train_s, method=result.options.get("method"),
                   sampling=result.options.get("sampling"))
        rows.append(json_safe(rec))
        previous = result

    print(_table(rows))
    best = min(r["extremes_seconds"] for r in rows)
    verdict = ("(smoke test: no verdict)" if smoke else
               f"target < {TARGET_SECONDS:.0f} s for both extremes: "
               + ("met" if rows[-1]["extremes_seconds"] < TARGET_SECONDS else "MISSED")
               + f" (per-epoch, warm-started: {rows[-1]['extremes_seconds']:.1f} s)")
    print(verdict)
    report = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"), smoke=smoke, device=str(device),
        device_name=name, torch=torch.__version__, curvlab=curvlab.__version__, data=source,
        config={k: v for k, v in vars(args).items() if k not in ("quiet", "out")},
        num_params=n_params, num_train=N, target_seconds=TARGET_SECONDS, rows=rows,
        best_extremes_seconds=best,
        train_epoch_seconds=rows[-1]["train_seconds"], extremes_seconds=rows[-1]["extremes_seconds"],
        ratio=rows[-1]["cost_epochs_time"],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return 0


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _table(rows) -> str:
    head = ("epoch", "start", "train s", "extremes s", "ratio", "HVPs", "lambda_max", "interval_max",
            "lambda_min", "interval_min", "conv")
    lines = [head]
    for r in rows:
        iv = (lambda a: "[" + ", ".join(_fmt(v, ".4g") for v in a) + "]")
        lines.append((str(r["epoch"]), r["start"], _fmt(r["train_seconds"], ".1f"),
                      _fmt(r["extremes_seconds"], ".1f"), _fmt(r["cost_epochs_time"], ".2f"),
                      _fmt(r["hvps"], ".1f"), _fmt(r["lambda_max"], ".4g"), iv(r["interval_max"]),
                      _fmt(r["lambda_min"], ".4g"), iv(r["interval_min"]),
                      f"{'y' if r['converged_max'] else 'n'}/{'y' if r['converged_min'] else 'n'}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    note = ("ratio = seconds of both extremes / seconds of the training epoch; HVPs in full-data "
            "equivalents; conv = converged max/min")
    return "\n".join(text + [note])


def cli(argv=None) -> int:
    """:func:`main`, with a missing data folder reported as one line and exit status 2."""
    try:
        return main(argv)
    except FileNotFoundError as err:
        print(f"bench_gpu: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
