"""A model seen as a pure function of a flat parameter vector.

The Hessian that curvlab computes is that of the loss as a function of the
model's *trainable* parameters (those with ``requires_grad=True``), with every
other tensor (frozen parameters, buffers such as BatchNorm running statistics)
held fixed.  This module owns that view:

* :class:`ParamSpec` maps between a dict of named tensors and one flat vector
  of length ``n = sum(p.numel())`` (the ordering is that of
  ``model.named_parameters()``), and between a block of ``k`` flat vectors of
  shape ``(k, n)`` and a dict of tensors with a leading ``k`` dimension.
* :class:`FunctionalModel` holds *copies* of the parameters and buffers (so the
  caller's model is never written to) and evaluates
  ``torch.func.functional_call(model, (params, buffers), x)``.
* :func:`evaluation_mode` puts a model in eval mode and restores every
  submodule's own ``training`` flag afterwards, also when an error escapes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["ParamSpec", "FunctionalModel", "evaluation_mode", "check_dtype", "compute_dtype"]


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the parameters inside a flat vector.

    Example:
        >>> spec = ParamSpec.from_tensors({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
        >>> spec.numel
        8
        >>> spec.unflatten(torch.arange(8.))["b"]
        tensor([6., 7.])
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @staticmethod
    def from_tensors(tensors: Dict[str, Tensor]) -> "ParamSpec":
        return ParamSpec(tuple(tensors), tuple(t.shape for t in tensors.values()))

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Dict[str, Tensor]) -> Tensor:
        """Dict of tensors (shapes as in the spec) -> flat vector ``(n,)``."""
        return torch.cat([tensors[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: Tensor) -> Dict[str, Tensor]:
        """Flat vector ``(n,)`` -> dict of views with the spec's shapes."""
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten_block(self, tensors: Dict[str, Tensor]) -> Tensor:
        """Dict of tensors with a leading block dim ``k`` -> ``(k, n)``."""
        return torch.cat([tensors[name].flatten(1) for name in self.names], dim=1)

    def unflatten_block(self, block: Tensor) -> Dict[str, Tensor]:
        """Block ``(k, n)`` -> dict of ``(k, *shape)`` views."""
        chunks = torch.split(block, self.numels, dim=1)
        k = block.shape[0]
        return {n: c.reshape(k, *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def slices(self) -> Dict[str, slice]:
        """Where each named parameter lives inside the flat vector."""
        out, start = {}, 0
        for name, numel in zip(self.names, self.numels):
            out[name] = slice(start, start + numel)
            start += numel
        return out


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's flag on exit.

    ``model.train(previous)`` would not do: a caller may keep some submodules
    in eval mode (a frozen BatchNorm) inside a training model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def sequence_like(x, items):
    """A tuple or list of ``x``'s type holding ``items``.

    A namedtuple takes its items as positional arguments, any other sequence
    type (tuple, list, ``torch.return_types``) the iterable itself.
    """
    items = list(items)
    return type(x)(*items) if hasattr(type(x), "_fields") else type(x)(items)


class FunctionalModel:
    """A model as a pure function ``(params, x) -> output``.

    Args:
        model: any ``nn.Module``.  It is only read: its trainable parameters
            and its buffers are copied (detached, cast to ``dtype``, moved to
            ``device``); its frozen parameters are treated as buffers.
        dtype: floating dtype of the copies and of floating inputs, at least
            32 bits (``float32`` or ``float64``); ``None`` keeps the parameters'
            own dtype, except that a half-precision model (``float16``,
            ``bfloat16``) is computed in ``float32``: a Krylov basis and
            eigen-solves in 8 bits of mantissa would carry no digits.
        device: device of the copies and of the inputs; ``None`` keeps the
            parameters' own device.
        output_fn: applied to the model's output before anything else sees it
            (e.g. ``lambda out: out[0]`` for a model returning ``(logits, extra)``,
            ``lambda out: out.logits`` for a ``ModelOutput``); ``None``: the
            output as it is.

    Raises:
        ValueError: the model has no parameter with ``requires_grad=True``.
        TypeError: ``dtype`` is not a floating torch dtype; ``output_fn`` is not callable.
        ValueError: ``dtype`` is half precision.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, output_fn=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype is not None:
            check_dtype(dtype)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable (e.g. lambda out: out[0]) or None, "
                            f"got {type(output_fn).__name__}")
        self.output_fn = output_fn
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(
                "model has no trainable parameters (none has requires_grad=True): "
                "the Hessian is taken with respect to trainable parameters, so "
                "unfreeze the ones you want, e.g. p.requires_grad_(True)")
        first = next(iter(trainable.values()))
        self.dtype = dtype if dtype is not None else compute_dtype(first.dtype)
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype}")
        self.device = torch.device(device) if device is not None else first.device
        self.module = model
        self.params = {n: p.detach().to(self.device, self.dtype).clone() for n, p in trainable.items()}
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())
        self.buffers = {n: self._cast(t).clone() for n, t in {**frozen, **buffers}.items()}
        self.spec = ParamSpec.from_tensors(self.params)

    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach().to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    @property
    def numel(self) -> int:
        """Number of trainable parameters ``n`` (the Hessian is ``n x n``)."""
        return self.spec.numel

    def flat_params(self) -> Tensor:
        """The trainable parameters as one flat vector ``(n,)``."""
        return self.spec.flatten(self.params)

    def to_input(self, x):
        """Move a batch's input to the model's device and (if floating) dtype.

        Tensors inside tuples (namedtuples too), lists and mappings are moved; a
        mapping (``dict``, ``UserDict``, a ``BatchEncoding``) comes back as a ``dict``.
        """
        if isinstance(x, Tensor):
            return self._cast(x)
        if isinstance(x, (list, tuple)):
            return sequence_like(x, (self.to_input(t) for t in x))
        if isinstance(x, Mapping):
            return {k: self.to_input(v) for k, v in x.items()}
        return x

    def to_target(self, y):
        """Move a batch's target to the device; floating targets get the dtype."""
        return self.to_input(y)

    def __call__(self, params: Dict[str, Tensor], x) -> Tensor:
        """``output_fn(model(x))`` evaluated at ``params`` (a dict like :attr:`params`)."""
        args = x if isinstance(x, tuple) else (x,)
        out = functional_call(self.module, (params, self.buffers), args)
        return out if self.output_fn is None else self.output_fn(out)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model of parameter dtype ``dtype`` is computed in: half precision -> float32."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def check_dtype(dtype) -> None:
    """Raise unless ``dtype`` is a floating torch dtype of at least 32 bits (``ValueError`` for half)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype such as torch.float32 or torch.float64 (or None "
                        f"for the model's), got {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (torch.float32 or torch.float64), got {dtype}")
    if torch.finfo(dtype).bits < 32:
        raise ValueError(
            f"dtype={dtype} is half precision, too coarse for Hessian eigenvalues (a Lanczos basis "
            "and its eigen-solves in half precision carry no reliable digits): use torch.float32 "
            "or torch.float64, or leave dtype=None (a half-precision model is then computed in "
            "float32 on copies of its parameters)")


def batch_size_of(x) -> int:
    """Number of samples in a batch input (first dim of its first tensor)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("a batch input is a 0-dim tensor: inputs need a leading batch dimension "
                             "that counts the samples (e.g. x.unsqueeze(0) for a single sample)")
        return x.shape[0]
    if isinstance(x, (list, tuple)) and x:
        return batch_size_of(x[0])
    if isinstance(x, Mapping) and x:
        return batch_size_of(next(iter(x.values())))
    raise TypeError(f"cannot tell the batch size of an input of type {type(x).__name__}")

