"""Data-parallel Hessian products on ``torch.distributed``.

Inside a ``torchrun`` job (or any job that called
``torch.distributed.init_process_group``) with more than one process, every
:class:`~curvlab.hvp.HessianOperator` splits the data over the ranks: each
rank passes over its *shard* only and the partial sums are all-reduced, so that
every rank holds the identical full-data result.  For a Hessian block

    H V = (1/N) sum_r S_r,    S_r = sum_{b in shard r} n_b H_b V,

where ``H_b`` is the Hessian of batch ``b``'s mean loss and ``n_b`` its size:
the unnormalised sums ``S_r`` are all-reduced and divided *once* by the global
sample count ``N`` (itself all-reduced at construction), so uneven shards and
uneven batches are weighted exactly as in one process.  ``loss_and_gradient``
is reduced the same way; per-sample values (``per_sample_curvature``) are
gathered so that every rank holds all ``N`` of them in the data's global order.

Because an all-reduce hands the *same* bits to every rank, and the solver's
random start vectors come from a seeded CPU generator, the solver
(:mod:`curvlab.lanczos`) and the policy above it run identically on all ranks:
they take the same branches and return the same result, with no further
communication.  Only the data passes are divided; the dense solver work
(orthogonalisation, the small projected eigenproblems) is replicated.

Sharding.  Every rank is given the **full** data; curvlab keeps its part, so
that every sample is used exactly once (no padding duplicates, unlike
``DistributedSampler``'s default):

* ``(X, Y)`` tensors / :class:`~curvlab.data.TensorBatches`: contiguous
  sample ranges, sizes ``N // W`` or ``N // W + 1`` (``scheme="contiguous"``;
  :func:`shard` also offers ``"strided"``: samples ``r, r + W, ...``); each
  shard is then cut into ``batch_size`` batches;
* a ``DataLoader`` or another iterable of batches: round-robin by batch index,
  rank ``r`` takes batches ``r, r + W, r + 2W, ...``.  A DataLoader over a
  map-style dataset gets a batch sampler holding only the rank's batches, so a
  rank loads only its own samples; other iterables are read and the other
  ranks' batches skipped.  The batch order must be the same on every rank
  (``shuffle=False``; checked).

Data that is already this rank's shard (a DataLoader with a
``DistributedSampler``, detected automatically, or any data wrapped in
:func:`presharded`) is used as it is and only the reductions happen.
``DistributedSampler`` pads the data with repeated samples when ``W`` does not
divide ``N`` (``drop_last=False``) or drops the tail (``drop_last=True``):
either changes the loss, so curvlab refuses such a sampler; pass the full data
instead.  ``distributed=False`` on the operator turns all of this off (each
process then works alone on the data it was given).

Failures.  Each rank's local work runs inside ``try``; its outcome travels
with the data (an error flag per rank appended to the all-reduced buffer), so
a rank that raises does not leave the others waiting in a collective: the
failing rank re-raises its own exception and every other rank raises
``RuntimeError("curvlab: rank k failed: <message>")``.  A rank that dies
outright (killed, out of memory) cannot report; the others then fail when the
backend notices: at once for gloo when the peer's connection closes,
otherwise after the process group's ``timeout`` (see :func:`init_from_env`).

Costs.  An operator's ``cost.hvps``, ``samples``, ``passes`` and
``grad_samples`` count the work of all ranks together (the same numbers on
every rank, equal to one process's on the full data); ``cost.forward_samples``
(the loss check, run by each rank on its own first batch) and
``cost.load_passes`` (a pass that only counts the rank's shard) are this
rank's own and may differ between ranks; ``seconds`` is this rank's wall time.
:func:`curvlab.extremes`'s ``CostRecord`` sums its operators' costs, so the
same holds for its fields.

Backends.  gloo reduces CPU tensors (products computed on a GPU are copied to
the CPU for it); NCCL reduces tensors on the rank's own GPU, so each process
must use a different device: ``torch.cuda.set_device(local_rank)`` and keep
the model there (:func:`init_from_env` does both).

Example (``torchrun --nproc_per_node=2 script.py``)::

    import torch, curvlab
    from curvlab.distributed import init_from_env
    info = init_from_env()                       # rank, world_size, device
    model = build_model().to(info.device)        # the same weights on every rank
    r = curvlab.extremes(model, loss_fn, (X, Y), progress=info.rank == 0)
    if info.rank == 0:
        print(r.lambda_max, r.lambda_min)        # identical on every rank
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .data import Batches
from .sharding import (SCHEMES, PreSharded, Shard, global_positions,  # noqa: F401 (public here too)
                       presharded, shard)

__all__ = ["DataParallel", "DistInfo", "PreSharded", "Shard", "SCHEMES", "global_positions",
           "init_from_env", "is_distributed", "presharded", "shard"]

ERROR_BYTES = 2048  # a failing rank's message is sent in this many bytes (longer ones are cut)


def _dist():
    import torch.distributed as dist
    return dist


def is_distributed(process_group=None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    dist = _dist()
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


# -- process-group set-up -----------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global ``rank``, ``world_size``,
    ``local_rank`` (index on its node) and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_from_env(backend: str | None = None, timeout: timedelta | float = 300.0) -> DistInfo:
    """Initialise the default process group from ``torchrun``'s environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (``torchrun`` sets them); picks NCCL when CUDA is available
    and gloo otherwise; on CUDA, calls ``torch.cuda.set_device(local_rank)``
    first (NCCL needs each rank on its own GPU).  Does nothing but report when
    the group is already initialised.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (automatic, as above).
        timeout: seconds (or a ``timedelta``) a collective may wait for the
            other ranks before it fails.  This bounds how long the job hangs
            when a rank dies without reporting (curvlab reports ordinary
            exceptions itself, at once).  It must exceed the longest stretch of
            work between two collectives, i.e. one data pass of one rank's
            shard (plus start-up); the torch defaults are 10 min (NCCL) and
            30 min (gloo).  With NCCL a timed-out collective makes the watchdog
            abort the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).

    Returns:
        :class:`DistInfo`.
    """
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available here: use backend='gloo'")
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"environment variables {missing} are not set: start the script with "
                "torchrun (e.g. torchrun --nproc_per_node=2 script.py), or call "
                "torch.distributed.init_process_group yourself")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, backend=str(dist.get_backend()))


# -- shards ---------------------------------------------------------------------------

class DataParallel:
    """The data of one operator, split over the ranks, and the reductions over them.

    :class:`~curvlab.hvp.HessianOperator` makes one; its loops run over
    :attr:`local` and end in :meth:`sum_` or :meth:`gather`.  In a single
    process (or with ``enabled=False``) :attr:`local` is all the data and both
    just run the local function.

    Args:
        batches: the full data (or a :class:`PreSharded` shard).
        enabled: ``None``: distributed when :func:`is_distributed`; ``True``:
            require an initialised process group (even of one process);
            ``False``: never communicate.
        process_group: the group to reduce over (default: the whole job).
        fmodel: the model view; its device is the compute device, and its
            parameters and buffers are checked to agree across ranks.
        scheme: how :class:`~curvlab.data.TensorBatches` are split (:func:`shard`).

    Attributes:
        batches: the data as everything but the reductions should see it: the
            full data, or a :class:`PreSharded` (which refuses to be read) when
            this rank holds only its shard.
        rank, world_size: within ``process_group`` (``0`` and ``1`` when not distributed).
        num_samples: ``N``, over all ranks.
        local_counts: samples per rank.
        local: this rank's :class:`~curvlab.data.Batches`.

    Cost at construction: one pass over the rank's shard when its size is not
    known upfront (the operator's ``cost.load_passes``, this rank's own), and
    one small all-gather.
    """

    def __init__(self, batches: Batches, *, enabled: bool | None = None, process_group=None,
                 fmodel=None, scheme: str = "contiguous"):
        if enabled not in (None, True, False):
            raise TypeError(f"distributed must be None, True or False, got {enabled!r}")
        dist = _dist()
        ready = dist.is_available() and dist.is_initialized()
        if enabled is True and not ready:
            raise ValueError(
                "distributed=True needs an initialised process group: call "
                "torch.distributed.init_process_group (or curvlab.distributed.init_from_env()) "
                "first, or leave distributed=None to run in one process")
        if enabled is None:
            enabled = ready and dist.get_world_size(process_group) > 1
        self.enabled = bool(enabled)
        self.group = process_group
        self.device = fmodel.device if fmodel is not None else torch.device("cpu")
        self.scheme = self._split_scheme = scheme
        if self.enabled:
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
            self.comm_device = _comm_device(dist.get_backend(process_group), self.device)
        self._split(batches, fmodel, check=True)

    def subset(self, index: Tensor) -> "DataParallel":
        """The same split applied to the samples at ``index`` of :attr:`batches`.

        Sharding is decided once per call: the subsample and holdout operators
        of :func:`curvlab.extremes` are subsets of the call's data, split with
        this object's ranks, group and scheme.  The agreement checks (same data
        size, batch order and weights on every rank) are not repeated; one
        all-gather of the sample counts remains, which also checks that
        ``index`` is the same on every rank (positions drawn from a seeded
        generator are).
        """
        index = torch.as_tensor(index)
        return self.derive(lambda: self.batches.subset(index), checksum=float(
            (index.double() * torch.arange(1, index.numel() + 1, dtype=torch.float64)).sum()))

    def derive(self, make_batches: Callable[[], Batches], checksum: float = 0.0) -> "DataParallel":
        """A :class:`DataParallel` over ``make_batches()`` (other data of the same call: a
        subset, the first batches an approximation keeps), split with this object's ranks,
        group and scheme, without the agreement checks.  ``make_batches`` runs on every
        rank inside the failure protocol (an error on one rank is raised on all);
        ``checksum`` must agree across ranks."""
        child = object.__new__(DataParallel)
        child.enabled, child.group, child.device = self.enabled, self.group, self.device
        child.scheme = child._split_scheme = self._split_scheme
        if self.enabled:
            child.rank, child.world_size, child.comm_device = self.rank, self.world_size, self.comm_device
        child._split(make_batches, None, check=False, checksum=checksum)
        return child

    def _split(self, batches, fmodel, check: bool, checksum: float = 0.0) -> None:
        """Set :attr:`local`, :attr:`batches` and the counts; ``check``: compare data and
        weights across ranks (module docstring).  ``batches`` may be a function making them."""
        if not self.enabled:
            batches = batches() if callable(batches) else batches
            self.rank, self.world_size, self.scheme = 0, 1, "contiguous"
            self.local = batches.part if isinstance(batches, PreSharded) else batches
            self.batches = self.local
            self.local.check_nonempty()
            self.num_samples = self.local.num_samples
            self.local_counts = [self.num_samples]
            return
        part, error, count = None, None, 0
        try:
            batches = batches() if callable(batches) else batches
            part = shard(batches, self.rank, self.world_size, self._split_scheme)
            count = part.local.num_samples
        except Exception as exc:  # reported to all ranks below
            error = exc
        row = [float(error is not None), float(count), checksum]
        if check:
            fp = _fingerprint(fmodel) if fmodel is not None else [0.0] * 4
            row += [float(part.size_hint if part else -1), float(part.checksum if part else 0), *fp]
        table = self._all_gather_rows(torch.tensor(row, dtype=torch.float64))
        self._raise_if_failed(table[:, 0], error)
        if (table[:, 2] != table[0, 2]).any():
            raise ValueError("the ranks asked for different subsets of the data: the positions must "
                             "be the same on every rank (draw them from a generator seeded alike)")
        if check:
            self._check_agreement(table[:, [0, 1] + list(range(3, table.shape[1]))], part.scheme)
        self.local, self.scheme = part.local, part.scheme
        self.batches = batches
        if part.scheme == "presharded" and not isinstance(batches, PreSharded):
            self.batches = PreSharded(batches)  # a DataLoader with a DistributedSampler
        self.local_counts = [int(c) for c in table[:, 1].tolist()]
        self.num_samples = sum(self.local_counts)
        if self.num_samples == 0:
            raise ValueError("data is empty: it yielded no samples on any rank; pass at least one (x, y) batch")

    # -- collectives --------------------------------------------------------------
    def sum_(self, fn: Callable[[], None], *outputs: Tensor) -> None:
        """Run ``fn()``, which adds this rank's part into ``outputs``; then sum over ranks.

        ``outputs`` are zero tensors of the same shapes on every rank; they are
        summed in place (one all-reduce of one buffer that also carries each
        rank's error flag, so a failure costs no extra round trip).
        """
        if not self.enabled:
            fn()
            return
        error = None
        try:
            fn()
        except Exception as exc:
            error = exc
            for out in outputs:
                out.zero_()
        dtype = outputs[0].dtype
        for out in outputs[1:]:
            dtype = torch.promote_types(dtype, out.dtype)
        flags = torch.zeros(self.world_size, dtype=dtype, device=self.comm_device)
        flags[self.rank] = float(error is not None)
        buf = torch.cat([o.detach().reshape(-1).to(self.comm_device, dtype) for o in outputs] + [flags])
        _dist().all_reduce(buf, group=self.group)
        self._raise_if_failed(buf[-self.world_size:], error)
        start = 0
        for out in outputs:
            out.copy_(buf[start:start + out.numel()].view(out.shape))
            start += out.numel()

    def gather(self, fn: Callable[[], List[Tensor]], dtype: torch.dtype) -> Tensor:
        """Per-sample values of all ranks, ``(N,)`` in the global sample order.

        ``fn()`` returns this rank's values as a list of 1-d tensors, one per
        local batch, in pass order.  Three all-gathers: a header (error flag,
        number of batches and of samples), the batch sizes, and the values (each
        padded to the longest rank's length).
        """
        if not self.enabled:
            parts = fn()
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)
        error, parts = None, []
        try:
            parts = [p.detach().reshape(-1) for p in fn()]
        except Exception as exc:
            error, parts = exc, []
        sizes = [p.numel() for p in parts]
        header = torch.tensor([float(error is not None), len(sizes), sum(sizes)], dtype=torch.float64)
        table = self._all_gather_rows(header)
        self._raise_if_failed(table[:, 0], error)
        nb = [int(v) for v in table[:, 1].tolist()]
        ns = [int(v) for v in table[:, 2].tolist()]
        size_row = torch.full((max(max(nb), 1),), -1, dtype=torch.long)
        size_row[:len(sizes)] = torch.tensor(sizes, dtype=torch.long)
        size_table = self._all_gather_rows(size_row)
        all_sizes = [size_table[r, :nb[r]].tolist() for r in range(self.world_size)]
        values = torch.zeros(max(max(ns), 1), dtype=dtype, device=self.comm_device)
        if parts:
            values[:sum(sizes)] = torch.cat(parts).to(self.comm_device, dtype)
        value_table = self._all_gather_rows(values)
        out = torch.empty(sum(ns), dtype=dtype, device=self.comm_device)
        for r, pos in enumerate(global_positions(self.scheme, all_sizes)):
            out[pos.to(self.comm_device)] = value_table[r, :ns[r]]
        return out.to(self.device)

    def _all_gather_rows(self, row: Tensor) -> Tensor:
        """``(W, len(row))`` on the collective device: every rank's ``row`` (same length on all)."""
        row = row.to(self.comm_device)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        _dist().all_gather(rows, row, group=self.group)
        return torch.stack(rows)

    def _raise_if_failed(self, flags: Tensor, error: Optional[BaseException]) -> None:
        """All ranks call this with the same ``flags`` (one per rank, nonzero = failed)."""
        failed = [r for r, f in enumerate(flags.tolist()) if f != 0]
        if not failed:
            return
        text = "" if error is None else f"{type(error).__name__}: {error}"
        raw = text.encode("utf-8")[:ERROR_BYTES]
        msg = torch.zeros(ERROR_BYTES + 8, dtype=torch.uint8)
        msg[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
        if raw:
            msg[8:8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        table = self._all_gather_rows(msg).cpu()
        if error is not None:
            if hasattr(error, "add_note"):
                error.add_note(f"curvlab: raised on rank {self.rank} of {self.world_size}; "
                               "the other ranks raise RuntimeError")
            raise error
        first = failed[0]
        length = int.from_bytes(bytes(table[first, :8].tolist()), "little")
        message = bytes(table[first, 8:8 + length].tolist()).decode("utf-8", errors="replace")
        others = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
        raise RuntimeError(f"curvlab: rank {first} failed: {message}{others}")

    def _check_agreement(self, table: Tensor, scheme: str) -> None:
        """Every rank must see the same data and the same model (same on all ranks)."""
        table = table.cpu()
        hints = table[:, 2]
        if scheme != "presharded" and (hints >= 0).all() and (hints != hints[0]).any():
            raise ValueError(
                f"the ranks were given data of different sizes ({[int(h) for h in hints.tolist()]} "
                "samples or batches per rank): pass the FULL data on every rank (curvlab shards "
                "it), or wrap data that is already split per rank in curvlab.distributed.presharded()")
        sums = table[:, 3]
        if (sums != sums[0]).any():
            raise ValueError(
                "the DataLoader yields its batches in a different order on different ranks "
                "(shuffle=True or an unseeded sampler?): use shuffle=False; the Hessian sums over "
                "all samples, so their order does not matter")
        fp = table[:, 4:]
        scale = fp.abs().amax(dim=0) + 1e-300
        if ((fp - fp[0]).abs() > 1e-6 * scale).any():
            raise ValueError(
                "the model's parameters or buffers differ across ranks: every rank must hold the "
                "same weights (load the same checkpoint, seed the initialisation, or broadcast "
                "from rank 0, as DistributedDataParallel does)")


def _comm_device(backend: str, compute: torch.device) -> torch.device:
    """The device collectives run on: the GPU for NCCL, the CPU for gloo (and others)."""
    backend = str(backend).lower()
    if "nccl" in backend and "gloo" not in backend:
        if compute.type != "cuda":
            raise ValueError(
                f"the process group uses NCCL, which reduces CUDA tensors, but curvlab computes "
                f"on {compute}: put the model on this rank's GPU (torch.cuda.set_device(local_rank); "
                "model.to('cuda')) or use the gloo backend for CPU jobs")
        return compute
    if "nccl" in backend and compute.type == "cuda":
        return compute  # a mixed "cpu:gloo,cuda:nccl" group reduces CUDA tensors with NCCL
    return torch.device("cpu")


def _fingerprint(fmodel) -> List[float]:
    """Sums and sums of squares of the parameters and floating buffers (float64)."""
    p = fmodel.flat_params().detach().double()
    bufs = [b.detach().double().reshape(-1) for b in fmodel.buffers.values() if b.is_floating_point()]
    b = torch.cat(bufs) if bufs else p.new_zeros(0)
    return [float(p.sum()), float((p * p).sum()), float(b.sum()), float((b * b).sum())]
