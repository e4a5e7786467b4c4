"""Throughput of gradients and Hessian-vector products on a CIFAR ResNet (issue 2).

Run from the repository root::

    python -m experiments.bench_hvp                       # ResNet-20, batch 128, 5 rounds
    python -m experiments.bench_hvp --rounds 3 --json runs/bench_hvp.json
    python -m experiments.bench_hvp --threads 2,1         # both thread counts, interleaved
    python -m experiments.bench_hvp --profile "block k=4 fwd-rev" --threads 1   # where time goes

What is measured, on one batch of ``B`` images (real CIFAR-10 when found, see
:mod:`experiments.cifar`; random images otherwise, with a printed note), with
the model in eval mode (BatchNorm uses its running statistics, as curvlab's
Hessian does):

* ``grad (torch.func)``: ``torch.func.grad`` of ``HessianOperator.batch_loss``,
  the batch mean loss on the operator's own functional model: one forward and
  one backward pass.
* ``grad (autograd)``: the same gradient through ``torch.autograd.grad`` on
  the same functional model.  The faster of the two (by median time) is the
  reference gradient every ratio is taken against, so that no ratio is
  flattered by a slow gradient path.
* ``single HVP``: ``op.matvec(v)`` with ``v`` of shape ``(n,)``, for both
  ``method="rev-rev"`` and ``method="fwd-rev"`` of
  :class:`curvlab.HessianOperator` (``batch_size=B``, so one batch is one
  data pass).
* ``block HVP k``: ``op.matvec(V)`` with ``V`` of shape ``(k, n)``, both methods.

Figures:

* throughput in images*vectors per second, ``B * k / t`` (``k = 1`` for a
  gradient or a single HVP);
* the HVP/gradient cost ratio *per vector*, ``(t_hvp / k) / t_grad``: how many
  gradients one Hessian-vector product costs.  Issue 2's targets: at most 3.5
  for a single HVP, at most 2 per vector for a block of ``k = 16``;
* FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  multiplications and convolutions, forward and backward kernels; elementwise
  work such as BatchNorm in eval mode or ReLU is not counted) and the FLOP
  ratio per vector against a gradient.

Timing protocol.  The machine is shared and noisy, so configurations are
timed *interleaved*: one warm-up call of every configuration (run under the
FLOP counter, which is how the FLOPs are obtained; warm-up times are
discarded), then ``rounds`` rounds each timing every configuration once, the
order rotated by one position per round so that no configuration always runs
first or last (slow drifts of the machine's load spread over all of them).
Ratios are formed *within* a round (HVP time over the gradient time of that
same round) and their median over rounds is reported, with their range and
next to the median times; also a best-time ratio (best HVP time over best
gradient time: contention only ever slows a call down).  The two methods are
compared head to head by the per-round ratio ``t(fwd-rev) / t(rev-rev)``
(:func:`head_to_head`), which the gradient's noise does not enter.  ``torch`` threads are left at their
default (printed) unless ``--threads`` is given; ``--threads 2,1`` times every
configuration at each thread count, all interleaved in the same rounds, each
thread count with its own reference gradient (on a shared machine, two
threads can be much slower than one when the other core is busy: a parallel
region waits for its slowest thread).

Cost: every configuration runs ``rounds + 1`` times.  Per round that is
``2 + 2 * (1 + sum(ks))`` products, i.e. about 90 gradient-equivalents of wall
time for the defaults (``ks = 1, 4, 16``, both methods, HVP ~ 2-4 gradients per
vector): minutes per round for ResNet-20 at batch 128 on two CPU cores.  Peak
memory is set by ``fwd-rev`` at the largest ``k`` (the ``vmap`` carries ``k``
tangent copies of every activation: a peak RSS of 8.5 GiB for ResNet-20, batch
128, k = 16).  Figures and their reading: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.func import grad
from torch.utils.flop_counter import FlopCounterMode

import curvlab
from experiments.cifar import load_cifar10, normalize
from experiments.models import MODELS, build_model

__all__ = ["Config", "load_batch", "make_configs", "profile_config", "run_benchmark", "markdown_table", "head_to_head",
           "verdict", "main"]

METHODS = ("rev-rev", "fwd-rev")


@dataclass
class Config:
    """One timed configuration: ``fn()`` computes ``vectors`` products over the batch."""

    name: str
    kind: str            # "grad" or "hvp"
    method: str          # "torch.func", "autograd", "rev-rev" or "fwd-rev"
    vectors: int         # k (1 for a gradient or a single HVP)
    fn: Callable[[], object] = field(repr=False)
    threads: int = 0     # torch threads it runs with
    times: List[float] = field(default_factory=list)
    flops: int | None = None


def load_batch(batch: int, data: str | None = None, seed: int = 0):
    """``(X, Y, source)``: the first ``batch`` CIFAR-10 training images, normalised.

    Without ``data`` the folder is looked up as in :func:`experiments.cifar.find_cifar10`;
    when it is not found, random ``N(0, 1)`` images and labels are used instead, with a
    printed note (timings hardly depend on pixel values).  An explicit ``data`` that
    cannot be read raises.
    """
    try:
        X, Y = load_cifar10(data, limit=batch)
        if len(X) < batch:
            raise ValueError(f"only {len(X)} CIFAR-10 training images, asked for a batch of {batch}")
        return normalize(X), Y, "CIFAR-10 (first training images)"
    except (FileNotFoundError, ValueError) as err:
        if data is not None:
            raise
        print(f"note: no CIFAR-10 batch ({err}); using random N(0, 1) images and labels")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g), "random"


def make_configs(op_by_method: Dict[str, curvlab.HessianOperator], X, Y,
                 ks: Sequence[int], seed: int = 0) -> List[Config]:
    """The two gradient paths, the single HVP and the blocks of every ``k``, for each method."""
    ref = next(iter(op_by_method.values()))
    params = ref.fmodel.params
    func_grad = grad(ref.batch_loss)

    def grad_func():
        return func_grad(params, X, Y)

    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}

    def grad_autograd():
        with torch.enable_grad():
            return torch.autograd.grad(ref.batch_loss(leaves, X, Y), list(leaves.values()))

    g = torch.Generator().manual_seed(seed)
    vectors = {k: torch.randn(k, ref.n, generator=g, dtype=ref.dtype) for k in sorted(set(ks))}
    single = torch.randn(ref.n, generator=g, dtype=ref.dtype)
    configs = [Config("grad (torch.func)", "grad", "torch.func", 1, grad_func),
               Config("grad (autograd)", "grad", "autograd", 1, grad_autograd)]
    for method, op in op_by_method.items():
        configs.append(Config(f"single HVP {method}", "hvp", method, 1, lambda op=op: op.matvec(single)))
        for k in sorted(set(ks)):
            configs.append(Config(f"block k={k} {method}", "hvp", method, k,
                                  lambda op=op, V=vectors[k]: op.matvec(V)))
    return configs


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _setup(model, width, batch, methods, data, seed):
    torch.manual_seed(seed)
    net = build_model(model, width=width).eval()
    X, Y, source = load_batch(batch, data, seed)
    ops = {m: curvlab.HessianOperator(net, F.cross_entropy, (X, Y), batch_size=batch, method=m)
           for m in methods}
    return net, X, Y, source, ops


def profile_config(name: str, model: str = "resnet20", width: float = 1.0, batch: int = 128,
                   ks: Sequence[int] = (1, 4, 16), methods: Sequence[str] = METHODS,
                   data: str | None = None, seed: int = 0, row_limit: int = 15) -> str:
    """``torch.profiler`` table (ops by self CPU time) of one call of configuration ``name``.

    ``name`` is a configuration name as printed by the benchmark, e.g.
    ``"single HVP rev-rev"`` or ``"block k=4 fwd-rev"``; one untimed warm-up
    call precedes the profiled one.
    """
    _, X, Y, _, ops = _setup(model, width, batch, methods, data, seed)
    configs = {c.name: c for c in make_configs(ops, X, Y, ks, seed)}
    if name not in configs:
        raise ValueError(f"no configuration {name!r}; choose one of {sorted(configs)} "
                         "(block sizes come from --ks, methods from --methods)")
    fn = configs[name].fn
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def run_benchmark(model: str = "resnet20", width: float = 1.0, batch: int = 128, rounds: int = 5,
                  ks: Sequence[int] = (1, 4, 16), methods: Sequence[str] = METHODS,
                  data: str | None = None, seed: int = 0, flops: bool = True,
                  threads: Sequence[int] | None = None, verbose: bool = True) -> dict:
    """Time every configuration interleaved and return the results as a dict.

    ``threads``: thread counts to time every configuration at (``None``: the
    current ``torch.get_num_threads()`` only); torch's thread count is restored
    afterwards.

    Returns a JSON-ready dict: ``meta`` (model, batch, default threads, torch
    version, data source, load averages before/after, peak RSS, the method
    ``"auto"`` picks here, ...) and ``rows``, one per configuration and thread
    count, with the median time ``seconds``, ``images_vectors_per_s``
    ``= batch * k / seconds``, ``ratio`` (median over rounds of the per-vector
    time over that round's time of the reference gradient at the same thread
    count, the faster of the two gradient paths by median, named in
    ``reference``), ``ratio_min``/``ratio_max`` over rounds, ``ratio_best`` (the
    same ratio between the best times over all rounds: contention on a shared
    machine only ever slows a call down, so best times estimate the unloaded
    cost), ``flops`` and
    ``flop_ratio`` per vector (``None`` when FLOPs are not counted), and the raw
    ``times``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive block sizes, got {list(ks)}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    default_threads = torch.get_num_threads()
    threads = [default_threads] if not threads else [int(t) for t in threads]
    if any(t < 1 for t in threads) or len(set(threads)) != len(threads):
        raise ValueError(f"threads must be distinct positive counts, got {threads}")
    say = print if verbose else (lambda *a, **k: None)

    net, X, Y, source, ops = _setup(model, width, batch, methods, data, seed)
    configs: List[Config] = []
    for t in threads:
        for c in make_configs(ops, X, Y, ks, seed):
            c.threads = t
            configs.append(c)
    multi = len(threads) > 1

    def label(c):
        return f"{c.name} @{c.threads}t" if multi else c.name

    load_before = os.getloadavg()
    say(f"{model} width {width}: n = {ops[methods[0]].n} parameters, batch {batch} ({source}), "
        f"torch {torch.__version__}, default {default_threads} threads, timing at {threads}, "
        f"load {load_before}")

    t_start = time.perf_counter()
    try:
        counted: Dict[str, int] = {}
        for c in configs:  # warm-up; FLOPs (thread-independent) counted once per configuration
            torch.set_num_threads(c.threads)
            t0 = time.perf_counter()
            if flops and c.name not in counted:
                counted[c.name] = _count_flops(c.fn)
            else:
                c.fn()
            c.flops = counted.get(c.name)
            say(f"  warm-up {label(c):30s} {time.perf_counter() - t0:8.2f} s"
                + (f"  {c.flops / 1e9:10.2f} GFLOP" if c.flops else ""))
        for r in range(rounds):
            shift = r % len(configs)
            for c in configs[shift:] + configs[:shift]:
                torch.set_num_threads(c.threads)
                t0 = time.perf_counter()
                c.fn()
                c.times.append(time.perf_counter() - t0)
            say(f"  round {r + 1}/{rounds} (load {os.getloadavg()[0]:.2f}): "
                + ", ".join(f"{label(c)} {c.times[-1]:.2f}s" for c in configs))
    finally:
        torch.set_num_threads(default_threads)
    elapsed = time.perf_counter() - t_start

    rows = []
    references = {}
    for t in threads:
        group = [c for c in configs if c.threads == t]
        # the reference gradient is the faster of the two gradient paths (median time)
        ref = min((c for c in group if c.kind == "grad"), key=lambda c: _median(c.times))
        references[t] = ref.name
        for c in group:
            ratios = [(tc / c.vectors) / tg for tc, tg in zip(c.times, ref.times)]
            sec = _median(c.times)
            rows.append({
                "name": c.name, "kind": c.kind, "method": c.method, "k": c.vectors, "threads": t,
                "reference": ref.name, "seconds": sec, "images_vectors_per_s": batch * c.vectors / sec,
                "ratio": _median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratio_best": (min(c.times) / c.vectors) / min(ref.times),
                "flops": c.flops,
                "flop_ratio": (c.flops / c.vectors / ref.flops) if (c.flops and ref.flops) else None,
                "times": c.times,
            })
    meta = {
        "model": model, "width": width, "batch": batch, "rounds": rounds, "ks": sorted(set(ks)),
        "methods": list(methods), "n": ops[methods[0]].n, "data": source,
        "references": {str(t): n for t, n in references.items()},
        "torch": torch.__version__, "default_threads": default_threads, "threads": threads,
        "cpu": _cpu_name(), "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "seconds_total": elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "auto_method_cpu": curvlab.HessianOperator(net, F.cross_entropy, (X[:1], Y[:1])).method,
    }
    return {"meta": meta, "rows": rows}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown_table(result: dict) -> str:
    """The rows as a markdown table (times and ratios are medians over rounds)."""
    m = result["meta"]
    lines = [
        f"{m['model']} (width {m['width']}, n = {m['n']:,}), batch {m['batch']}, {m['data']}, eval mode; "
        f"torch {m['torch']}; median of {m['rounds']} interleaved rounds. "
        f"Ratio = (time per vector) / (time of the reference gradient at the same thread count, same "
        f"round), range over rounds in brackets; best-time ratio = (best time per vector) / (best "
        f"gradient time), over all rounds; reference gradient: "
        + ", ".join(f"{t} threads: {n}" for t, n in m["references"].items()) + ".",
        "",
        "| configuration | threads | k | time (s) | images·vectors/s | ratio per vector vs grad "
        "| best-time ratio | GFLOP | FLOP ratio per vector |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        gflop = f"{r['flops'] / 1e9:.2f}" if r["flops"] else "–"
        fr = f"{r['flop_ratio']:.2f}" if r["flop_ratio"] is not None else "–"
        lines.append(f"| {r['name']} | {r['threads']} | {r['k']} | {r['seconds']:.3f} | "
                     f"{r['images_vectors_per_s']:.1f} | "
                     f"{r['ratio']:.2f} [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}] | {r['ratio_best']:.2f} | "
                     f"{gflop} | {fr} |")
    return "\n".join(lines)


def head_to_head(result: dict, label: str, threads: int) -> dict | None:
    """Per-round time ratio ``t(fwd-rev) / t(rev-rev)`` for configuration ``label`` (e.g.
    ``"block k=16"``): the direct side-by-side comparison of the two methods, free of the
    reference gradient's noise.  ``None`` unless both methods were timed."""
    rows = {r["method"]: r for r in result["rows"]
            if r["threads"] == threads and r["name"].startswith(label + " ")}
    if "rev-rev" not in rows or "fwd-rev" not in rows:
        return None
    q = [f / r for f, r in zip(rows["fwd-rev"]["times"], rows["rev-rev"]["times"])]
    return {"median": _median(q), "min": min(q), "max": max(q),
            "fwd_faster_rounds": sum(x < 1 for x in q), "rounds": len(q)}


def verdict(result: dict) -> str:
    """Per thread count: which method is faster per k (head to head, same rounds), and issue 2's
    targets against the faster method by ratio to a gradient."""
    meta = result["meta"]
    out = []
    labels = ["single HVP"] + [f"block k={k}" for k in meta["ks"]]
    for t in meta["threads"]:
        rows = {r["name"]: r for r in result["rows"] if r["threads"] == t}
        out.append(f"{t} threads:")
        for label in labels:
            pair = {m: rows[f"{label} {m}"] for m in meta["methods"]}
            line = f"  {label}: " + ", ".join(f"{m} {r['ratio']:.2f}x" for m, r in pair.items()) \
                + " a gradient per vector"
            h = head_to_head(result, label, t)
            if h is not None:
                faster = "fwd-rev" if h["median"] < 1 else "rev-rev"
                line += (f"; t(fwd-rev)/t(rev-rev) = {h['median']:.2f} [{h['min']:.2f}-{h['max']:.2f}], "
                         f"fwd-rev faster in {h['fwd_faster_rounds']}/{h['rounds']} rounds: {faster} faster")
            out.append(line)
        for label, target in (("single HVP", 3.5), ("block k=16", 2.0)):
            pair = [rows[f"{label} {m}"] for m in meta["methods"] if f"{label} {m}" in rows]
            if pair:
                best = min(pair, key=lambda r: r["ratio"])
                ok = "met" if best["ratio"] <= target else f"missed by {best['ratio'] / target:.2f}x"
                out.append(f"  target {label} <= {target}x a gradient per vector: "
                           f"{best['ratio']:.2f}x ({best['method']}), {ok}")
    return "\n".join(out)


def _ints(text: str, what: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, e.g. 1,4,16; got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--batch", type=int, default=128, help="images per batch (one data pass)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--ks", default="1,4,16", help="comma-separated block sizes")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated HVP methods")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts, all timed interleaved (default: torch's)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: CURVLAB_DATA or ../shared/data)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count in the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--profile", default=None, metavar="CONFIG",
                   help='instead of timing, profile one configuration, e.g. "block k=4 fwd-rev" '
                        "(with --threads, the first count)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Command-line entry: run, print the markdown table and the verdict, return the results."""
    a = parse_args(argv)
    if a.profile:
        if a.threads:
            torch.set_num_threads(_ints(a.threads, "--threads")[0])
        table = profile_config(a.profile, a.model, a.width, a.batch, _ints(a.ks, "--ks"),
                               [m.strip() for m in a.methods.split(",") if m.strip()], a.data, a.seed)
        print(f"torch.profiler, {a.profile!r}, {a.model} width {a.width}, batch {a.batch}, "
              f"{torch.get_num_threads()} threads:")
        print(table)
        return {"profile": table}
    result = run_benchmark(a.model, a.width, a.batch, a.rounds, _ints(a.ks, "--ks"),
                           [m.strip() for m in a.methods.split(",") if m.strip()],
                           a.data, a.seed, not a.no_flops,
                           _ints(a.threads, "--threads") if a.threads else None)
    m = result["meta"]
    print()
    print(f"CPU {m['cpu']}, torch default {m['default_threads']} threads, {m['date']}, "
          f"load before {[round(x, 2) for x in m['load_before']]}, after {[round(x, 2) for x in m['load_after']]}, "
          f"{m['seconds_total']:.0f} s, peak RSS {m['peak_rss_mib']:.0f} MiB; "
          f"HessianOperator(method='auto') picks {m['auto_method_cpu']!r} here")
    print()
    print(markdown_table(result))
    print()
    print(verdict(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {a.json}")
    return result


if __name__ == "__main__":
    main()
