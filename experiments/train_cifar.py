"""Train a CIFAR ResNet and track both Hessian extremes after every epoch.

After each epoch ``e`` (every ``--extremes-every`` epochs) the script computes
``lambda_max`` and ``lambda_min`` of the Hessian of the training loss

    f(x) = (1/M) sum_{d <= M} cross_entropy(model(x; image_d), label_d)

over the first ``M`` (``--extremes-subset``, default: all) *unaugmented*
training images, with the model in eval mode (BatchNorm running statistics),
by :func:`curvlab.extremes`, warm-started from the previous epoch's
eigenvectors.  The call, its warm start and the fields it logs go through
:class:`curvlab.CurvatureTracker` (its :meth:`~curvlab.CurvatureTracker.compute`
and :func:`curvlab.tracker.result_record`), the path a user's own training
loop takes; this script keeps its own log, which also holds the training
fields and is rewritten from the checkpoint on resume.  Weight decay is not part of ``f``: it would add
``weight_decay`` to every eigenvalue.

Usage (from the repository root)::

    python -m experiments.train_cifar --model resnet20 --epochs 30 --out runs/r20
    python -m experiments.train_cifar --model resnet20 --epochs 30 --out runs/r20 --resume
    python -m experiments.train_cifar --demo          # small CPU run, a few minutes
    python -m experiments.plot runs/r20/log.jsonl --out runs/r20/curves.png

Outputs in ``--out``:

* ``log.jsonl``: one JSON object per finished epoch (keys in :data:`LOG_KEYS`;
  ``null`` where a value does not exist, e.g. the extremes of an epoch where
  they were not computed);
* ``checkpoint.pt``: everything needed to continue (model, optimizer,
  scheduler, every RNG state, the last :class:`curvlab.ExtremesResult` for the
  warm start, the log records); ``--resume`` continues from it;
* ``trace_epoch{e}.json``: the solver's convergence trace of epoch ``e``.

Determinism: model initialisation, shuffling and augmentation draw from
seeded generators whose states are checkpointed, and the log is rewritten from
the checkpoint on resume, so an interrupted and resumed run writes the same
log as an uninterrupted one (apart from the wall-time fields
:data:`TIME_KEYS`), on CPU; on GPU as far as cuDNN's kernels are deterministic.
Both files are written atomically (temporary file, ``fsync``, ``os.replace``)
and the log before the checkpoint, so a kill at any moment loses at most the
epoch in progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import curvlab
from curvlab.tracker import atomic_write, json_safe, result_from_state, result_record, result_to_state

from .cifar import ENV, find_cifar10, load_cifar10, normalize
from .models import MODELS, build_model

__all__ = ["main", "cli", "build_parser", "parse_args", "run", "ConfigError", "augment", "train_epoch", "evaluate", "lr_factor",
           "synthetic_cifar", "load_data", "extremes_record", "read_log", "LOG_KEYS", "TIME_KEYS"]

LOG = "log.jsonl"
CHECKPOINT = "checkpoint.pt"
TRACE = "trace_epoch{}.json"

#: Keys of every log line, in order.
LOG_KEYS = (
    "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "num_train", "num_test",
    "lambda_max", "lambda_min", "interval_max", "interval_min", "error_max", "error_min",
    "converged_max", "converged_min", "hvps", "samples", "passes", "num_hessian", "sample_size",
    "num_params", "warm_start", "cost_epochs_samples",
    "train_seconds", "test_seconds", "extremes_seconds", "cost_epochs_time", "seconds", "time",
)
#: Log keys that hold wall time (differ between otherwise identical runs).
TIME_KEYS = ("train_seconds", "test_seconds", "extremes_seconds", "cost_epochs_time", "seconds", "time")

#: Options that may differ when a run is resumed; all others must match the checkpoint.
RUNTIME_OPTIONS = ("resume", "overwrite", "out", "device", "quiet", "until", "data", "demo", "threads")

#: The ``--demo`` configuration: a small CPU run with the extremes after every epoch.
DEMO = dict(model="resnet20", width=0.25, subset=2000, test_subset=1000, epochs=3, batch_size=128,
            lr=0.05, extremes_every=1, extremes_subset=256, tol=0.05, tol_min=0.1, max_hvps=30,
            out="runs/demo", overwrite=True)


# --------------------------------------------------------------------------- options

def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The command line; ``defaults=False`` gives a parser that returns only the options given."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.train_cifar",
        description="Train a CIFAR ResNet; after every epoch compute the largest and smallest "
                    "Hessian eigenvalue of the training loss with curvlab.extremes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS)

    def arg(group, *names, **kw):
        if not defaults:
            kw.pop("default", None)
        group.add_argument(*names, **kw)

    g = p.add_argument_group("model and data")
    arg(g, "--model", default="resnet20", choices=sorted(MODELS))
    arg(g, "--width", type=float, default=1.0, help="channel multiplier (e.g. 0.25 on CPU)")
    arg(g, "--data", default=None,
                   help=f"cifar-10-batches-py folder or its parent (default: ${ENV}, then ../shared/data)")
    arg(g, "--subset", type=int, default=None, help="train on the first N training images")
    arg(g, "--test-subset", type=int, default=None, help="test on the first N test images")
    g = p.add_argument_group("training")
    arg(g, "--epochs", type=int, default=30)
    arg(g, "--batch-size", type=int, default=128)
    arg(g, "--lr", type=float, default=0.1, help="peak learning rate")
    arg(g, "--momentum", type=float, default=0.9)
    arg(g, "--weight-decay", type=float, default=5e-4)
    arg(g, "--schedule", default="cosine", choices=("cosine", "multistep", "constant"),
                   help="per-epoch learning-rate schedule (see lr_factor)")
    arg(g, "--milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="multistep: fractions of --epochs where the rate is multiplied by --gamma")
    arg(g, "--gamma", type=float, default=0.1)
    arg(g, "--seed", type=int, default=0)
    arg(g, "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g = p.add_argument_group("Hessian extremes (curvlab.extremes)")
    arg(g, "--curvature", default="none", choices=curvlab.CURVATURES,
                   help="curvature approximation whose top eigenvector starts the solver")
    arg(g, "--extremes-every", type=int, default=1, help="compute them after every K-th epoch")
    arg(g, "--extremes-subset", type=int, default=None,
                   help="Hessian of the loss over the first M training images (default: all)")
    arg(g, "--tol", type=float, default=1e-2, help="relative tolerance for lambda_max")
    arg(g, "--tol-min", type=float, default=5e-2, help="relative tolerance for lambda_min")
    arg(g, "--max-hvps", type=float, default=300, help="budget in full-data HVPs per call")
    arg(g, "--max-basis", type=int, default=40, help="Krylov basis size before a restart")
    arg(g, "--sampling", default=None, choices=("auto", "exact", "multilevel"),
                   help="exact or subsampled products (default: the library's, 'auto')")
    arg(g, "--sample-size", type=int, default=None, help="first subsample size (multilevel)")
    arg(g, "--confidence", type=float, default=None, help="level of sampling intervals")
    arg(g, "--approx-samples", type=int, default=None,
        help="samples the curvature approximation is built from (default: the library's)")
    arg(g, "--approx-rank", type=int, default=None,
        help="eigenvectors of the curvature approximation used (default: the library's)")
    arg(g, "--hvp-batch-size", type=int, default=256, help="batch size of the HVP passes")
    g = p.add_argument_group("run")
    arg(g, "--out", default=None, help="output folder (default: runs/MODEL-wWIDTH-seedSEED)")
    arg(g, "--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (starts afresh if there is none)")
    arg(g, "--overwrite", action="store_true", help="replace a run already in --out")
    arg(g, "--until", type=int, default=None,
                   help="stop after this epoch (the schedule still spans --epochs); continue with --resume")
    arg(g, "--quiet", action="store_true", help="no progress bars")
    arg(g, "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's; 1 is often faster on a busy machine)")
    arg(g, "--demo", action="store_true",
                   help="small CPU demo: " + ", ".join(f"{k}={v}" for k, v in DEMO.items())
                        + "; synthetic data when CIFAR-10 is not found")
    return p


def parse_args(argv=None):
    """Parse ``argv``; return ``(args, explicit)``, ``explicit`` the options given on the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--demo" in argv:
        parser.set_defaults(**DEMO)
    args = parser.parse_args(argv)
    explicit = set(vars(build_parser(defaults=False).parse_args(argv)))
    if args.out is None:
        args.out = f"runs/{args.model}-w{args.width:g}-seed{args.seed}"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("epochs", "batch_size", "extremes_every", "hvp_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("subset", "test_subset", "extremes_subset", "until", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args, explicit


def lr_factor(epoch: int, epochs: int, schedule: str, milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """Learning-rate multiplier for epoch ``epoch`` (0-based) of ``epochs``.

    * ``cosine``: ``(1 + cos(pi * epoch / epochs)) / 2``, from 1 down to ``(1 + cos(pi (E-1)/E)) / 2``;
    * ``multistep``: ``gamma ** #{m : epoch >= round(m * epochs)}``;
    * ``constant``: 1.
    """
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return gamma ** sum(epoch >= round(m * epochs) for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be cosine, multistep or constant, got {schedule!r}")


# --------------------------------------------------------------------------- data

def synthetic_cifar(n_train: int, n_test: int, seed: int = 0):
    """CIFAR-shaped stand-in data: ``(Xtr, Ytr, Xte, Yte)``, uint8 ``(N, 3, 32, 32)``, 10 classes.

    Each class has a smooth random colour pattern (8x8, upsampled); an image is
    its class pattern plus pixel noise, so a network can learn it, slowly.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=32, mode="bilinear",
                             align_corners=False)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 128 + 40 * patterns[y] + 50 * torch.randn(n, 3, 32, 32, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    return (*make(n_train), *make(n_test))


def load_data(args, allow_synthetic: bool = False, log=print):
    """``(Xtr, Ytr, Xte, Yte, source)``: uint8 images and int64 labels, first ``subset`` of each.

    Raises the ``FileNotFoundError`` of :func:`experiments.cifar.find_cifar10`
    when CIFAR-10 is not found, unless ``allow_synthetic``: then it says so
    and returns :func:`synthetic_cifar` data (``source == "synthetic"``).
    """
    try:
        root = find_cifar10(args.data)
    except FileNotFoundError as err:
        if not allow_synthetic:
            raise
        log(f"note: {err}\nnote: running on synthetic CIFAR-shaped data instead "
            f"(point --data or {ENV} at cifar-10-batches-py for the real thing)")
        n_train = args.subset or 2000
        n_test = args.test_subset or 1000
        return (*synthetic_cifar(n_train, n_test, seed=12345), "synthetic")
    Xtr, Ytr = load_cifar10(root, train=True, limit=args.subset)
    Xte, Yte = load_cifar10(root, train=False, limit=args.test_subset)
    return Xtr, Ytr, Xte, Yte, str(root)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops and horizontal flips of a batch ``x`` of shape ``(B, C, H, W)``.

    Each image is zero-padded by ``pad`` pixels on every side (zero is the mean
    colour of normalised data), cropped back to ``H x W`` at an offset drawn
    uniformly from ``{0, ..., 2 pad}^2``, and mirrored with probability 1/2.
    The random numbers come from ``generator`` (a CPU generator, so the draws
    do not depend on the device), three draws per batch.
    """
    B, C, H, W = x.shape
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    flip = (torch.rand(B, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]   # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    out = padded[b, c, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# --------------------------------------------------------------------------- training

def _bar(total, desc, enabled, leave=False):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=leave, disable=not enabled, dynamic_ncols=True)


def train_epoch(model, optimizer, X, Y, batch_size: int, generator: torch.Generator,
                progress: bool = False, desc: str = "train"):
    """One epoch of SGD on augmented, reshuffled ``(X, Y)`` (normalised, on the model's device).

    Returns ``(mean loss, accuracy, seconds)`` over the epoch's augmented batches
    (the running statistics of training, not a separate evaluation).
    """
    model.train()
    device = X.device
    N = X.shape[0]
    t0 = time.perf_counter()
    perm = torch.randperm(N, generator=generator).to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = _bar(math.ceil(N / batch_size), desc, progress)
    for i, start in enumerate(range(0, N, batch_size)):
        idx = perm[start:start + batch_size]
        x, y = augment(X[idx], generator), Y[idx]
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(idx)
        correct += (out.argmax(1) == y).sum()
        bar.update(1)
        if progress and i % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    loss, acc = float(loss_sum) / N, int(correct) / N
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss, acc, time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, X, Y, batch_size: int = 500):
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode on ``(X, Y)``; restores the mode."""
    was = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, X.shape[0], batch_size):
        out = model(X[start:start + batch_size])
        y = Y[start:start + batch_size]
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was)
    return loss_sum / X.shape[0], correct / X.shape[0]


# --------------------------------------------------------------------------- extremes, records

def extremes_options(args) -> dict:
    """Keyword arguments for :func:`curvlab.extremes` from the command line.

    ``--sampling``, ``--sample-size``, ``--confidence``, ``--approx-samples``
    and ``--approx-rank`` are passed only when given, so the library's defaults
    apply otherwise.
    """
    opts = dict(tol=args.tol, tol_min=args.tol_min, max_hvps=args.max_hvps, max_basis=args.max_basis,
                curvature=args.curvature, batch_size=args.hvp_batch_size)
    for name in ("sampling", "sample_size", "confidence", "approx_samples", "approx_rank"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    return opts


def extremes_record(result, train_seconds: float, num_train: int) -> dict:
    """The log fields of one :class:`curvlab.ExtremesResult` (see :data:`LOG_KEYS`).

    ``cost_epochs_time`` is the solve's wall time over the epoch's training
    time; ``cost_epochs_samples`` is per-sample HVP evaluations over the
    ``num_train`` per-sample gradient evaluations of a training epoch (one HVP
    evaluation costs about 2-3 gradient evaluations).
    """
    r = result_record(result)  # the fields a CurvatureTracker logs
    shared = ("lambda_max", "lambda_min", "interval_max", "interval_min", "error_max", "error_min",
              "converged_max", "converged_min", "hvps", "samples", "passes")
    return dict(
        {k: r[k] for k in shared}, num_hessian=r["num_samples"], sample_size=r["sample_size"],
        num_params=r["num_params"], warm_start=r["warm_start"],
        cost_epochs_samples=r["samples"] / num_train,
        extremes_seconds=r["seconds"],
        cost_epochs_time=r["seconds"] / train_seconds if train_seconds > 0 else None,
    )


def _result_to_state(result) -> dict:
    """An :class:`curvlab.ExtremesResult` as plain data (``torch.load(weights_only=True)``-safe)."""
    return result_to_state(result)


def _result_from_state(state: dict, device) -> "curvlab.ExtremesResult":
    return result_from_state(state, device)


# --------------------------------------------------------------------------- files

def write_log(path: Path, records) -> None:
    """Rewrite the JSONL log at ``path`` atomically with ``records`` (one line each)."""
    text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_log(path) -> list:
    """The records of a JSONL log (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return dict(
        generator=generator.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=(np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        python=random.getstate(),
    )


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    s = state["numpy"]
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


class ConfigError(ValueError):
    """Options that cannot work together (reported without a traceback by :func:`cli`)."""


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_OPTIONS}


def _check_resume_config(saved: dict, args, explicit: set) -> None:
    """Adopt the checkpoint's options; an explicit option that contradicts one is an error."""
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {saved[k]!r})"
             for k in sorted(explicit) if k in saved and saved[k] != getattr(args, k)]
    if clash:
        raise ConfigError(
            "cannot resume with options that differ from the checkpoint's: " + "; ".join(clash)
            + ". Drop them to continue the run as it was, or start a new run in another --out.")
    for k, v in saved.items():
        setattr(args, k, v)


# --------------------------------------------------------------------------- the run

def run(args, explicit=frozenset(), log=print) -> list:
    """Train as ``args`` says; return the log records (also in ``args.out/log.jsonl``)."""
    out = Path(args.out)
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    ckpt = None
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resume_config(ckpt["config"], args, explicit)
    elif not args.resume and (ckpt_path.exists() or log_path.exists()):
        if not args.overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({CHECKPOINT} or {LOG}): pass --resume to continue it, "
                "--overwrite to start it again, or choose another --out")
    elif args.resume:
        log(f"no checkpoint in {out}: starting a new run")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allow_synth = bool(args.demo)
    Xtr, Ytr, Xte, Yte, source = load_data(args, allow_synthetic=allow_synth, log=log)
    N = Xtr.shape[0]
    M = N if args.extremes_subset is None else args.extremes_subset
    if M > N:
        raise ConfigError(f"--extremes-subset {M} exceeds the {N} training images; use at most {N}")
    device = torch.device(args.device)
    Xtr, Xte = normalize(Xtr).to(device), normalize(Xte).to(device)
    Ytr, Yte = Ytr.to(device), Yte.to(device)
    hess_data = (Xtr[:M], Ytr[:M])
    if ckpt is None:  # a new run: remove what an overwritten one left
        for f in [ckpt_path, log_path, *out.glob(TRACE.format("*"))]:
            f.unlink(missing_ok=True)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.model, args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, args.epochs, args.schedule, args.milestones, args.gamma))

    start, records, previous = 0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], generator)
        start, records = ckpt["epoch"], ckpt["records"]
        if ckpt["extremes"] is not None:
            previous = _result_from_state(ckpt["extremes"], device)
        for f in out.glob(TRACE.format("*")):  # traces of epochs the checkpoint does not have
            if int(f.stem.removeprefix("trace_epoch")) > start:
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_log(log_path, records)  # truncates lines beyond the checkpoint (a kill after the log write)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stop = min(args.epochs, args.until or args.epochs)
    log(f"{args.model} width {args.width:g} ({n_params:,} parameters) on {device}; data {source}: "
        f"{N} train / {Xte.shape[0]} test images, Hessian on {M}; epochs {start + 1}..{stop} of "
        f"{args.epochs}; out {out}")
    if start >= stop:
        log(f"nothing to do: the run in {out} has finished epoch {start}")
        return records
    progress = not args.quiet
    from tqdm.auto import tqdm
    outer = tqdm(total=stop - start, desc="epochs", unit="epoch", disable=not progress, dynamic_ncols=True)
    # the library's tracker makes the warm-started call (its own log and state file are off:
    # this script's log holds the training fields too, and its checkpoint the last result)
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, hess_data, log=None, state=None,
                                       seed=args.seed, progress=progress, **extremes_options(args))
    tracker.result = previous
    for epoch in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, train_s = train_epoch(model, optimizer, Xtr, Ytr, args.batch_size, generator,
                                                     progress, desc=f"epoch {epoch}/{args.epochs}")
        scheduler.step()
        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(model, Xte, Yte)
        test_s = time.perf_counter() - t1
        rec = dict.fromkeys(LOG_KEYS)
        rec.update(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                   test_acc=test_acc, num_train=N, num_test=Xte.shape[0], train_seconds=train_s,
                   test_seconds=test_s)
        if epoch % args.extremes_every == 0:
            result = tracker.compute(epoch)  # init = the previous result, seed = args.seed + epoch
            rec.update(extremes_record(result, train_s, N))
            trace = dict(epoch=epoch, lambda_max=result.lambda_max, lambda_min=result.lambda_min,
                         interval_max=result.interval_max, interval_min=result.interval_min,
                         cost=dataclasses.asdict(result.cost), options=result.options,
                         levels=getattr(result, "levels", []), history=result.history)
            text = json.dumps(json_safe(trace), allow_nan=False, indent=1)
            atomic_write(out / TRACE.format(epoch), lambda f: f.write(text.encode()))
            previous = result
        rec.update(seconds=time.perf_counter() - t0, time=_dt.datetime.now().isoformat(timespec="seconds"))
        records = records + [json_safe(rec)]
        write_log(log_path, records)  # the log first: a kill before the checkpoint re-runs this epoch
        state = dict(epoch=epoch, config=_config(args), model=model.state_dict(),
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     rng=_rng_state(generator), records=records,
                     extremes=None if previous is None else _result_to_state(previous))
        atomic_write(ckpt_path, lambda f: torch.save(state, f))
        outer.update(1)
        (outer.write if progress else log)(_summary(rec, args.epochs))
    outer.close()
    return records


