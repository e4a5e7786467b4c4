"""Data as curvlab reads it: a re-iterable collection of ``(input, target)`` batches.

Every Krylov step passes over the data again, and all passes must see the
*same* operator: the data must be deterministic (no random augmentation) and
re-iterable.  :func:`as_batches` accepts what users have at hand and returns a
:class:`Batches` object:

* a ``torch.utils.data.DataLoader`` (re-iterated each pass; its order does not
  matter, every pass sums over all batches, so ``shuffle=True`` is fine);
* a tuple ``(X, Y)`` of tensors with equal first dimension, cut into batches of
  ``batch_size``;
* any other re-iterable of ``(x, y)`` batches (a list of tuples, ...); a
  one-shot iterator such as a generator is read once and kept in memory.

What a batch may look like:

* a tuple or list ``(x, y)``; extra items after the target (``(x, y, index)``)
  are ignored;
* a dict (any ``Mapping``) with entries ``"input"`` and ``"target"``, or with
  the entries named by ``input_key`` and ``target_key`` (e.g.
  ``input_key="pixel_values", target_key="labels"``); ``input_key`` may be a
  tuple of keys, whose entries are then passed to the model as positional
  arguments, in that order.  With tuple or list batches the keys may be
  integer positions (``input_key=1, target_key=2`` for ``(index, x, y)``).

An input ``x`` is a tensor whose first dimension counts the samples, or a
list, tuple or dict of such tensors (a tuple is unpacked into positional
arguments of the model; a list or dict is passed as one argument, as
``default_collate`` builds it).

**Data that changes between passes is detected.**  Every full pass over a
:class:`Batches` (not a :class:`TensorBatches`, fixed by construction) adds up
an order-invariant fingerprint of its samples, ``sum_d sin(<r, x_d> + <s,
y_d>)`` in float64 with fixed random ``r, s`` per input shape, together with
the sample count; a later full pass whose count or fingerprint differs (beyond
summation-order rounding) raises ``ValueError``.  A shuffling DataLoader over
a fixed data set passes (the same samples in another order); random
augmentation or ``drop_last=True`` with shuffling (another subset each pass)
does not.  Only complete passes are compared (reading a first batch is not one).

**The counting pass.**  ``num_samples`` must be known before the first
product.  A DataLoader over a sized map-style dataset with a sequential,
random (without replacement) or subset-random sampler, or with a list of index
lists as its batch sampler, says it upfront (checked on the first pass); for
other sources one pass reads the data to count it (it loads every batch but
runs no model; :attr:`Batches.counting_passes` counts them, and
:class:`~curvlab.hvp.HessianOperator` reports it as ``cost.load_passes``).  That
pass also becomes the reference fingerprint.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Tuple

import torch
from torch import Tensor

from .functional import batch_size_of

__all__ = ["Batches", "TensorBatches", "as_batches", "check_keys"]

DEFAULT_KEYS = ("input", "target")

# a pass may sum the same per-sample values in another order: its fingerprint then differs
# by rounding only, a few eps of the sum of magnitudes; 1e-9 leaves a wide margin and still
# sees one changed sample among a billion
_FINGERPRINT_RTOL = 1e-9
_CHUNK = 1 << 22  # elements of a batch converted to float64 at a time


def check_keys(input_key, target_key) -> None:
    """Raise ``TypeError`` unless the keys are ``None``, a str/int, or (input only) a tuple of them."""
    def ok(k):
        return isinstance(k, (str, int)) and not isinstance(k, bool)

    if not (input_key is None or ok(input_key)
            or (isinstance(input_key, tuple) and input_key and all(ok(k) for k in input_key))):
        raise TypeError(
            f"input_key must be None, a key (str or int) or a non-empty tuple of keys, got {input_key!r}: "
            "it names the entry of each dict batch that is the model's input, e.g. input_key='pixel_values'")
    if not (target_key is None or ok(target_key)):
        raise TypeError(
            f"target_key must be None or a key (str or int), got {target_key!r}: it names the entry "
            "of each dict batch that is the loss's target, e.g. target_key='labels'")


def _pair(batch, index: int, input_key=None, target_key=None) -> Tuple[object, object]:
    """``(x, y)`` of one batch, picked by ``input_key``/``target_key`` (module docstring)."""
    in_keys = input_key if isinstance(input_key, tuple) else (input_key,)
    if isinstance(batch, Mapping):
        ik = in_keys if input_key is not None else (DEFAULT_KEYS[0],)
        tk = target_key if target_key is not None else DEFAULT_KEYS[1]
        missing = [k for k in ik + (tk,) if k not in batch]
        if missing:
            have = ", ".join(repr(k) for k in batch.keys())
            if input_key is None and target_key is None:
                fix = ("pass input_key= and target_key= naming the entries that are the model's "
                       "input and the loss's target, e.g. input_key='pixel_values', target_key='labels'")
            else:
                fix = "pass input_key= and target_key= that name entries of every batch"
            raise ValueError(f"batch {index} is a dict with keys {have} and no "
                             f"{', '.join(repr(k) for k in missing)}: {fix}")
        x = tuple(batch[k] for k in ik) if isinstance(input_key, tuple) else batch[ik[0]]
        return x, batch[tk]
    if isinstance(batch, (list, tuple)):
        if input_key is None and target_key is None:
            if len(batch) >= 2:
                return batch[0], batch[1]
        else:
            ik = in_keys if input_key is not None else (0,)
            tk = target_key if target_key is not None else 1
            if all(isinstance(k, int) and -len(batch) <= k < len(batch) for k in ik + (tk,)):
                x = tuple(batch[k] for k in ik) if isinstance(input_key, tuple) else batch[ik[0]]
                return x, batch[tk]
            raise ValueError(
                f"batch {index} is a {type(batch).__name__} of {len(batch)} items, but input_key="
                f"{input_key!r} and target_key={target_key!r} need dict batches or integer positions "
                f"below {len(batch)}")
    raise TypeError(
        f"batch {index} is a {type(batch).__name__}, not an (input, target) pair: "
        "data must yield (x, y) tuples, e.g. a DataLoader over a TensorDataset, or dicts "
        "(with input_key= and target_key=)")


def _leaves(tree, path=()):
    """``(path, leaf)`` of a nested tuple/list/dict, depth first."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    else:
        yield path, tree


