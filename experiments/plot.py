"""Plots of a ``train_cifar`` run: per-epoch curves, or one solve's convergence trace.

Usage (from the repository root)::

    python -m experiments.plot runs/demo/log.jsonl --out runs/demo/curves.png
    python -m experiments.plot runs/demo --trace --out runs/demo/trace.png        # the last epoch's solve
    python -m experiments.plot runs/demo/trace_epoch2.json --trace --out trace.png

Curves (from ``log.jsonl``): three panels against the epoch,

1. ``lambda_max`` with its interval ``interval_max`` as a band and error bars;
2. ``lambda_min`` likewise (a dotted line at zero);
3. train and test accuracy.

An estimate whose solve did not converge is drawn with a hollow marker.

Trace (from ``trace_epoch{e}.json``): the Ritz values ``lambda_max`` and
``lambda_min`` after each solver step against the products spent (full-data
HVP equivalents, ``hvps``, when the trace has them, else the count of
matrix-vector products ``matvecs``), and the residual norms ``res_max`` and
``res_min`` on a log scale, the quantities the stopping rule compares with
``tol * |lambda|``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from curvlab.tracker import draw_extremes  # noqa: E402

__all__ = ["main", "plot_log", "plot_trace", "read_log", "find_trace"]


def read_log(path) -> list:
    """The records of a JSONL log, in file order (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def find_trace(path) -> Path:
    """A trace file from ``path``: the file itself, or the last epoch's trace in a run folder
    (or beside a ``log.jsonl``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path
    folder = path if path.is_dir() else path.parent
    traces = sorted(folder.glob("trace_epoch*.json"), key=lambda p: int(p.stem.removeprefix("trace_epoch")))
    if not traces:
        raise FileNotFoundError(f"no trace_epoch*.json in {folder}: run train_cifar with extremes first")
    return traces[-1]


def plot_log(records: list, out, title: str | None = None) -> Path:
    """Draw the per-epoch curves of ``records`` (log lines) into the PNG ``out``."""
    if not records:
        raise ValueError("the log is empty: no finished epoch to plot")
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    epochs = [r["epoch"] for r in records]
    draw_extremes(axes[0], axes[1], records)
    axes[0].set_title(title or "Hessian extremes of the training loss per epoch")
    ax = axes[2]
    ax.plot(epochs, [100 * _num(r.get("train_acc")) for r in records], marker="o", ms=4, label="train (augmented)")
    ax.plot(epochs, [100 * _num(r.get("test_acc")) for r in records], marker="s", ms=4, label="test")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_trace(trace: dict, out, title: str | None = None) -> Path:
    """Draw one solve's convergence trace (``trace["history"]``) into the PNG ``out``."""
    hist = trace.get("history") or []
    if not hist:
        raise ValueError("the trace has no history entries: nothing to plot")
    xkey = "hvps" if all("hvps" in h for h in hist) else "matvecs"
    x = [_num(h.get(xkey)) for h in hist]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    options = trace.get("options") or {}
    for end, colour in (("max", "tab:red"), ("min", "tab:blue")):
        if any(h.get(f"lambda_{end}") is not None for h in hist):
            theta = [_num(h.get(f"lambda_{end}")) for h in hist]
            ax1.plot(x, theta, color=colour, marker=".", label=f"lambda_{end} (Ritz value)")
            ax2.semilogy(x, [_num(h.get(f"res_{end}")) for h in hist], color=colour, marker=".",
                         label=f"res_{end} = ||H v - theta v||")
            tol = options.get("tol" if end == "max" else "tol_min")
            if tol is not None:
                ax2.semilogy(x, [tol * abs(t) for t in theta], color=colour, ls="--", lw=1,
                             label=f"target {tol:g} |lambda_{end}|")
    ax1.set_ylabel("Ritz value")
    ax1.legend(loc="best", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("residual norm")
    ax2.set_xlabel("full-data HVPs" if xkey == "hvps" else "matrix-vector products")
    ax2.legend(loc="best", fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    epoch = trace.get("epoch")
    ax1.set_title(title or ("solver trace" + (f", epoch {epoch}" if epoch is not None else "")))
    return _save(fig, out)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="log.jsonl (curves), or with --trace a trace_epochN.json or run folder")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--trace", action="store_true", help="draw a solve's convergence trace")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if args.trace:
        path = find_trace(args.path)
        with open(path) as f:
            out = plot_trace(json.load(f), args.out, args.title)
    else:
        path = Path(args.path)
        if path.is_dir():
            path = path / "log.jsonl"
        out = plot_log(read_log(path), args.out, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