def _summary(r: dict, epochs: int) -> str:
    s = (f"epoch {r['epoch']}/{epochs}  lr {r['lr']:.4g}  loss {r['train_loss']:.4f}  "
         f"train {100 * r['train_acc']:.1f}%  test {100 * r['test_acc']:.1f}%")
    if r["lambda_max"] is not None or r["lambda_min"] is not None:
        def iv(a):
            return "[" + ", ".join("nan" if v is None else f"{v:.4g}" for v in a) + "]"
        lmax = "nan" if r["lambda_max"] is None else f"{r['lambda_max']:.4g}"
        lmin = "nan" if r["lambda_min"] is None else f"{r['lambda_min']:.4g}"
        s += (f"  lambda_max {lmax} {iv(r['interval_max'])}  lambda_min {lmin} {iv(r['interval_min'])}"
              f"  {r['hvps']:.1f} hvps {r['extremes_seconds']:.1f}s"
              + (f" = {r['cost_epochs_time']:.2f} epochs" if r["cost_epochs_time"] is not None else ""))
    return s


def main(argv=None) -> int:
    """Command-line entry point; returns 0 (errors raise, see :func:`cli`)."""
    args, explicit = parse_args(argv)
    run(args, explicit)
    return 0


def cli(argv=None) -> int:
    """:func:`main` with a missing data folder, a clashing resume or an occupied ``--out``
    reported as one line on stderr and exit status 2 instead of a traceback."""
    try:
        return main(argv)
    except (FileNotFoundError, FileExistsError, ConfigError) as err:
        print(f"train_cifar: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
