"""K-FAC: a Kronecker-factored approximation of the generalised Gauss-Newton matrix.

For a layer ``s = W a`` (``nn.Linear``; ``nn.Conv2d`` on its input patches) with
weight and bias stacked as ``M = [W | b]`` (``out x (in + 1)``; the bias column
only when the layer has a trainable bias) and ``a`` extended by a 1, the GGN
block of ``M`` over ``m`` samples is

    (1/m) sum_d sum_j  (a_d a_d^T) (x) (g_dj g_dj^T),     g_dj = (d f_d / d s_d)^T S_d[:, j],

with ``S_d S_d^T = H_d`` a factor of sample ``d``'s output Hessian (exact, or
Monte-Carlo sampled labels; :func:`~curvlab.curvature.base.output_hessian_sqrt`).
For softmax cross-entropy ``H_d`` is the Fisher of the model's predictive
distribution, so ``g_dj`` are the output gradients of labels drawn from the
model.  K-FAC replaces the mean of Kronecker products by the Kronecker product
of means,

    C_M = A (x) G,    A = (1/(m T)) sum_{d,t} a_dt a_dt^T,    G = (1/m) sum_{d,t,j} g_dtj g_dtj^T,

which is exact for one sample (of a Linear).  ``t`` runs over the ``T`` positions
where the weight is shared: the extra leading dims of a Linear's input (sequences),
or repeated calls of one module, or, with ``conv="expand"``, the ``T = H' W'``
output locations of a convolution (KFC, Grosse & Martens 2016, "expand" in
Eschenhagen et al. 2023: each location's patch is an input ``a_dt`` and its output
gradient ``g_dtj``); ``T = 1`` for a plain Linear.  A convolution's default is
``conv="reduce"`` (Eschenhagen et al. 2023): one row per sample, its mean patch
``(1/T) sum_t a_dt`` and its summed output gradient ``sum_t g_dtj``, which keeps the
correlation of a sample's output gradients across locations (``"expand"`` drops it,
and with it most of the curvature along the Hessian's top eigenvector inside a
convolution block: :class:`KFAC`'s ``conv``).  With ``T`` positions, ``A`` is the mean
over samples *and* positions of the input second moment and ``G`` the mean over
samples of the *sum* over positions of the output-gradient second moment; their
product carries the factor ``1/(m^2 T)`` that the KFC derivation gives.  The flat parameter vector holds
``W`` row-major, so with ``V_M`` the ``out x (in + 1)`` matrix of a vector's entries
for this block, ``C_M v = vec(G V_M A)``.

Parameters of every other module (BatchNorm's scale and shift, grouped
convolutions, a Linear whose bias alone is trainable, ...) form a diagonal block
with the exact GGN diagonal, so ``C`` spans all trainable parameters and is
block-diagonal: ``C = blockdiag(A_1 (x) G_1, ..., A_L (x) G_L, diag(d))``.  For
parameters of leaf modules the diagonal comes from the same backward passes as
the ``G`` factors (per-sample gradients of each module from its recorded input
and output gradient, :class:`~curvlab.curvature.probes.LeafGradients`); any other
parameter (owned by a module with children, ...) gets
:func:`~curvlab.curvature.diag.ggn_diagonal` with ``diag_method`` in a second pass.

Each factor is eigendecomposed once (``A = Q_A diag(a) Q_A^T``, ``G = Q_G diag(g) Q_G^T``,
negative rounding clamped to 0), which gives per block

* the eigenpairs ``(g_i a_j, vec(q_G,i q_A,j^T))``, hence the global top-k without
  forming any ``n x n`` matrix;
* ``(C_M + d I)^{-1} v = vec(Q_G [(Q_G^T V_M Q_A) / (g a^T + d)] Q_A^T)``, exact.

Layers are found as modules (``named_modules``) and observed with forward
hooks during ``functional_call``: a layer whose weight is used without calling
the module (``F.linear(x, layer.weight)`` elsewhere) is not seen; a module never
called on the first batch is left to the diagonal block, and a Linear/Conv2d
parameter that another module owns as well (weight tying) raises.

Cost of building: one forward pass on the first batch (finding the layers
called), then one pass over the ``m`` samples with one forward and ``r``
backward passes per batch (``r`` = number of outputs for ``fisher="exact"``,
``mc_samples`` for ``"mc"``); then ``O(out^3 + in^3)`` per layer for the
eigendecompositions.  Afterwards ``matvec``, ``inverse`` and ``top_eigenpairs``
touch no data: ``O(sum_l out_l in_l (out_l + in_l))`` per vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..functional import FunctionalModel
from ..hvp import Cost
from ..loop import DataLoop
from .base import CurvatureApprox, Timer, absorb, approximation_loop, output_hessian_sqrt
from .probes import LeafGradients, ProbeRecord, discover_probes, probe_columns, probed_forward
from .diag import DIAG_METHODS, ggn_diagonal

__all__ = ["KFAC", "KFACBlock", "FISHER_TYPES", "CONV_FACTORS", "SUPPORTED_LAYERS"]

FISHER_TYPES = ("exact", "mc")
CONV_FACTORS = ("reduce", "expand")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class KFACBlock:
    """One Kronecker block ``A (x) G`` for the weight (and bias) of a layer.

    Attributes:
        weight, bias: parameter names (``bias`` ``None`` when there is no
            trainable bias; then ``A`` has no bias row/column).
        modules: names of the modules whose calls feed it (one, unless shared).
        index: ``(out, in + 1)`` (or ``(out, in)``) long tensor: the positions in
            the flat vector of the entries of ``M = [W | b]``, ``W`` flattened to
            ``out x in`` (``in = c_in * kh * kw`` for a convolution).
        A, G: the factors (see the module docstring).
        rows: sum over samples of the ``T`` weight-sharing positions (``m T``).
    """

    weight: str
    bias: str | None
    modules: List[str]
    index: Tensor
    A: Tensor | None = None
    G: Tensor | None = None
    rows: int = 0
    eig_A: Tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    eig_G: Tuple[Tensor, Tensor] | None = field(default=None, repr=False)


def _conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches of a convolution, one row per output location: ``(b * H' W', c_in kh kw)``."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return rearrange(patches, "b f l -> (b l) f")


class KFAC(CurvatureApprox):
    """Kronecker-factored GGN for ``nn.Linear`` and ``nn.Conv2d``; diagonal elsewhere.

    Args:
        fmodel, loss_fn, batches, max_samples, seed, cost: as for
            :class:`~curvlab.curvature.ggn.GGN`.  ``loss_fn`` must be a batch-mean of
            per-sample losses (checked); ``seed`` seeds the sampled labels.
        fisher: ``"exact"`` (the output Hessian's square root, any per-sample
            loss) or ``"mc"`` (``mc_samples`` labels per sample drawn from the
            model's softmax; softmax cross-entropy only).
        mc_samples: labels per sample for ``fisher="mc"``.
        diag_method, probes: how the diagonal entries of parameters outside leaf
            modules are computed (see :mod:`curvlab.curvature.diag`; leaf modules'
            parameters always get the exact diagonal, at no extra pass).
        conv: how a convolution's weight sharing over its ``T`` output locations is
            factored (Eschenhagen et al. 2023).  ``"reduce"`` (default): per sample,
            the mean patch ``a_d = (1/T) sum_t a_dt`` and the summed output gradient
            ``g_dj = sum_t g_dtj``, so ``A = (1/m) sum_d a_d a_d^T`` and ``G = (1/m)
            sum_{d,j} g_dj g_dj^T``: the exact block for one sample whose patches do
            not vary over locations, and it keeps the correlation of a sample's
            output gradients across locations.  ``"expand"``: every location a sample
            of its own (the module docstring), which drops that correlation: on a
            CIFAR ResNet-8 it put the Hessian's top eigenvector's curvature inside the
            convolution blocks 9-31x below the exact block's, "reduce" 1.2-6x
            (``experiments/bench_kfac_blocks.py``, BENCHMARKS.md issue-14 section).

    Attributes:
        blocks: the :class:`KFACBlock` objects, in module order.
        diag_names: parameters in the diagonal block; ``diagonal`` their entries ``(n_d,)``
            at the flat positions ``diag_index``.

    Raises:
        ValueError: the model has no ``nn.Linear``/``nn.Conv2d`` layer with a
            trainable weight used in the forward pass (K-FAC would be a mere
            diagonal: use ``"diag"``); ``fisher="mc"`` with a loss other than
            softmax cross-entropy; a loss that is not a batch mean.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()
        >>> X, Y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> K = KFAC(FunctionalModel(model), torch.nn.functional.cross_entropy, (X, Y))
        >>> values, vectors = K.top_eigenpairs(3)
        >>> torch.allclose(K.matvec(vectors), values[:, None].float() * vectors, atol=1e-5)
        True
    """

    name = "kfac"

    def __init__(self, fmodel: FunctionalModel, loss_fn: Callable, batches, *,
                 max_samples: int | None = None, seed: int = 0, cost: Cost | None = None,
                 fisher: str = "exact", mc_samples: int = 1, diag_method: str = "auto",
                 probes: int = 100, conv: str = "reduce"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if diag_method not in DIAG_METHODS:
            raise ValueError(f"diag_method must be one of {DIAG_METHODS}, got {diag_method!r}")
        if conv not in CONV_FACTORS:
            raise ValueError(f"conv must be one of {CONV_FACTORS}, got {conv!r}")
        self.conv = conv
        self.fmodel = fmodel
        self.loss_fn = loss_fn
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.cost = cost if cost is not None else Cost()
        scratch = Cost()
        with Timer(self.cost):
            self._find_layers()
            self.loop = loop = approximation_loop(fmodel, loss_fn, batches, max_samples, scratch)
            self.num_samples = loop.num_samples
            self._select(loop)
            self._accumulate(loop, seed)
            self._build_diagonal(loop, diag_method, probes, seed)
            for blk in self.blocks:
                if not (torch.isfinite(blk.A).all() and torch.isfinite(blk.G).all()):
                    raise ValueError(f"K-FAC factors of layer {blk.modules[0]!r} are not finite: check "
                                     "the model/inputs or use dtype=torch.float64")
                blk.eig_A = _eigh_psd(blk.A)
                blk.eig_G = _eigh_psd(blk.G)
            if not torch.isfinite(self.diagonal).all():
                raise ValueError("K-FAC's diagonal block is not finite: check the model/inputs")
        absorb(self.cost, scratch)
        self.loop.cost = self.cost  # later passes (none yet) book on the approximation's cost
        self._check_coverage()

    # -- building ------------------------------------------------------------------
    def _find_layers(self) -> None:
        spec = self.fmodel.spec
        module = self.fmodel.module
        flat = spec.slices()
        trainable = set(spec.names)
        name_of = {}
        for name, p in module.named_parameters():  # deduplicated: a shared tensor has one name
            name_of.setdefault(id(p), name)
        blocks: Dict[str, KFACBlock] = {}
        self._layer_of: Dict[str, str] = {}   # module name -> weight name
        for mname, mod in module.named_modules():
            if not isinstance(mod, SUPPORTED_LAYERS):
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                continue  # grouped convolution: its parameters go to the diagonal block
            w = name_of.get(id(mod.weight))
            if w is None or w not in trainable:
                continue
            b = name_of.get(id(mod.bias)) if mod.bias is not None else None
            b = b if b in trainable else None
            if w in blocks:
                if blocks[w].bias != b:
                    continue  # the same weight with another bias: leave the second use out
                blocks[w].modules.append(mname)
            else:
                out = mod.weight.shape[0]
                idx = torch.arange(flat[w].start, flat[w].stop).view(out, -1)
                if b is not None:
                    idx = torch.cat([idx, torch.arange(flat[b].start, flat[b].stop).view(out, 1)], 1)
                blocks[w] = KFACBlock(weight=w, bias=b, modules=[mname], index=idx)
            self._layer_of[mname] = w
        # a block parameter that some other module also uses directly would miss that use
        used = {id(p) for blk in blocks.values() for p in (self._param(blk.weight), self._param(blk.bias))
                if p is not None}
        for mname, mod in module.named_modules():
            if mname in self._layer_of:
                continue
            for p in mod.parameters(recurse=False):
                if id(p) in used:
                    raise ValueError(
                        f"module {mname!r} ({type(mod).__name__}) uses a parameter of a Linear/Conv2d "
                        "layer (weight tying): K-FAC cannot factor a parameter shared with another "
                        "kind of layer; use curvature 'diag' or 'ggn'")
        if not blocks:
            raise ValueError(
                "K-FAC found no nn.Linear or nn.Conv2d layer with a trainable weight in the model: "
                "it would be a mere diagonal approximation; use 'diag' (or 'ggn') instead")
        self.blocks = list(blocks.values())

    def _param(self, name: str | None):
        if name is None:
            return None
        return dict(self.fmodel.module.named_parameters())[name]

    def _select(self, loop: DataLoop) -> None:
        """Keep the layers a forward pass (this rank's first batch) calls as modules; plan the
        diagonal block."""
        modules = dict(self.fmodel.module.named_modules())
        covered = {blk.weight for blk in self.blocks} | {blk.bias for blk in self.blocks if blk.bias}
        leaf = LeafGradients(self.fmodel, [k for k in self.fmodel.spec.names if k not in covered])
        candidates = {**{mn: modules[mn] for mn in self._layer_of}, **leaf.modules}
        names = list(candidates)
        mask = torch.zeros(len(names), dtype=torch.float64, device=self.device)

        def local():  # a rank with no samples finds nothing; the ranks agree on the union
            found = discover_probes(self.fmodel, loop.parallel.local, candidates)
            mask.copy_(torch.tensor([float(n in found) for n in names], dtype=torch.float64))

        loop.parallel.sum_(local, mask)
        fired = {n for n, f in zip(names, mask.tolist()) if f > 0}
        keep = []
        for blk in self.blocks:
            blk.modules = [mn for mn in blk.modules if mn in fired]
            if blk.modules:
                keep.append(blk)
        if not keep:
            raise ValueError(
                "none of the model's nn.Linear/nn.Conv2d layers is called as a module with one "
                "batched tensor input in the forward pass, so K-FAC has no layer to factor; use "
                "'diag' or 'ggn' instead")
        self.blocks = keep
        self._layer_of = {mn: blk.weight for blk in keep for mn in blk.modules}
        self._block_modules = {mn: modules[mn] for mn in self._layer_of}
        covered = {blk.weight for blk in keep} | {blk.bias for blk in keep if blk.bias}
        self.diag_names = [k for k in self.fmodel.spec.names if k not in covered]
        self._leaf = LeafGradients(self.fmodel, self.diag_names)
        self._leaf.restrict(fired)

    def _accumulate(self, loop: DataLoop, seed: int) -> None:
        """One pass: ``A`` from the recorded inputs, ``G`` and the leaf diagonal from
        ``r`` backward passes per batch (module docstring); sums over this rank's batches,
        reduced over the ranks."""
        fm = self.fmodel
        by_weight = {blk.weight: blk for blk in self.blocks}
        zeros = lambda d: torch.zeros(d, d, dtype=fm.dtype, device=fm.device)  # noqa: E731
        A_sum = {w: zeros(blk.index.shape[1]) for w, blk in by_weight.items()}
        G_sum = {w: zeros(blk.index.shape[0]) for w, blk in by_weight.items()}
        rows = torch.zeros(len(by_weight) + 1, dtype=torch.float64, device=fm.device)  # + grad_samples
        slot = {w: i for i, w in enumerate(by_weight)}
        self._diag_sum = {k: torch.zeros_like(fm.params[k]) for k in self._leaf.names}
        gen = torch.Generator().manual_seed(seed)
        probed = {**self._block_modules, **self._leaf.modules}

        def local_sum():
            for index, x, y, nb in loop.local_batches():
                out, records, _ = probed_forward(fm, x, probed)
                S = output_hessian_sqrt(self.loss_fn, out.detach(), y, fisher=self.fisher,
                                        mc_samples=self.mc_samples, generator=gen, index=index)
                is_block = [rec.module in self._layer_of for rec in records]
                for rec, blocky in zip(records, is_block):
                    if blocky:
                        w = self._layer_of[rec.module]
                        a = self._features(rec, by_weight[w])
                        A_sum[w].add_(a.T @ a)
                        rows[slot[w]] += a.shape[0]
                for _, grads in probe_columns(out, S, [rec.probe for rec in records]):
                    for rec, blocky, g in zip(records, is_block, grads):
                        if blocky and g is not None:
                            w = self._layer_of[rec.module]
                            if g.dim() == 4 and isinstance(self._block_modules[rec.module], nn.Conv2d):
                                g = (g.sum((2, 3)) if self.conv == "reduce"
                                     else rearrange(g, "b o h w -> (b h w) o"))
                            else:
                                g = g.reshape(-1, g.shape[-1])
                            G_sum[w].add_(g.T @ g)
                    for k, v in self._leaf.square_sums(records, grads).items():
                        self._diag_sum[k].add_(v)
                rows[-1] += S.shape[2] * nb

        loop.reduce_(local_sum, *A_sum.values(), *G_sum.values(), *self._diag_sum.values())
        loop.parallel.sum_(lambda: None, rows)  # the counts apart: float64 would promote the factors
        loop.cost.grad_samples += int(rows[-1].item())
        m = self.num_samples
        for blk in self.blocks:
            w = blk.weight
            count = int(rows[slot[w]].item())
            if count == 0:
                raise ValueError(f"layer {blk.modules[0]!r} was not called in the forward pass")
            blk.rows = count
            blk.A = A_sum[w] / count
            blk.G = G_sum[w] / m

    def _features(self, rec: ProbeRecord, blk: KFACBlock) -> Tensor:
        """Rows ``a_dt`` (with a trailing 1 for the bias): one per sample and location, or, for a
        convolution with ``conv="reduce"``, one per sample (its mean patch)."""
        mod = self._block_modules[rec.module]
        a = rec.inputs
        if isinstance(mod, nn.Conv2d):
            if a.dim() != 4:
                raise ValueError(f"Conv2d {rec.module!r} got an input of shape {tuple(a.shape)}: "
                                 "K-FAC needs batched (b, c, h, w) inputs")
            b = a.shape[0]
            a = _conv_patches(mod, a)
            if self.conv == "reduce":  # one row per sample: its mean patch
                a = a.reshape(b, -1, a.shape[-1]).mean(1)
        else:
            a = a.reshape(-1, a.shape[-1])
        if blk.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def _build_diagonal(self, loop: DataLoop, method: str, probes: int, seed: int) -> None:
        spec = self.fmodel.spec
        m = self.num_samples
        d = {k: v / m for k, v in self._diag_sum.items()}
        if self._leaf.rest:
            d.update(ggn_diagonal(self.fmodel, self.loss_fn, loop, self._leaf.rest, method=method,
                                  probes=probes, seed=seed + 1, fisher=self.fisher,
                                  mc_samples=self.mc_samples, cost=loop.cost))
        flat = spec.slices()
        if self.diag_names:
            self.diag_index = torch.cat([torch.arange(flat[k].start, flat[k].stop) for k in self.diag_names])
            self.diagonal = torch.cat([d[k].reshape(-1) for k in self.diag_names]).clamp_min(0)
        else:
            self.diag_index = torch.zeros(0, dtype=torch.long)
            self.diagonal = torch.zeros(0, dtype=self.dtype, device=self.device)
        self.diag_index = self.diag_index.to(self.device)
        for blk in self.blocks:
            blk.index = blk.index.to(self.device)

    def _check_coverage(self) -> None:
        count = self.diag_index.numel() + sum(blk.index.numel() for blk in self.blocks)
        seen = torch.cat([self.diag_index] + [blk.index.reshape(-1) for blk in self.blocks])
        if count != self.n or seen.unique().numel() != self.n:  # a bug, not a user error
            raise RuntimeError(f"K-FAC blocks cover {count} of {self.n} parameters")

    @property
    def factors(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{weight name: (A, G)}``, the Kronecker factors."""
        return {blk.weight: (blk.A, blk.G) for blk in self.blocks}

    # -- operator ------------------------------------------------------------------
    def _matvec(self, V: Tensor) -> Tensor:
        out = torch.empty_like(V)
        for blk in self.blocks:
            VM = V[:, blk.index]                                 # (k, out, in + 1)
            out[:, blk.index] = blk.G @ VM @ blk.A
        out[:, self.diag_index] = V[:, self.diag_index] * self.diagonal
        return out

    def _inverse(self, V: Tensor, damping: float) -> Tensor:
        out = torch.empty_like(V)
        for blk in self.blocks:
            (la, Qa), (lg, Qg) = blk.eig_A, blk.eig_G
            VM = Qg.T @ V[:, blk.index] @ Qa
            VM = VM / (lg[:, None] * la[None, :] + damping)
            out[:, blk.index] = Qg @ VM @ Qa.T
        out[:, self.diag_index] = V[:, self.diag_index] / (self.diagonal + damping)
        return out

    def _top_eigenpairs(self, k: int) -> Tuple[Tensor, Tensor]:
        values, where = [], []        # candidate eigenvalues and (block, i, j) / (-1, p, -1)
        for b, blk in enumerate(self.blocks):
            (la, _), (lg, _) = blk.eig_A, blk.eig_G
            prod = (lg[:, None] * la[None, :]).reshape(-1)
            top, flat_idx = torch.topk(prod, min(k, prod.numel()))
            values.append(top)
            i, j = flat_idx // la.numel(), flat_idx % la.numel()
            where.append(torch.stack([torch.full_like(i, b), i, j], 1))
        if self.diagonal.numel():
            top, p = torch.topk(self.diagonal, min(k, self.diagonal.numel()))
            values.append(top)
            where.append(torch.stack([torch.full_like(p, -1), p, torch.full_like(p, -1)], 1))
        values = torch.cat(values)
        where = torch.cat(where)
        top, order = torch.topk(values, k)
        vectors = torch.zeros(k, self.n, dtype=self.dtype, device=self.device)
        for row, (b, i, j) in enumerate(where[order].tolist()):
            if b < 0:
                vectors[row, self.diag_index[i]] = 1
            else:
                blk = self.blocks[b]
                qa, qg = blk.eig_A[1][:, j], blk.eig_G[1][:, i]
                vectors[row, blk.index] = qg[:, None] * qa[None, :]
        return top.double().cpu(), vectors


def _eigh_psd(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD factor; negative rounding clamped to 0."""
    lam, Q = torch.linalg.eigh((M + M.T) / 2)
    return lam.clamp_min(0), Q
