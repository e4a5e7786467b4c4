"""Data as curvlab reads it: a re-iterable collection of ``(input, target)`` batches.

Every Krylov step passes over the data again, and all passes must see the
*same* operator: the data must be deterministic (no random augmentation) and
re-iterable.  :func:`as_batches` accepts what users have at hand and returns a
:class:`Batches` object:

* a ``torch.utils.data.DataLoader`` (re-iterated each pass; its order does not
  matter, every pass sums over all batches);
* a tuple ``(X, Y)`` of tensors with equal first dimension, cut into batches of
  ``batch_size``;
* any other re-iterable of ``(x, y)`` batches (a list of tuples, ...); a
  one-shot iterator such as a generator is read once and kept in memory.

Batches may carry extra items after the target (``(x, y, index)``); only the
first two are used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Tuple

import torch
from torch import Tensor

from .functional import batch_size_of

__all__ = ["Batches", "TensorBatches", "as_batches"]


def _pair(batch, index: int) -> Tuple[object, object]:
    if isinstance(batch, dict) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"batch {index} is a {type(batch).__name__}, not an (input, target) pair: "
        "data must yield (x, y) tuples, e.g. a DataLoader over a TensorDataset")


class Batches:
    """A re-iterable source of ``(x, y)`` batches.

    Attributes:
        num_samples: total number of samples ``N`` over all batches (counted on
            the first pass when the source cannot say it upfront).
    """

    def __init__(self, source: Iterable):
        self._source = source
        self._num_samples: int | None = None

    def __iter__(self) -> Iterator[Tuple[object, object]]:
        count = 0
        for i, batch in enumerate(self._source):
            x, y = _pair(batch, i)
            count += batch_size_of(x)
            yield x, y
        if self._num_samples is None:
            self._num_samples = count
        elif count != self._num_samples:
            raise ValueError(
                f"data changed between passes: {self._num_samples} samples before, "
                f"{count} now; curvlab needs the same data on every pass "
                "(use drop_last=False and a fixed data set)")

    @property
    def num_samples(self) -> int:
        if self._num_samples is None:
            for _ in self:
                pass
        return self._num_samples

    def subset(self, index: Tensor) -> "Batches":
        """The samples at ``index`` (positions in pass order, a 1-d int tensor).

        A DataLoader over a map-style dataset is subset through its dataset
        (so nothing is loaded upfront); other sources are read once and their
        batches concatenated into tensors (inputs and targets must then be
        tensors).
        """
        src = self._source
        if (isinstance(src, torch.utils.data.DataLoader)
                and isinstance(src.dataset, torch.utils.data.Dataset)
                and not isinstance(src.dataset, torch.utils.data.IterableDataset)
                and isinstance(src.sampler, torch.utils.data.SequentialSampler)):
            sub = torch.utils.data.Subset(src.dataset, index.tolist())
            return Batches(torch.utils.data.DataLoader(
                sub, batch_size=src.batch_size or 256, collate_fn=src.collate_fn,
                num_workers=src.num_workers, pin_memory=src.pin_memory))
        X, Y = self.materialize()
        return TensorBatches(X, Y, self._batch_size_hint()).subset(index)

    def materialize(self) -> Tuple[Tensor, Tensor]:
        """All samples as two tensors ``(X, Y)`` in pass order (read once, then cached)."""
        if getattr(self, "_tensors", None) is None:
            xs, ys = zip(*self)
            if not all(isinstance(t, Tensor) for t in xs + ys):
                raise TypeError("subsampling needs batches whose inputs and targets are tensors")
            self._tensors = (torch.cat(xs), torch.cat(ys))
        return self._tensors

    def _batch_size_hint(self) -> int:
        for x, _ in self:
            return max(1, batch_size_of(x))
        return 256

    def check_nonempty(self) -> None:
        if self.num_samples == 0:
            raise ValueError("data is empty: it yielded no samples; pass at least one (x, y) batch")


class TensorBatches(Batches):
    """``(X, Y)`` tensors cut into consecutive batches of ``batch_size``."""

    def __init__(self, X: Tensor, Y: Tensor, batch_size: int = 256):
        if len(X) != len(Y):
            raise ValueError(f"X and Y have different numbers of samples: {len(X)} and {len(Y)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.X, self.Y, self.batch_size = X, Y, batch_size
        self._num_samples = len(X)

    def __iter__(self):
        for start in range(0, len(self.X), self.batch_size):
            yield self.X[start:start + self.batch_size], self.Y[start:start + self.batch_size]

    def subset(self, index: Tensor) -> "TensorBatches":
        """The samples ``index`` (a 1-d index tensor) as new batches."""
        return TensorBatches(self.X[index], self.Y[index], self.batch_size)

    def materialize(self) -> Tuple[Tensor, Tensor]:
        return self.X, self.Y


def as_batches(data, batch_size: int = 256) -> Batches:
    """Turn ``data`` into :class:`Batches` (see the module docstring).

    Raises:
        TypeError: ``data`` is neither a loader, an iterable of batches nor ``(X, Y)``.
    """
    if isinstance(data, Batches):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        return Batches(data)
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data)
            and data[0].dim() >= 1 and data[1].dim() >= 1 and len(data[0]) == len(data[1])):
        return TensorBatches(data[0], data[1], batch_size)
    if isinstance(data, (Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data is a {type(data).__name__}: pass a DataLoader, an iterable of (x, y) "
            "batches, or a tuple (X, Y) of tensors with the same first dimension")
    if isinstance(data, Iterator):  # one-shot (a generator): keep its batches for later passes
        data = list(data)
    return Batches(data)
