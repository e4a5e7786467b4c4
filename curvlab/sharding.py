"""How the data is split over the ranks of a torch.distributed job.

The schemes (:data:`SCHEMES`): tensors ``(X, Y)`` in contiguous ranges, or strided;
DataLoaders and lists of batches round-robin by batch (a rank loads only its own
batches); data already split per rank (:func:`presharded`, or a DataLoader with a
``DistributedSampler``) used as it is.  :func:`shard` returns a rank's
:class:`Shard`; :func:`global_positions` maps every rank's samples back to the
order of the full data.  The reductions themselves are
:class:`curvlab.distributed.DataParallel`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import islice
from typing import List, Sequence

import torch
from torch import Tensor

from .data import Batches, TensorBatches, as_batches

SCHEMES = ("contiguous", "strided", "batches", "presharded")
_CHECKSUM_MOD = 2 ** 50  # checksums travel as float64, exact below 2^53

class PreSharded(Batches):
    """Data that is already this rank's part of the data set; see :func:`presharded`.

    Only the operator's reductions may read it (through :attr:`part`): anything
    that wants the *whole* data on every rank (subsampling, building a
    curvature approximation) gets a ``ValueError`` here, on every rank alike,
    instead of silently using a different shard on each rank.
    """

    def __init__(self, data, batch_size: int = 256):
        super().__init__(None)
        self.part: Batches = as_batches(data, batch_size)
        self.input_key, self.target_key = self.part.input_key, self.part.target_key

    def _refuse(self):
        raise ValueError(
            "this rank holds only its own shard of the data (presharded data or a DataLoader "
            "with a DistributedSampler), but subsampling and curvature approximations read the "
            "whole data set on every rank: pass the full data on every rank and let curvlab "
            "shard it, or use sampling='exact' and curvature='none'")

    def __iter__(self):
        self._refuse()

    @property
    def num_samples(self) -> int:
        self._refuse()

    def subset(self, index: Tensor):
        self._refuse()

    def with_keys(self, input_key, target_key) -> "PreSharded":
        """This shard read with other keys (``(X, Y)`` tensors take none: see :func:`~curvlab.data.as_batches`)."""
        return PreSharded(self.part.with_keys(input_key, target_key))


def presharded(data, batch_size: int = 256) -> PreSharded:
    """Mark ``data`` as this rank's shard: curvlab will not shard it again.

    Use it when each rank already loads only its part of the data (a custom
    sampler, files split per rank).  The shards of all ranks together must
    hold every sample exactly once; curvlab sums them and divides by the total
    count, all-reduced.  Per-sample values are then gathered rank by rank (all
    of rank 0's samples first), not in the data set's order.  A DataLoader
    with a ``DistributedSampler`` is recognised without this wrapper.
    """
    return PreSharded(data, batch_size)


class _RoundRobin:
    """Re-iterable view of ``source`` keeping the batches ``rank, rank + W, ...``."""

    def __init__(self, source, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    def __iter__(self):
        return islice(iter(self.source), self.rank, None, self.world_size)


@dataclass(frozen=True)
class Shard:
    """This rank's part of the data.

    Attributes:
        local: the rank's batches.
        scheme: how the data was split (one of :data:`SCHEMES`); it fixes where
            the rank's samples sit in the global order (:func:`global_positions`).
        size_hint: a size every rank must see alike (samples for tensors, batches
            for loaders and lists), ``-1`` when unknown.
        checksum: of the batch index lists of a DataLoader (0 otherwise); must
            agree across ranks.
    """

    local: Batches
    scheme: str
    size_hint: int = -1
    checksum: int = 0


def shard(batches: Batches, rank: int, world_size: int, scheme: str = "contiguous") -> Shard:
    """Rank ``rank``'s part of ``batches`` (every sample in exactly one part).

    Args:
        batches: the full data (as :func:`curvlab.data.as_batches` gives it).
        rank, world_size: ``0 <= rank < world_size``.
        scheme: for :class:`~curvlab.data.TensorBatches`, ``"contiguous"``
            (samples ``[start_r, start_{r+1})``, sizes differing by at most one)
            or ``"strided"`` (samples ``r, r + W, ...``); other data is always
            split round-robin by batch (scheme ``"batches"``).  Presharded data
            and DataLoaders with a ``DistributedSampler`` are kept whole
            (scheme ``"presharded"``).

    Raises:
        ValueError: a ``DistributedSampler`` that pads or drops samples, or one
            set up for another rank or world size.
    """
    if scheme not in ("contiguous", "strided"):
        raise ValueError(f"scheme must be 'contiguous' or 'strided', got {scheme!r}")
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if isinstance(batches, PreSharded):
        return Shard(batches.part, "presharded")
    if isinstance(batches, TensorBatches):
        N = batches.num_samples
        if scheme == "strided":
            local = batches.rows(slice(rank, None, world_size))
        else:
            start, stop = _contiguous_range(N, rank, world_size)
            local = batches.rows(slice(start, stop))
        return Shard(local, scheme, size_hint=N)
    source = batches._source
    if isinstance(source, torch.utils.data.DataLoader):
        sampler = source.sampler
        if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
            _check_distributed_sampler(sampler, rank, world_size)
            return Shard(batches, "presharded")
        return _shard_loader(batches, rank, world_size)
    if isinstance(source, (list, tuple)):
        return Shard(batches._like(list(source[rank::world_size])), "batches", size_hint=len(source))
    return Shard(batches._like(_RoundRobin(source, rank, world_size)), "batches")


def _contiguous_range(N: int, rank: int, world_size: int) -> tuple[int, int]:
    base, extra = divmod(N, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _check_distributed_sampler(sampler, rank: int, world_size: int) -> None:
    if sampler.num_replicas != world_size or sampler.rank != rank:
        raise ValueError(
            f"the DataLoader's DistributedSampler is set up for rank {sampler.rank} of "
            f"{sampler.num_replicas}, but this is rank {rank} of {world_size}: create it after "
            "init_process_group with the default num_replicas and rank")
    N = len(sampler.dataset)
    if N % world_size:
        what = "drops the last" if sampler.drop_last else "pads with repeats of"
        count = N % world_size if sampler.drop_last else world_size - N % world_size
        raise ValueError(
            f"the DataLoader's DistributedSampler {what} {count} sample(s) ({N} samples over "
            f"{world_size} ranks), which changes the loss: pass a DataLoader over the full data "
            "set without a DistributedSampler (curvlab shards it over the ranks without "
            "duplicates), or use a data set whose size the world size divides")


def _shard_loader(batches: Batches, rank: int, world_size: int) -> Shard:
    """Round-robin shard of a DataLoader, through its batch sampler when it has one."""
    loader = batches._source
    dataset = loader.dataset
    if loader.batch_sampler is None or isinstance(dataset, torch.utils.data.IterableDataset):
        size = _len_or(loader)
        return Shard(batches._like(_RoundRobin(loader, rank, world_size)), "batches", size_hint=size)
    index_lists = [list(b) for b in loader.batch_sampler]
    digest = hashlib.blake2b(digest_size=8)
    for b in index_lists:
        digest.update(len(b).to_bytes(8, "little", signed=True))
        digest.update(repr(b).encode())
    checksum = int.from_bytes(digest.digest(), "little") % _CHECKSUM_MOD
    kwargs = dict(batch_sampler=index_lists[rank::world_size], collate_fn=loader.collate_fn,
                  num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                  worker_init_fn=loader.worker_init_fn, timeout=loader.timeout)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor,
                      persistent_workers=loader.persistent_workers,
                      multiprocessing_context=loader.multiprocessing_context)
    local = torch.utils.data.DataLoader(dataset, **kwargs)
    return Shard(batches._like(local), "batches", size_hint=len(index_lists), checksum=checksum)


def _len_or(obj, default: int = -1) -> int:
    try:
        return len(obj)
    except TypeError:
        return default


def global_positions(scheme: str, sizes: Sequence[Sequence[int]]) -> List[Tensor]:
    """Where each rank's samples sit in the global sample order.

    Args:
        scheme: one of :data:`SCHEMES`.
        sizes: ``sizes[r]`` lists the sizes of rank ``r``'s batches, in its pass order.

    Returns:
        per rank, a 1-d int64 tensor: the global position of each of its samples
        (in its pass order).  Together they are a permutation of ``range(N)``.
    """
    W = len(sizes)
    totals = [sum(s) for s in sizes]
    if scheme in ("contiguous", "presharded"):
        starts = [sum(totals[:r]) for r in range(W)]
        return [torch.arange(starts[r], starts[r] + totals[r]) for r in range(W)]
    if scheme == "strided":
        return [r + W * torch.arange(totals[r]) for r in range(W)]
    if scheme == "batches":
        # rank r's j-th batch is global batch j * W + r
        B = sum(len(s) for s in sizes)
        global_sizes = [0] * B
        for r, s in enumerate(sizes):
            for j, size in enumerate(s):
                g = j * W + r
                if g >= B:
                    raise ValueError(f"rank {r} has more batches than a round-robin split gives it")
                global_sizes[g] = size
        offsets = [0]
        for size in global_sizes:
            offsets.append(offsets[-1] + size)
        out = []
        for r, s in enumerate(sizes):
            parts = [torch.arange(offsets[j * W + r], offsets[j * W + r] + size)
                     for j, size in enumerate(s)]
            out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
        return out
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# -- the reductions -----------------------------------------------------------------
