"""Data as curvlab reads it: a re-iterable collection of ``(input, target)`` batches.

Every Krylov step passes over the data again, and all passes must see the
*same* operator: the data must be deterministic (no random augmentation) and
re-iterable.  :func:`as_batches` accepts what users have at hand and returns a
:class:`Batches` object:

* a ``torch.utils.data.DataLoader`` (re-iterated each pass; its order does not
  matter, every pass sums over all batches, so ``shuffle=True`` is fine);
* a tuple ``(X, Y)`` of tensors with equal first dimension, cut into batches of
  ``batch_size``; ``X`` (or ``Y``) may also be a tuple, list or dict of such
  tensors, as long as the other one is a tensor (when both are tuples or dicts,
  ``(X, Y)`` reads as a list of two batches: pass ``TensorBatches(X, Y,
  batch_size)`` instead);
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
y_d>)`` in float64, together with the sample count; a later full pass whose
count or fingerprint differs (beyond summation-order rounding) raises
``ValueError``.  A shuffling DataLoader over a fixed data set passes (the same
samples in another order); random augmentation or ``drop_last=True`` with
shuffling (another subset each pass) does not.  Only complete passes are
compared (reading a first batch is not one).  The probes ``r, s`` are fixed
pseudo-random numbers that depend only on an entry's position inside the sample
(its multi-index, and which leaf of the batch it is), not on the sample's shape:
a ``collate_fn`` that pads each batch with zeros at the end of a dimension to
its own longest sample (``pad_sequence``, ``DataCollatorWithPadding`` with pad
id 0) gives the same fingerprint whatever the batch it lands in.  Padding with
another value (labels padded with -100, left padding) changes it; pad to one
fixed length then, or, when the samples are known to be the same on every pass,
turn the value comparison off with ``as_batches(data, check_data=False)`` (the
sample count is still compared) and pass that to ``extremes``.

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

from collections.abc import Iterable, Iterator, Mapping
from typing import Tuple

import torch
from torch import Tensor

from .fingerprint import _CHANGED, _FINGERPRINT_RTOL, _PADDING, _ROUNDING, _Fingerprint
from .functional import batch_size_of
from .trees import _leaves, _tensor_tree, _tree_cat, _tree_len, _tree_rows

__all__ = ["Batches", "TensorBatches", "as_batches", "check_keys"]

DEFAULT_KEYS = ("input", "target")

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
    hint = (" (whole-data tensors go as a tuple (X, Y), or as curvlab.data.TensorBatches(X, Y, "
            "batch_size) when X and Y are both tuples or dicts of tensors)"
            if isinstance(batch, Tensor) else "")
    raise TypeError(
        f"batch {index} is a {type(batch).__name__}, not an (input, target) pair: "
        "data must yield (x, y) tuples, e.g. a DataLoader over a TensorDataset, or dicts "
        f"(with input_key= and target_key=){hint}")


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
        check_data: compare the fingerprints of the passes (module docstring);
            ``False`` compares only their sample counts.

    Attributes:
        num_samples: total number of samples ``N`` over all batches (from the
            loader's sampler, or counted in a pass of its own: see the module docstring).
        counting_passes: passes made only to count the samples.
    """

    def __init__(self, source: Iterable, *, input_key=None, target_key=None, check_data: bool = True):
        check_keys(input_key, target_key)
        self._source = source
        self.input_key, self.target_key = input_key, target_key
        self.check_data = bool(check_data)  # (its type is checked by as_batches)
        self._num_samples: int | None = _upfront_count(source)
        self._reference: Tuple[int, float, float, float] | None = None
        self._probes: dict = {}
        self.counting_passes = 0

    def __iter__(self) -> Iterator[Tuple[object, object]]:
        count = 0
        fingerprint = _Fingerprint(self._probes) if self.check_data else None
        for i, batch in enumerate(self._source):
            x, y = _pair(batch, i, self.input_key, self.target_key)
            try:
                nb = batch_size_of(x)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"batch {i}: {exc}") from None
            count += nb
            if fingerprint is not None:
                fingerprint.add(x, y, nb)
            yield x, y
        self._record_pass(count, *(fingerprint.value() if fingerprint is not None else (0.0,) * 3))

    def _record_pass(self, count: int, value: float, scale: float, magnitude: float) -> None:
        """Keep the first complete pass's fingerprint; compare every later one with it."""
        if self._reference is None:
            if self._num_samples is not None and count != self._num_samples:
                raise ValueError(
                    f"the DataLoader's sampler promises {self._num_samples} samples, but a pass "
                    f"yielded {count}: a collate_fn that changes the batch size is not supported; "
                    "the first dimension of every input must count the samples of its batch")
            self._reference = (count, value, scale, magnitude)
            self._num_samples = count
            return
        count0, value0, scale0, magnitude0 = self._reference
        if count != count0:
            raise ValueError(_CHANGED.format(
                what=f"{count0} samples in an earlier pass, {count} in this one"))
        tol = _FINGERPRINT_RTOL * (scale + scale0) + _ROUNDING * (magnitude + magnitude0) + 1e-300
        if abs(value - value0) > tol:
            raise ValueError(_CHANGED.format(
                what=f"the same number of samples ({count}), but other values (fingerprint "
                     f"{value0:.12g} in an earlier pass, {value:.12g} in this one)") + _PADDING)

    @property
    def num_samples(self) -> int:
        if self._num_samples is None:
            for _ in self:
                pass
            self.counting_passes += 1
        return self._num_samples

    def _like(self, source) -> "Batches":
        """``source`` as :class:`Batches` with this one's keys."""
        return Batches(source, input_key=self.input_key, target_key=self.target_key,
                       check_data=self.check_data)

    def with_keys(self, input_key, target_key) -> "Batches":
        """The same source read with other keys."""
        return Batches(self._source, input_key=input_key, target_key=target_key,
                       check_data=self.check_data)

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
        self.check_data = False  # fixed by construction
        self._num_samples = nx
        self._reference = None
        self.counting_passes = 0

    def __iter__(self):
        for start in range(0, self._num_samples, self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield _tree_rows(self.X, rows), _tree_rows(self.Y, rows)

    def with_keys(self, input_key, target_key) -> "TensorBatches":
        """This data, when the keys say what ``(X, Y)`` is already; else ``ValueError``."""
        check_tensor_keys(input_key, target_key)
        return self

    def rows(self, index) -> "TensorBatches":
        """The samples ``index`` (a slice or 1-d index tensor) as new batches."""
        return TensorBatches(_tree_rows(self.X, index), _tree_rows(self.Y, index), self.batch_size)

    def subset(self, index: Tensor) -> "TensorBatches":
        """The samples ``index`` (a 1-d index tensor) as new batches."""
        return self.rows(index)

    def materialize(self) -> Tuple[object, object]:
        return self.X, self.Y


def check_tensor_keys(input_key, target_key) -> None:
    """Raise unless the keys fit ``(X, Y)`` tensor data: ``None`` or positions 0 and 1.

    ``TypeError`` for keys no data takes (:func:`check_keys`), ``ValueError`` for others.
    """
    check_keys(input_key, target_key)
    if input_key in (None, 0) and target_key in (None, 1) and not isinstance(input_key, bool) \
            and not isinstance(target_key, bool):
        return
    raise ValueError(
        f"data is (X, Y) tensors, whose input is X and target Y, but input_key={input_key!r} and "
        f"target_key={target_key!r} were given: keys name entries of dict or tuple batches (a "
        "DataLoader or a list of batches). With (X, Y), drop input_key and target_key (or pass "
        "0 and 1), and put the input first; for whole-data dicts pass (d[input_key], d[target_key])")


def _is_whole_data(data) -> bool:
    """``data`` is ``(X, Y)``: two tensor trees, one of them a tensor.

    A pair of trees neither of which is a tensor stays a list of two batches
    (``[(x1, y1), (x2, y2)]``, two dict batches).
    """
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and any(isinstance(t, Tensor) for t in data) and all(_tensor_tree(t) for t in data))


