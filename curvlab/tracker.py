"""A drop-in tracker of the Hessian extremes for one's own training loop.

::

    tracker = curvlab.CurvatureTracker(model, torch.nn.functional.cross_entropy, (X, Y),
                                       log="runs/x/curvature.jsonl", tol=1e-2)
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, optimizer)
        tracker.step(epoch)                 # extremes now, warm-started, one JSON line
    tracker.plot("runs/x/curvature.png")

Each :meth:`CurvatureTracker.step` calls :func:`curvlab.extremes` at the model's
current parameters with ``init=`` the previous step's result (a warm start:
its eigenvectors start the solver, its subsample size the sampling) and
``seed = seed + epoch``, appends one JSON line to ``log`` (keys
:data:`RECORD_KEYS`, then any extra fields passed to ``step``; ``null`` for a
value that does not exist, such as the open outward side of an interval that
did not converge or an end not asked for) and saves the result to the state
file (``curvature.state.pt`` beside ``curvature.jsonl``).

Nothing is lost on interruption: the line is appended with one write,
``flush`` and ``fsync``, then the state file is replaced atomically
(temporary file, ``fsync``, ``os.replace``).  A tracker created on an existing
log keeps its records and appends to it (a torn last line, from a kill in
mid-write, is dropped with a warning), and one created on an existing state
file warm-starts from the result saved there; so a resumed training script
only has to create its tracker again.  Pass ``epoch`` to ``step`` when
training resumes from a checkpoint older than the log's last line (then the
log holds those epochs twice, in the order they were computed; a warning
says so).

:func:`curvlab.extremes` options go through the tracker unchanged (``tol``,
``which``, ``max_hvps``, ``curvature``, ``batch_size``, ...), except ``init``
and ``seed``, which the tracker owns.  Under ``torch.distributed`` every rank
computes (the products are all-reduced) and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from .extremes import CostRecord, ExtremesResult, extremes

__all__ = ["CurvatureTracker", "RECORD_KEYS", "result_record", "result_to_state", "result_from_state",
           "read_log", "plot_log"]

#: Keys of every tracker log line, in order (extra fields passed to ``step`` follow).
RECORD_KEYS = (
    "epoch", "lambda_max", "lambda_min", "interval_max", "interval_min", "error_max", "error_min",
    "converged_max", "converged_min", "warm_start", "hvps", "samples", "passes", "products",
    "seconds", "num_samples", "sample_size", "num_params", "time",
)


def json_safe(obj):
    """JSON-safe copy: non-finite floats become ``None``, tuples lists, tensors lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj


def result_record(result: ExtremesResult) -> dict:
    """The log fields of one result, JSON-ready (keys :data:`RECORD_KEYS` but ``epoch`` and ``time``).

    ``interval_*`` are ``[low, high]`` lists with an open (infinite) side as ``None``;
    ``hvps``, ``samples``, ``passes``, ``products`` and ``seconds`` are those of
    :class:`curvlab.CostRecord`; ``num_samples`` is ``N``, the samples of the loss.
    """
    c = result.cost
    return json_safe(dict(
        lambda_max=result.lambda_max, lambda_min=result.lambda_min,
        interval_max=list(result.interval_max), interval_min=list(result.interval_min),
        error_max=result.lambda_max_error, error_min=result.lambda_min_error,
        converged_max=bool(result.converged_max), converged_min=bool(result.converged_min),
        warm_start=bool(result.options.get("warm_start", False)),
        hvps=c.hvps, samples=c.samples, passes=c.passes, products=c.products, seconds=c.seconds,
        num_samples=result.num_samples, sample_size=getattr(result, "sample_size", result.num_samples),
        num_params=result.num_params,
    ))


def result_to_state(result: ExtremesResult) -> dict:
    """A result as plain data that ``torch.load(..., weights_only=True)`` reads back (vectors on CPU)."""
    state = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if hasattr(result, f.name)}
    state["cost"] = dataclasses.asdict(result.cost)
    for k in ("vector_max", "vector_min"):
        if state[k] is not None:
            state[k] = state[k].detach().cpu()
    # (a result pickled before the field existed has none)
    state["guard_vectors"] = {e: v.detach().cpu() for e, v in getattr(result, "guard_vectors", {}).items()}
    return state


