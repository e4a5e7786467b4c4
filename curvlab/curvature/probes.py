"""Layer probes shared by K-FAC and the diagonal approximation.

:func:`probed_forward`, :func:`probe_columns` and :class:`LeafGradients`: one
forward pass records each probed module's input and a zero "probe" added to its
output; one backward pass per column of ``S`` (a factor of the output Hessian,
:func:`~curvlab.curvature.base.output_hessian_sqrt`) then gives every module's
per-sample output gradients ``J_{s,d}^T S_d[:, j]``, from which K-FAC builds its
``G`` factors and the diagonal its per-sample parameter gradients (module by
module, without another network pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..functional import FunctionalModel, batch_size_of
from .base import sample_batches

__all__ = ["ProbeRecord", "probed_forward", "probe_columns", "discover_probes", "LeafGradients"]


@dataclass
class ProbeRecord:
    """One call of a probed module during a forward pass.

    Attributes:
        module: the module's name in the model.
        inputs: its (single, batched) input, detached.
        probe: a zero tensor shaped like its output, added to that output; the
            gradient of anything w.r.t. ``probe`` is the gradient w.r.t. the
            module's output (unaffected by later in-place operations on it).
    """

    module: str
    inputs: Tensor
    probe: Tensor


def probed_forward(fmodel: FunctionalModel, x, modules: Dict[str, nn.Module]
                   ) -> Tuple[Tensor, List[ProbeRecord], set]:
    """Forward pass with a zero probe added to each call's output of ``modules``.

    Returns ``(output, records, unsupported)``: the network output (in a graph
    reaching the probes), one :class:`ProbeRecord` per call, and the names of
    modules called with other than one batched tensor input and one tensor
    output (they get no probe).  Hooks are removed also on error.
    """
    records: List[ProbeRecord] = []
    unsupported: set = set()
    b = batch_size_of(x)

    def make_hook(name):
        def hook(mod, inputs, output):
            if (len(inputs) != 1 or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor)
                    or inputs[0].dim() == 0 or inputs[0].shape[0] != b or output.dim() == 0
                    or output.shape[0] != b):
                unsupported.add(name)
                return None
            e = torch.zeros_like(output, requires_grad=True)
            records.append(ProbeRecord(name, inputs[0].detach(), e))
            return output + e
        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in modules.items()]
    try:
        with torch.enable_grad():
            out = fmodel(fmodel.params, x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returned a {type(out).__name__}; curvature approximations need "
                        "a tensor output of shape (batch, ...)")
    return out, records, unsupported


def probe_columns(out: Tensor, S: Tensor, probes: List[Tensor]) -> Iterator[Tuple[int, List[Tensor | None]]]:
    """For each column ``j`` of ``S`` ``(b, c, r)``: gradients of ``sum_d <S_d[:, j], f_d>``
    w.r.t. ``probes`` (``None`` where a probe does not reach the output).

    Row ``d`` of each gradient is sample ``d``'s "Gauss-Newton output gradient"
    (the network's samples are independent in eval mode).  Cost: one backward
    pass per column.
    """
    r = S.shape[2]
    for j in range(r):
        cot = S[:, :, j].reshape(out.shape)
        if not probes or not out.requires_grad:
            yield j, [None] * len(probes)
            continue
        grads = torch.autograd.grad(out, probes, grad_outputs=cot, retain_graph=j < r - 1,
                                    allow_unused=True)
        yield j, list(grads)


def discover_probes(fmodel: FunctionalModel, data, modules: Dict[str, nn.Module]) -> set:
    """Names of ``modules`` that a forward pass on the first batch calls as probe-able.

    One forward pass (no backward).  Modules that are not called (their
    parameters used functionally elsewhere) or are called with other than one
    batched tensor input/output are left out.
    """
    for _, x, _, _ in sample_batches(fmodel, data, None):
        _, records, unsupported = probed_forward(fmodel, x, modules)
        return {r.module for r in records} - unsupported
    return set()


class LeafGradients:
    """Per-sample gradients of the directly owned trainable parameters of leaf modules.

    For a module without children whose call maps a batch input ``a`` to an
    output ``s`` sample by sample (true in eval mode for Linear, Conv,
    BatchNorm, LayerNorm, ...), the gradient of ``sum_d <g_d, s_d>`` w.r.t. its
    parameters, per sample ``d``, involves that module alone: no pass through
    the rest of the network: ``vmap`` over samples of ``grad`` of the module
    alone, or a closed form for BatchNorm with running statistics
    (``sum_t g_dt * xhat_dt`` and ``sum_t g_dt``; measured several times faster
    than the vmapped module on CPU).  K-FAC uses it for the parameters it
    leaves to its diagonal block, at no extra network pass.

    Args:
        fmodel: the model.
        names: trainable parameter names of interest.

    Attributes:
        modules: ``{module name: module}`` of the leaf modules owning some of ``names``.
        local: ``{module name: {local param name: spec name}}``.
        rest: names not owned by such a module (shared, owned by a module with
            children, ...): they need another method.
    """

    def __init__(self, fmodel: FunctionalModel, names):
        self.fmodel = fmodel
        self._all = list(names)
        wanted = set(names)
        spec_name = {}
        for name, p in fmodel.module.named_parameters():
            spec_name.setdefault(id(p), name)
        self.modules: Dict[str, nn.Module] = {}
        self.local: Dict[str, Dict[str, str]] = {}
        tainted = set()   # also owned by a module with children: its per-sample gradient needs more
        for mname, mod in fmodel.module.named_modules():
            local = {ln: spec_name.get(id(p)) for ln, p in mod.named_parameters(recurse=False)}
            local = {ln: full for ln, full in local.items() if full in wanted}
            if not local:
                continue
            if next(mod.children(), None) is not None:
                tainted |= set(local.values())
            else:
                self.modules[mname], self.local[mname] = mod, local
        self._drop(tainted)

    def _drop(self, params: set) -> None:
        for mname in list(self.modules):
            self.local[mname] = {ln: f for ln, f in self.local[mname].items() if f not in params}
            if not self.local[mname]:
                del self.modules[mname], self.local[mname]
        covered = set(self.names)
        self.rest = [k for k in self._all if k not in covered]

    def restrict(self, keep: set) -> None:
        """Keep only the modules ``keep`` (probe-able ones); parameters that any
        other module also owns go to :attr:`rest`."""
        self._drop({f for m, loc in self.local.items() if m not in keep for f in loc.values()})

    @property
    def names(self) -> List[str]:
        """The parameters handled here (each once, in the order of ``names`` given)."""
        owned = {full for loc in self.local.values() for full in loc.values()}
        return [k for k in self._all if k in owned]

    def per_sample(self, record: ProbeRecord, g: Tensor) -> Dict[str, Tensor]:
        """``{spec name: (b, *shape)}``: per-sample gradients of ``<g_d, s_d>`` for one call."""
        mname = record.module
        mod, local = self.modules[mname], self.local[mname]
        prefix = mname + "." if mname else ""
        fm = self.fmodel
        trainable = {ln: fm.params[full] for ln, full in local.items()}
        fixed = {}
        for ln, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if ln not in trainable:
                fixed[ln] = fm.buffers.get(prefix + ln, fm.params.get(prefix + ln, t))

        grads = _closed_form_per_sample(mod, set(trainable), fixed, record.inputs, g)
        if grads is None:
            def inner(p, a_d, g_d):
                s = functional_call(mod, {**p, **fixed}, (a_d[None],))
                return (s * g_d[None]).sum()

            grads = vmap(grad(inner), in_dims=(None, 0, 0))(trainable, record.inputs, g)
        return {local[ln]: v.reshape(-1, *trainable[ln].shape) for ln, v in grads.items()}

    def square_sums(self, records: List[ProbeRecord], grads: List[Tensor | None]) -> Dict[str, Tensor]:
        """``{spec name: sum_d (per-sample gradient)^2}`` for one column's probe gradients.

        Calls of modules sharing a parameter add up per sample before squaring.
        """
        per: Dict[str, Tensor] = {}
        for rec, g in zip(records, grads):
            if g is None or rec.module not in self.modules:
                continue
            for k, v in self.per_sample(rec, g).items():
                per[k] = v if k not in per else per[k] + v
        return {k: v.square().sum(0) for k, v in per.items()}


def _closed_form_per_sample(mod: nn.Module, wanted: set, fixed: Dict[str, Tensor], a: Tensor,
                            g: Tensor) -> Dict[str, Tensor] | None:
    """Per-sample gradients of ``<g_d, mod(a)_d>`` in closed form (BatchNorm with running
    statistics: ``sum_t g_dt * xhat_dt`` and ``sum_t g_dt``); ``None`` for other modules."""
    out: Dict[str, Tensor] = {}
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training \
            and mod.track_running_stats and "running_mean" in fixed and a.dim() >= 2:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        dims = tuple(range(2, a.dim()))
        if "weight" in wanted:
            xhat = (a - fixed["running_mean"].view(shape)) / (fixed["running_var"].view(shape) + mod.eps).sqrt()
            out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
        if "bias" in wanted:
            out["bias"] = g.sum(dims) if dims else g
        return out
    return None