class _Fingerprint:
    """Order-invariant fingerprint of one pass (see the module docstring).

    Per sample ``d``: ``f_d = sin(sum_leaves <r_leaf, leaf_d>)`` over the tensor
    leaves of input and target whose first dimension is the batch size (so a
    sample's input and target are tied together); other tensor leaves add
    ``sum_rows sin(<r, row>)`` on their own.  Accumulated in float64, with
    ``sum |f_d|`` as the scale of rounding.
    """

    def __init__(self, probes: dict):
        self.probes = probes
        self.acc: dict = {}  # device -> float64 tensor [sum f, sum |f|]

    def _probe(self, path, d: int, device) -> Tensor:
        key = (path, d, str(device))
        r = self.probes.get(key)
        if r is None:
            seed = zlib.crc32(repr((path, d)).encode())
            g = torch.Generator().manual_seed(seed)
            r = (torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(device)
            self.probes[key] = r
        return r

    def _add(self, s: Tensor) -> None:
        s = torch.sin(s)
        acc = self.acc.get(s.device)
        if acc is None:
            acc = self.acc[s.device] = torch.zeros(2, dtype=torch.float64, device=s.device)
        acc[0] += s.sum()
        acc[1] += s.abs().sum()

    def add(self, x, y, nb: int) -> None:
        arg = None
        for path, leaf in _leaves(("x", x, "y", y)):
            if not isinstance(leaf, Tensor) or leaf.is_complex():
                continue
            t = leaf.detach()
            if t.dim() == 0:
                t = t.reshape(1)
            rows = t.reshape(t.shape[0], -1)
            if rows.shape[1] == 0:
                continue
            r = self._probe(path, rows.shape[1], rows.device)
            step = max(1, _CHUNK // rows.shape[1])  # bounds the float64 copy of a large batch
            a = torch.cat([rows[s:s + step].to(torch.float64) @ r for s in range(0, rows.shape[0], step)])
            if leaf.dim() >= 1 and leaf.shape[0] == nb:
                arg = a if arg is None else arg + a.to(arg.device)
            else:
                self._add(a)
        if arg is not None:
            self._add(arg)

    def value(self) -> Tuple[float, float]:
        total = [0.0, 0.0]
        for acc in self.acc.values():
            v = acc.tolist()
            total[0] += v[0]
            total[1] += v[1]
        return total[0], total[1]


_CHANGED = (
    "data changed between passes: {what}. curvlab passes over the data many times and "
    "needs the same samples on every pass (the Hessian of one fixed loss): turn off random "
    "augmentation (random transforms in the dataset), do not combine drop_last=True with "
    "shuffle=True (each pass then drops other samples; drop_last=False is fine), and use a "
    "fixed data set (a DataLoader with shuffle=True over a fixed set is fine)")


def _upfront_count(source) -> int | None:
    """Samples a DataLoader will yield, when its sampler says so without loading (else ``None``)."""
    utils = torch.utils.data
    if not isinstance(source, utils.DataLoader) or isinstance(source.dataset, utils.IterableDataset):
        return None
    bs = source.batch_sampler
    try:
        if isinstance(bs, (list, tuple)):
            return sum(len(b) for b in bs)
        if type(bs) is not utils.BatchSampler:
            return None
        sampler = bs.sampler
        if type(sampler) is utils.RandomSampler:
            if sampler.replacement or sampler.num_samples != len(sampler.data_source):
                return None  # another draw each pass (caught by the fingerprint)
        elif type(sampler) not in (utils.SequentialSampler, utils.SubsetRandomSampler):
            return None
        n = len(sampler)
    except TypeError:  # an unsized dataset or index list
        return None
    if bs.drop_last and n % bs.batch_size:
        if type(sampler) is not utils.SequentialSampler:
            return None  # a shuffled pass drops other samples each time: count them (and compare)
        n -= n % bs.batch_size
    return n


def _fixed_indices(source):
    """Dataset indices of a DataLoader's samples in a fixed order, if the sample set is fixed."""
    utils = torch.utils.data
    if not isinstance(source, utils.DataLoader) or isinstance(source.dataset, utils.IterableDataset):
        return None
    bs = source.batch_sampler
    n = _upfront_count(source)
    if type(bs) is not utils.BatchSampler or n is None:
        return None
    sampler = bs.sampler
    if type(sampler) is utils.SubsetRandomSampler:
        return list(sampler.indices)[:n]
    return range(n)


class Batches:
    """A re-iterable source of ``(x, y)`` batches.

    Args:
        source: a DataLoader or another re-iterable of batches.
        input_key, target_key: which entries of a batch are the input and the
            target (module docstring); ``None``: ``"input"``/``"target"`` of a
            dict, the first two items of a tuple.

    Attributes:
        num_samples: total number of samples ``N`` over all batches (from the
            loader's sampler, or counted in a pass of its own: see the module docstring).
        counting_passes: passes made only to count the samples.
    """

    def __init__(self, source: Iterable, *, input_key=None, target_key=None):
        check_keys(input_key, target_key)
        self._source = source
        self.input_key, self.target_key = input_key, target_key
        self._num_samples: int | None = _upfront_count(source)
        self._reference: Tuple[int, float, float] | None = None
        self._probes: dict = {}
        self.counting_passes = 0

    def __iter__(self) -> Iterator[Tuple[object, object]]:
        count = 0
        fingerprint = _Fingerprint(self._probes)
        for i, batch in enumerate(self._source):
            x, y = _pair(batch, i, self.input_key, self.target_key)
            try:
                nb = batch_size_of(x)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"batch {i}: {exc}") from None
            count += nb
            fingerprint.add(x, y, nb)
            yield x, y
        self._record_pass(count, *fingerprint.value())

    def _record_pass(self, count: int, value: float, scale: float) -> None:
        """Keep the first complete pass's fingerprint; compare every later one with it."""
        if self._reference is None:
            if self._num_samples is not None and count != self._num_samples:
                raise ValueError(
                    f"the DataLoader's sampler promises {self._num_samples} samples, but a pass "
                    f"yielded {count}: a collate_fn that changes the batch size is not supported; "
                    "the first dimension of every input must count the samples of its batch")
            self._reference = (count, value, scale)
            self._num_samples = count
            return
        count0, value0, scale0 = self._reference
        if count != count0:
            raise ValueError(_CHANGED.format(
                what=f"{count0} samples in an earlier pass, {count} in this one"))
        if abs(value - value0) > _FINGERPRINT_RTOL * (scale + scale0) + 1e-300:
            raise ValueError(_CHANGED.format(
                what=f"the same number of samples ({count}), but other values (fingerprint "
                     f"{value0:.12g} in an earlier pass, {value:.12g} in this one)"))

    @property
    def num_samples(self) -> int:
        if self._num_samples is None:
            for _ in self:
                pass
            self.counting_passes += 1
        return self._num_samples

    def _like(self, source) -> "Batches":
        """``source`` as :class:`Batches` with this one's keys."""
        return Batches(source, input_key=self.input_key, target_key=self.target_key)

    def with_keys(self, input_key, target_key) -> "Batches":
        """The same source read with other keys."""
        return Batches(self._source, input_key=input_key, target_key=target_key)

    def subset(self, index: Tensor) -> "Batches":
        """The samples at ``index`` (a 1-d int tensor of positions in a fixed order of the samples).

        A DataLoader over a map-style dataset whose sampler fixes the sample set
        (sequential, random without replacement, subset-random) is subset
        through its dataset: position ``i`` is the ``i``-th index the sampler can
        draw, and nothing is loaded upfront.  Other sources are read once
        (:meth:`materialize`, whose pass order fixes the positions) and their
        batches concatenated (inputs and targets must then be tensors, or
        tuples, lists or dicts of tensors).
        """
        src = self._source
        indices = _fixed_indices(src)
        if indices is not None:
            sub = torch.utils.data.Subset(src.dataset, [indices[i] for i in index.tolist()])
            return self._like(torch.utils.data.DataLoader(
                sub, batch_size=src.batch_size or 256, collate_fn=src.collate_fn,
                num_workers=src.num_workers, pin_memory=src.pin_memory,
                worker_init_fn=src.worker_init_fn))
        X, Y = self.materialize()
        return TensorBatches(X, Y, self._batch_size_hint()).subset(index)

    def materialize(self) -> Tuple[object, object]:
        """All samples as ``(X, Y)`` in pass order (read once, then cached).

        ``X`` and ``Y`` are tensors, or tuples, lists or dicts of tensors (as the
        batches are), concatenated along the first dimension.  The pass that
        reads them is compared with the others (module docstring).
        """
        if getattr(self, "_tensors", None) is None:
            xs, ys = zip(*self)
            try:
                self._tensors = (_tree_cat(xs), _tree_cat(ys))
            except TypeError as exc:
                raise TypeError(
                    f"subsampling needs batches whose inputs and targets are tensors (or tuples, lists "
                    f"or dicts of tensors) to concatenate: {exc}; use sampling='exact'") from None
        return self._tensors

    def _batch_size_hint(self) -> int:
        for x, _ in self:
            return max(1, batch_size_of(x))
        return 256

    def check_nonempty(self) -> None:
        if self.num_samples == 0:
            raise ValueError("data is empty: it yielded no samples; pass at least one (x, y) batch")


def _tree_cat(trees):
    """Concatenate same-structured trees of tensors along dim 0."""
    first = trees[0]
    if isinstance(first, Tensor):
        if not all(isinstance(t, Tensor) for t in trees):
            raise TypeError("batches mix tensors and other types")
        return torch.cat(trees)
    if isinstance(first, Mapping):
        return {k: _tree_cat([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_cat([t[i] for t in trees]) for i in range(len(first)))
    raise TypeError(f"a batch holds a {type(first).__name__}")


def _tree_rows(tree, index):
    """Rows ``index`` (a slice or index tensor) of every tensor in a tree."""
    if isinstance(tree, Tensor):
        return tree[index]
    if isinstance(tree, Mapping):
        return {k: _tree_rows(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_rows(v, index) for v in tree)
    raise TypeError(f"cannot index a {type(tree).__name__}")


def _tree_len(tree, name: str) -> int:
    lengths = set()
    for _, leaf in _leaves(tree):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name} holds a {type(leaf).__name__}; it must hold tensors only")
        if leaf.dim() == 0:
            raise ValueError(f"{name} is a 0-dim tensor: its first dimension must count the samples")
        lengths.add(leaf.shape[0])
    if len(lengths) != 1:
        raise ValueError(f"the tensors of {name} have different numbers of samples: {sorted(lengths)}")
    return lengths.pop()


class TensorBatches(Batches):
    """``(X, Y)`` cut into consecutive batches of ``batch_size``.

    ``X`` and ``Y`` are tensors (or tuples, lists or dicts of tensors) with the
    same first dimension.  Deterministic by construction: no fingerprints.
    """

    def __init__(self, X, Y, batch_size: int = 256):
        nx, ny = _tree_len(X, "X"), _tree_len(Y, "Y")
        if nx != ny:
            raise ValueError(f"X and Y have different numbers of samples: {nx} and {ny}; "
                             "they must have the same first dimension (one target per input)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.X, self.Y, self.batch_size = X, Y, batch_size
        self.input_key = self.target_key = None
        self._num_samples = nx
        self._reference = None
        self.counting_passes = 0

    def __iter__(self):
        for start in range(0, self._num_samples, self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield _tree_rows(self.X, rows), _tree_rows(self.Y, rows)

    def rows(self, index) -> "TensorBatches":
        """The samples ``index`` (a slice or 1-d index tensor) as new batches."""
        return TensorBatches(_tree_rows(self.X, index), _tree_rows(self.Y, index), self.batch_size)

    def subset(self, index: Tensor) -> "TensorBatches":
        """The samples ``index`` (a 1-d index tensor) as new batches."""
        return self.rows(index)

    def materialize(self) -> Tuple[object, object]:
        return self.X, self.Y


def as_batches(data, batch_size: int = 256, *, input_key=None, target_key=None) -> Batches:
    """Turn ``data`` into :class:`Batches` (see the module docstring).

    Args:
        data: a DataLoader, an iterable of batches, a tuple ``(X, Y)`` of tensors,
            or :class:`Batches` (returned as it is).
        batch_size: batch size for ``(X, Y)``.
        input_key, target_key: the entries of a batch that are the input and the
            target (module docstring).

    Raises:
        TypeError: ``data`` is neither a loader, an iterable of batches nor ``(X, Y)``.
        ValueError: ``(X, Y)`` of different lengths or 0-dim; keys that do not
            match ``Batches`` given with other keys.
    """
    check_keys(input_key, target_key)
    if isinstance(data, Batches):
        keys, own = (input_key, target_key), (data.input_key, data.target_key)
        if keys == (None, None) or keys == own or isinstance(data, TensorBatches):
            return data
        if own == (None, None):
            return data.with_keys(input_key, target_key)
        raise ValueError(
            f"data is a Batches made with input_key={data.input_key!r}, target_key="
            f"{data.target_key!r}; got input_key={input_key!r}, target_key={target_key!r}")
    if isinstance(data, torch.utils.data.DataLoader):
        return Batches(data, input_key=input_key, target_key=target_key)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        for name, t in (("X", X), ("Y", Y)):
            if t.dim() == 0:
                raise ValueError(
                    f"data is (X, Y) and {name} is a 0-dim tensor: both need a first dimension that "
                    f"counts the samples (e.g. {name}.reshape(1, ...) for one sample)")
        if len(X) != len(Y):
            raise ValueError(
                f"data is (X, Y) with {len(X)} inputs but {len(Y)} targets: X and Y must have the "
                "same first dimension (one target per input)")
        return TensorBatches(X, Y, batch_size)
    if isinstance(data, (Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        extra = (" (a dict of whole-data tensors: pass (d['inputs'], d['targets']) with its keys)"
                 if isinstance(data, Mapping) else "")
        raise TypeError(
            f"data is a {type(data).__name__}: pass a DataLoader, an iterable of (x, y) "
            f"batches, or a tuple (X, Y) of tensors with the same first dimension{extra}")
    if isinstance(data, Iterator):  # one-shot (a generator): keep its batches for later passes
        data = list(data)
    return Batches(data, input_key=input_key, target_key=target_key)