def as_batches(data, batch_size: int = 256, *, input_key=None, target_key=None,
               check_data: bool = True) -> Batches:
    """Turn ``data`` into :class:`Batches` (see the module docstring).

    Args:
        data: a DataLoader, an iterable of batches, a tuple ``(X, Y)`` of tensors,
            or :class:`Batches` (returned as it is).
        batch_size: batch size for ``(X, Y)``.
        input_key, target_key: the entries of a batch that are the input and the
            target (module docstring).
        check_data: ``False`` turns off the comparison of the passes' values (not
            of their sample counts; module docstring), e.g. for padding that the
            fingerprint sees as a change.  ``(X, Y)`` is never compared.

    Raises:
        TypeError: ``data`` is neither a loader, an iterable of batches nor ``(X, Y)``.
        ValueError: ``(X, Y)`` of different lengths or 0-dim; keys that do not
            match ``Batches`` given with other keys.
    """
    # the keys are checked where they are stored: Batches.__init__, check_tensor_keys
    if not isinstance(check_data, bool):
        raise TypeError(f"check_data must be True or False, got {check_data!r}")
    if isinstance(data, Batches):
        keys, own = (input_key, target_key), (data.input_key, data.target_key)
        if not check_data and data.check_data and not isinstance(data, TensorBatches):
            data = Batches(data._source, input_key=own[0], target_key=own[1], check_data=False)
        if keys == (None, None) or keys == own:
            return data
        if isinstance(data, TensorBatches):
            return data.with_keys(*keys)
        if own == (None, None):
            return data.with_keys(input_key, target_key)
        raise ValueError(
            f"data is a Batches made with input_key={data.input_key!r}, target_key="
            f"{data.target_key!r}; got input_key={input_key!r}, target_key={target_key!r}")
    if isinstance(data, torch.utils.data.DataLoader):
        return Batches(data, input_key=input_key, target_key=target_key, check_data=check_data)
    if _is_whole_data(data):
        X, Y = data
        lengths = {}
        for name, t in (("X", X), ("Y", Y)):
            for _, leaf in _leaves(t):
                if leaf.dim() == 0:
                    raise ValueError(
                        f"data is (X, Y) and {name} {'is' if leaf is t else 'holds'} a 0-dim tensor: "
                        "every tensor of X and Y needs a first dimension that counts the samples "
                        "(e.g. t.reshape(1, ...) for one sample)")
            try:
                lengths[name] = _tree_len(t, name)
            except ValueError as exc:
                raise ValueError(f"data is (X, Y) and {exc}: every tensor of X and Y needs one row "
                                 "per sample") from None
        if lengths["X"] != lengths["Y"]:
            raise ValueError(
                f"data is (X, Y) with {lengths['X']} inputs but {lengths['Y']} targets: X and Y must "
                "have the same first dimension (one target per input)")
        check_tensor_keys(input_key, target_key)
        return TensorBatches(X, Y, batch_size)
    if isinstance(data, (Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        extra = (" (a dict of whole-data tensors: pass (d['inputs'], d['targets']) with its keys)"
                 if isinstance(data, Mapping) else "")
        raise TypeError(
            f"data is a {type(data).__name__}: pass a DataLoader, an iterable of (x, y) "
            f"batches, or a tuple (X, Y) of tensors with the same first dimension{extra}")
    if isinstance(data, Iterator):  # one-shot (a generator): keep its batches for later passes
        data = list(data)
    return Batches(data, input_key=input_key, target_key=target_key, check_data=check_data)
