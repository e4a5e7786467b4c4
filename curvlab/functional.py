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



# --------------------------------------------------------------------------- pure functions

def hvp(f, params, v):
    """Hessian-vector product ``H v`` of a scalar function ``f`` at ``params``, as in ``torch.func``.

    ``H = d^2 f / d params^2`` at ``params``, and ``H v = d/dt grad f(params + t v)``
    at ``t = 0``, computed forward-over-reverse: ``torch.func.jvp(torch.func.grad(f),
    (params,), (v,))``.  Nothing is stored, nothing of ``params`` is written.

    Args:
        f: ``f(params) -> scalar tensor``, differentiable by ``torch.func``.
        params: a tensor or a pytree of tensors (e.g. a dict ``{name: tensor}``).
        v: the direction, the same structure, shapes and dtypes as ``params``.

    Returns:
        ``H v``, the same structure and shapes as ``params``.

    Cost: one forward and one backward pass of ``f`` carrying one tangent, about
    two to three times a gradient.  Composes with ``torch.func.vmap`` over ``v``
    for a block of directions.

    Example:
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> hvp(f, {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([6., 0.])
    """
    return torch.func.jvp(torch.func.grad(f), (params,), (v,))[1]


def loss_hvp(model: nn.Module, loss_fn, params, batch, v, *, output_fn=None):
    """Hessian-vector product of a model's batch loss: ``H_b v`` with ``H_b`` the Hessian of

        ``L_b(params) = loss_fn(output_fn(model(x; params)), y)``,  ``(x, y) = batch``,

    with respect to ``params`` (the trainable parameters); buffers and frozen
    parameters are the model's own, held fixed.  The model is evaluated as it
    is (its mode is not changed): put it in eval mode (:func:`evaluation_mode`)
    for the Hessian that :class:`~curvlab.hvp.HessianOperator` and
    :func:`curvlab.extremes` use.  ``H`` of the full-data mean loss is the
    size-weighted mean of ``H_b`` over batches (``loss_fn`` a batch mean).

    Args:
        model: the network; only read.
        loss_fn: ``loss_fn(output, target) -> scalar``.
        params: ``{name: tensor}`` of the trainable parameters, or ``None`` for the
            model's current ones (those with ``requires_grad=True``, detached).
        batch: ``(x, y)``; a tuple ``x`` is passed as positional arguments.
        v: the direction: a dict like ``params``, or a flat tensor ``(n,)`` in the
            order of ``params`` (of ``model.named_parameters()`` for ``None``),
            e.g. ``ExtremesResult.vector_max``.
        output_fn: applied to the model's output before ``loss_fn``.

    Returns:
        ``H_b v`` as a dict like ``params``, or flat ``(n,)`` when ``v`` is flat.

    Cost: one forward and one backward pass over the batch with one tangent
    (about two to three gradients of the batch).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> loss_hvp(model, torch.nn.functional.cross_entropy, None, batch, torch.ones(8)).shape
        torch.Size([8])
    """
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    params = dict(params)
    others = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]
              if n not in params}
    x, y = batch
    args = x if isinstance(x, tuple) else (x,)

    def f(p):
        out = functional_call(model, (p, others), args)
        return loss_fn(out if output_fn is None else output_fn(out), y)

    if isinstance(v, Tensor):
        spec = ParamSpec.from_tensors(params)
        if v.shape != (spec.numel,):
            raise ValueError(f"a flat v must have shape ({spec.numel},), one entry per parameter, "
                             f"got {tuple(v.shape)}")
        return spec.flatten(hvp(f, params, spec.unflatten(v.contiguous())))
    return hvp(f, params, v)


def unflatten(model: nn.Module, vector: Tensor) -> Dict[str, Tensor]:
    """A flat vector over the model's trainable parameters as ``{name: tensor}``.

    The inverse of concatenating ``p.reshape(-1)`` over ``model.named_parameters()``
    with ``requires_grad=True``, in that order: the layout of every flat vector
    curvlab returns (``ExtremesResult.vector_max``, ``vector_min``,
    :meth:`FunctionalModel.flat_params`, operator products).  A block ``(k, n)``
    gives tensors of shape ``(k, *p.shape)``.  The tensors are views of
    ``vector`` (its dtype and device).

    Example:
        >>> r = curvlab.extremes(model, loss_fn, data)
        >>> top = curvlab.unflatten(model, r.vector_max)
        >>> {name: float(t.norm()) for name, t in top.items()}   # where the top eigenvector lives

    Raises:
        TypeError: ``vector`` is not a tensor (``None``: that end was not computed).
        ValueError: its length is not the number of trainable parameters.
    """
    if not isinstance(vector, Tensor):
        raise TypeError(f"vector must be a tensor of shape (n,) or (k, n), got {type(vector).__name__}"
                        + (" (an end that was not computed has no vector)" if vector is None else ""))
    spec = ParamSpec.from_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})
    if vector.dim() not in (1, 2) or vector.shape[-1] != spec.numel:
        raise ValueError(
            f"vector of shape {tuple(vector.shape)} does not fit the model: it has {spec.numel} "
            f"trainable parameters in {len(spec.names)} tensors, so a vector has shape "
            f"({spec.numel},) or (k, {spec.numel}); was it computed for another model, or with "
            "other parameters frozen?")
    return spec.unflatten(vector) if vector.dim() == 1 else spec.unflatten_block(vector)


__all__ += ["hvp", "loss_hvp", "unflatten"]
