"""The determinism fingerprint of a data pass (see :mod:`curvlab.data`).

Every full pass over a :class:`~curvlab.data.Batches` sums, in float64, a
per-sample value ``sin(<r, x> + <s, y>)`` with fixed pseudo-random probes ``r``,
``s`` that depend only on an entry's position inside the sample (so zero padding
at the end of a dimension adds nothing).  The sum does not depend on the order of
the samples (a shuffling loader over a fixed set passes); a sample that changed
(augmentation) or a different set of samples (``drop_last`` with shuffling)
changes it.  Two passes are compared up to the rounding of their sums.
"""

from __future__ import annotations

import zlib
from typing import Tuple

import torch
from torch import Tensor

from .trees import _leaves

# a pass may sum the same per-sample values in another order: its fingerprint then differs
# by rounding only, a few eps of the sum of magnitudes; 1e-9 leaves a wide margin and still
# sees one changed sample among a billion
_FINGERPRINT_RTOL = 1e-9
_CHUNK = 1 << 22  # elements of a batch converted to float64 at a time


_MOD = 1 << 31  # probe hashing works on ints below 2^31, so products stay below 2^62
# a float64 dot product of d terms rounds by at most d * eps * sum |r_i x_i|, typically
# sqrt(d) * eps * ...: the comparison allows 2^12 eps of the sum of magnitudes for it
_ROUNDING = 2.0 ** -40


def _mix(h: Tensor) -> Tensor:
    """A few rounds of an integer hash on int64 values in ``[0, 2^31)`` (exact on every device)."""
    for mult in (1103515245, 1664525, 22695477):
        h = h ^ (h >> 13)
        h = (h * mult + 12345) % _MOD
    return h


def _probe_values(path, shape: Tuple[int, ...]) -> Tensor:
    """The probe of a leaf: one pseudo-random value in ``[-1, 1)`` per entry of a sample.

    A deterministic function of the leaf's ``path`` and of the entry's
    multi-index only, not of ``shape``: a sample padded at the end of any
    dimension keeps its probe values where its entries are, so zero padding adds
    nothing to ``<r, x>``.
    """
    h = torch.tensor(zlib.crc32(repr(path).encode()) % _MOD, dtype=torch.int64)
    for j, n in enumerate(shape):
        index = torch.arange(n, dtype=torch.int64).view([n if i == j else 1 for i in range(len(shape))])
        h = _mix((h + index * 2654435761 + 97 * (j + 1)) % _MOD)
    return (h.to(torch.float64) / (_MOD / 2) - 1).reshape(-1)


class _Fingerprint:
    """Order-invariant fingerprint of one pass (see the module docstring).

    Per sample ``d``: ``f_d = sin(sum_leaves <r_leaf, leaf_d>)`` over the tensor
    leaves of input and target whose first dimension is the batch size (so a
    sample's input and target are tied together); other tensor leaves add
    ``sum_rows sin(<r, row>)`` on their own.  Accumulated in float64, with
    ``sum |f_d|`` and ``sum_d sum_i |r_i x_di|`` as the scales of rounding.
    """

    def __init__(self, probes: dict):
        self.probes = probes
        self.acc: dict = {}  # device -> float64 tensor [sum f, sum |f|, sum |r| |x|]

    def _probe(self, path, shape, device) -> Tensor:
        key = (path, shape, str(device))
        r = self.probes.get(key)
        if r is None:
            r = self.probes[key] = _probe_values(path, shape).to(device)
        return r

    def _add(self, s: Tensor, magnitude: Tensor) -> None:
        s = torch.sin(s)
        acc = self.acc.get(s.device)
        if acc is None:
            acc = self.acc[s.device] = torch.zeros(3, dtype=torch.float64, device=s.device)
        acc[0] += s.sum()
        acc[1] += s.abs().sum()
        acc[2] += magnitude.sum().to(s.device)

    def add(self, x, y, nb: int) -> None:
        arg = mag = None
        for path, leaf in _leaves(("x", x, "y", y)):
            if not isinstance(leaf, Tensor) or leaf.is_complex():
                continue
            t = leaf.detach()
            if t.dim() == 0:
                t = t.reshape(1)
            rows = t.reshape(t.shape[0], -1)
            if rows.shape[1] == 0:
                continue
            r = self._probe(path, tuple(t.shape[1:]), rows.device)
            step = max(1, _CHUNK // rows.shape[1])  # bounds the float64 copy of a large batch
            chunks = [rows[s:s + step].to(torch.float64) for s in range(0, rows.shape[0], step)]
            a = torch.cat([c @ r for c in chunks])
            m = torch.cat([c.abs() @ r.abs() for c in chunks])
            if leaf.dim() >= 1 and leaf.shape[0] == nb:
                arg = a if arg is None else arg + a.to(arg.device)
                mag = m if mag is None else mag + m.to(mag.device)
            else:
                self._add(a, m)
        if arg is not None:
            self._add(arg, mag)

    def value(self) -> Tuple[float, float, float]:
        total = [0.0, 0.0, 0.0]
        for acc in self.acc.values():
            for i, v in enumerate(acc.tolist()):
                total[i] += v
        return tuple(total)


_CHANGED = (
    "data changed between passes: {what}. curvlab passes over the data many times and "
    "needs the same samples on every pass (the Hessian of one fixed loss): turn off random "
    "augmentation (random transforms in the dataset), do not combine drop_last=True with "
    "shuffle=True (each pass then drops other samples; drop_last=False is fine), and use a "
    "fixed data set (a DataLoader with shuffle=True over a fixed set is fine)")
_PADDING = (
    ". A collate_fn that pads each batch to its own longest sample is fine when it pads with "
    "zeros at the end of a dimension; with another pad value (e.g. labels padded with -100, a "
    "pad id that is not 0) or left padding, pad every batch to one fixed length, or, if the "
    "samples are the same on every pass, turn this check off with "
    "as_batches(data, check_data=False) and pass that as the data")