def result_from_state(state: dict, device=None) -> ExtremesResult:
    """The inverse of :func:`result_to_state`; vectors moved to ``device`` (if given)."""
    state = dict(state, cost=CostRecord(**state["cost"]))
    for k in ("vector_max", "vector_min"):
        if state.get(k) is not None and device is not None:
            state[k] = state[k].to(device)
    if device is not None and state.get("guard_vectors"):
        state["guard_vectors"] = {e: v.to(device) for e, v in state["guard_vectors"].items()}
    for k in ("interval_max", "interval_min"):
        if isinstance(state.get(k), list):
            state[k] = tuple(state[k])
    return ExtremesResult(**state)


def read_log(path) -> List[dict]:
    """The records of a JSONL log, in file order (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _repair_log(path: Path) -> None:
    """Drop a torn last line (no newline: a kill in mid-append), atomically."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data[:data.rfind(b"\n") + 1]
    warnings.warn(f"{path}: dropping an incomplete last line ({len(data) - len(keep)} bytes), "
                  "left by an interrupted write", RuntimeWarning, stacklevel=3)
    atomic_write(path, lambda f: f.write(keep))


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, then ``os.replace``
    (a reader sees the old file or the new one, never a part)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _from_writer(read):
    """``read()`` on rank 0 of a torch.distributed job, its value broadcast to every rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return read()
    box = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class CurvatureTracker:
    """Track ``lambda_max`` and ``lambda_min`` of the training loss's Hessian across epochs.

    Args:
        model: the network being trained (read only; see :func:`curvlab.extremes`).
        loss_fn: ``loss_fn(output, target) -> scalar`` batch-mean loss.
        data: the data the Hessian is over (anything :func:`curvlab.extremes`
            takes); it must give the same samples on every pass, so pass
            unaugmented data, not the training loader with random augmentation.
        log: path of the JSONL log (parent folders are created); ``None``: no
            file, the records are only kept in :attr:`records`.
        state: path of the warm-start state file; ``"auto"`` (default):
            ``<log without .jsonl>.state.pt`` beside the log (none without a log);
            ``None``: no state file.
        every: compute at epochs that are multiples of ``every`` only; other
            calls to :meth:`step` return ``None`` and write nothing.
        seed: the call at ``epoch`` uses ``seed + epoch``.
        **options: keyword arguments of :func:`curvlab.extremes` (not ``init``
            or ``seed``).

    Attributes:
        result: the last :class:`~curvlab.ExtremesResult` (the next warm start), or ``None``.
        records: the log records, those found in an existing log first.
        epoch: the last epoch stepped (the log's last one when resuming; 0 at first).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, log=None, state="auto",
                 every: int = 1, seed: int = 0, **options):
        if "init" in options:
            raise TypeError("CurvatureTracker warm-starts each call from the previous one itself: "
                            "do not pass init= (set tracker.result to start from a given result)")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.seed, self.options = every, seed, options
        self.log = None if log is None else Path(log)
        if state == "auto":
            state = None if self.log is None else self.log.with_name(
                self.log.name.removesuffix(".jsonl") + ".state.pt")
        self.state = None if state is None else Path(state)
        self.result: Optional[ExtremesResult] = None
        self.records: List[dict] = []
        self.epoch = 0
        # rank 0 reads (and repairs) the files and every rank gets what it read: ranks that
        # started from different logs or states would run different solves and collectives
        self.records, self.epoch, payload = _from_writer(self._read_files)
        if payload is not None:
            self._use_state(payload)

    def _read_files(self):
        """``(records, epoch, state payload or None)`` from the log and the state file."""
        records, epoch, payload = [], 0, None
        if self.log is not None and self.log.exists():
            _repair_log(self.log)
            records = read_log(self.log)
            epoch = max((r.get("epoch") or 0 for r in records), default=0)
        if self.state is not None and self.state.exists():
            try:
                payload = torch.load(self.state, map_location="cpu", weights_only=True)
            except Exception as exc:  # an unreadable state costs a cold start, not the run
                warnings.warn(f"{self.state}: cannot warm-start from it ({type(exc).__name__}: "
                              f"{exc}); the next step starts cold", RuntimeWarning, stacklevel=4)
        return records, epoch, payload

    # -- the core: one warm-started call -----------------------------------------
    def compute(self, epoch: int) -> ExtremesResult:
        """:func:`curvlab.extremes` now, ``init=`` :attr:`result`, ``seed = seed + epoch``; no file written.

        Sets :attr:`result` (the next call's warm start) and returns it.
        """
        self.result = extremes(self.model, self.loss_fn, self.data, init=self.result,
                               seed=self.seed + epoch, **self.options)
        return self.result

    def step(self, epoch: int | None = None, **extra) -> Optional[ExtremesResult]:
        """Compute the extremes for ``epoch`` (default: the last one + 1), log and save them.

        ``extra`` fields (JSON-able, e.g. ``train_loss=...``) are added to the
        line after :data:`RECORD_KEYS`.  Returns the result, or ``None`` for an
        epoch that is not a multiple of ``every``.
        """
        epoch = self.epoch + 1 if epoch is None else epoch
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        clash = sorted(set(extra) & set(RECORD_KEYS))
        if clash:
            raise ValueError(f"extra fields {clash} would overwrite the tracker's own: rename them")
        if epoch <= self.epoch and any(r.get("epoch") == epoch for r in self.records):
            warnings.warn(f"epoch {epoch} is already in the log (last epoch {self.epoch}): it will "
                          "appear twice; pass the epoch your training resumed at", RuntimeWarning,
                          stacklevel=2)
        self.epoch = epoch
        if epoch % self.every != 0:
            return None
        result = self.compute(epoch)
        record = {"epoch": epoch, **result_record(result),
                  "time": _dt.datetime.now().isoformat(timespec="seconds"), **json_safe(extra)}
        record = {k: record[k] for k in (*RECORD_KEYS, *extra)}
        if _is_writer():
            if self.log is not None:
                self._append(record)  # the line first: a kill before the state costs only a warm start
            if self.state is not None:
                self._save_state(epoch)
        self.records.append(record)
        return result

    __call__ = step

    def plot(self, path, title: str | None = None) -> Path:
        """Draw ``lambda_max`` and ``lambda_min`` with their interval bands per epoch (PNG)."""
        return plot_log(self.records, path, title=title)

    # -- files ------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with open(self.log, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _save_state(self, epoch: int) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(epoch=epoch, result=result_to_state(self.result))
        atomic_write(self.state, lambda f: torch.save(payload, f))

    def _use_state(self, payload: dict) -> None:
        try:
            device = self.options.get("device") or next(
                (p.device for p in self.model.parameters() if p.requires_grad), None)
            self.result = result_from_state(payload["result"], device)
        except Exception as exc:  # an unusable state costs a cold start, not the run
            warnings.warn(f"{self.state}: cannot warm-start from it ({type(exc).__name__}: {exc}); "
                          "the next step starts cold", RuntimeWarning, stacklevel=3)
            return
        self.epoch = max(self.epoch, int(payload.get("epoch", 0)))


