"""Nested batch structures: a batch's input or target as a tensor, or a tuple, list,
namedtuple or mapping of them (any depth).  Walking, cutting and joining them by
samples (the leading dimension of every tensor).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .functional import sequence_like


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
        return sequence_like(first, (_tree_cat([t[i] for t in trees]) for i in range(len(first))))
    raise TypeError(f"a batch holds a {type(first).__name__}")


def _tree_rows(tree, index):
    """Rows ``index`` (a slice or index tensor) of every tensor in a tree."""
    if isinstance(tree, Tensor):
        return tree[index]
    if isinstance(tree, Mapping):
        return {k: _tree_rows(v, index) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return sequence_like(tree, (_tree_rows(v, index) for v in tree))
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


def _tensor_tree(t) -> bool:
    """``t`` is a tensor, or a non-empty tuple, list or dict of tensor trees."""
    if isinstance(t, Tensor):
        return True
    items = t.values() if isinstance(t, Mapping) else t if isinstance(t, (list, tuple)) else None
    return bool(items) and all(_tensor_tree(v) for v in items)


def _rows_or_none(tree, rows: slice, nb: int):
    """:func:`_tree_rows`, or ``None`` when some leaf is not a tensor with ``nb`` rows."""
    leaves = [leaf for _, leaf in _leaves(tree)]
    if not leaves or any(not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != nb for t in leaves):
        return None
    return _tree_rows(tree, rows)