def draw_extremes(ax_max, ax_min, records) -> None:
    """Draw ``lambda_max`` and ``lambda_min`` of ``records`` against the epoch on two axes.

    Each with its interval as a band (an open side draws no band) and a hollow marker
    where the solve did not converge; ``lambda_min``'s axis marks zero.
    """
    def num(v):
        return math.nan if v is None else float(v)

    for ax, end, colour in ((ax_max, "max", "tab:red"), (ax_min, "min", "tab:blue")):
        rows = [r for r in records if r.get(f"lambda_{end}") is not None]
        if rows:
            e = [r["epoch"] for r in rows]
            y = [num(r[f"lambda_{end}"]) for r in rows]
            lo = [num((r.get(f"interval_{end}") or [None, None])[0]) for r in rows]
            hi = [num((r.get(f"interval_{end}") or [None, None])[1]) for r in rows]
            ax.fill_between(e, lo, hi, color=colour, alpha=0.25, lw=0, label="interval")
            ax.plot(e, y, color=colour, marker="o", ms=4, label=f"lambda_{end}")
            bad = [(a, b) for a, b, r in zip(e, y, rows) if r.get(f"converged_{end}") is False]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="o", ms=8, mfc="white", mec=colour,
                        label="not converged")
            ax.legend(loc="best", fontsize=8)
        if end == "min":
            ax.axhline(0.0, color="grey", ls=":", lw=1)
        ax.set_ylabel(f"lambda_{end}")
        ax.grid(alpha=0.3)


def plot_log(records, path, title: str | None = None) -> Path:
    """Plot tracker records (a list, or the path of a JSONL log) into the PNG ``path``.

    Two panels against the epoch: ``lambda_max`` and ``lambda_min``, each with
    its interval as a band (an open side draws no band) and a hollow marker
    where the solve did not converge.  Needs matplotlib (``pip install matplotlib``).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib "
                          "(or pip install 'curvlab[plot]')") from exc
    if isinstance(records, (str, os.PathLike)):
        records = read_log(records)
    if not records:
        raise ValueError("no records to plot: step the tracker at least once")

    fig = Figure(figsize=(7, 6))
    axes = fig.subplots(2, 1, sharex=True)
    draw_extremes(axes[0], axes[1], records)
    axes[0].set_title(title or "Hessian extremes per epoch")
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
