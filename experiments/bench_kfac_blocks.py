"""Where K-FAC loses the Hessian's top outlier on a CNN (issue 14): Kronecker factors or blocks?

On the ResNet-8 with BatchNorm of ``experiments/bench_floors.py`` (2,048 CIFAR-10 images, 16x16,
checkpoints ``small``: 10 epochs, and ``small-fit``: 40 epochs, 100 % train accuracy), K-FAC's
top eigenvalue is a small fraction of the Gauss-Newton matrix's.  Two approximations stand
between them, and this script measures each along the Hessian's top eigenvector ``u`` (float64
Lanczos, cached by ``bench_floors``):

* **block-diagonal**: K-FAC keeps only the layer blocks ``G_ll`` (and a diagonal for BatchNorm
  and the rest) and drops every coupling between layers.  ``u^T G u`` splits into the blocks'
  own parts ``sum_l u_l^T G_ll u_l`` and the cross-layer rest; an outlier that several layers
  carry together (the class-mean directions of Papyan 2019 run through the whole network) lives
  in the cross terms, which no block-diagonal approximation can keep;
* **Kronecker factors within a block**: ``u_l^T (A_l (x) G_l) u_l`` against the exact
  ``u_l^T G_ll u_l`` (the factorisation's error on the direction that matters), for both
  factorisations of a convolution's weight sharing (``KFAC(conv="reduce" | "expand")``,
  Eschenhagen et al. 2023).

Per block: its share ``||u_l||^2`` of ``u``, the Rayleigh quotients of ``u_l / ||u_l||`` on the
exact block and on K-FAC's, and K-FAC's top eigenvalue of the block; in total: ``u^T H u``,
``u^T G u``, its block-diagonal part, ``u^T K u``, and the top eigenvalues of ``G`` (Lanczos on
GGN products) and ``K``.  One GGN product of the block of masked vectors does the per-block part.

Run (1 thread)::

    OMP_NUM_THREADS=1 python -m experiments.bench_kfac_blocks --json runs/kfac_blocks.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from curvlab.curvature.ggn import GGN
from curvlab.curvature.kfac import CONV_FACTORS, KFAC
from curvlab.functional import FunctionalModel
from curvlab.hvp import HessianOperator
from curvlab.lanczos import lanczos
from experiments.bench_correctness import small_checkpoint
from experiments.bench_floors import CASES, eigenvectors, load_small_case, log, small_case_parser


def blocks_of(K: KFAC) -> list:
    """``[(name, flat index)]``: K-FAC's layer blocks, then its diagonal block (BatchNorm, ...)."""
    out = [(blk.weight.rsplit(".", 1)[0], blk.index.reshape(-1)) for blk in K.blocks]
    if K.diag_index.numel():
        out.append(("diagonal (BatchNorm, ...)", K.diag_index))
    return out


def analyse(model, X, Y, u: torch.Tensor, lam_H: float) -> dict:
    fm = FunctionalModel(model, dtype=torch.float64)
    H = HessianOperator(None, F.cross_entropy, (X, Y), fmodel=fm, batch_size=512)
    G = GGN(fm, F.cross_entropy, (X, Y))
    Ks = {conv: KFAC(fm, F.cross_entropy, (X, Y), conv=conv) for conv in CONV_FACTORS}
    u = (u / u.norm()).to(torch.float64)
    parts = blocks_of(Ks["reduce"])
    U = torch.zeros(len(parts), u.numel(), dtype=torch.float64)
    for i, (_, idx) in enumerate(parts):
        U[i, idx] = u[idx]
    block = torch.cat([U, u[None]])
    GU = G.matvec(block)
    KU = {conv: K.matvec(block) for conv, K in Ks.items()}
    rows = []
    for i, (name, idx) in enumerate(parts):
        mass = float(U[i] @ U[i])
        ul = U[i]
        rows.append(dict(block=name, params=int(idx.numel()), share=mass,
                         rq_ggn=float(ul @ GU[i]) / mass if mass > 0 else 0.0,
                         **{f"rq_kfac_{c}": float(ul @ KU[c][i]) / mass if mass > 0 else 0.0 for c in Ks},
                         **{f"kfac_top_{c}": _block_top(K, i) for c, K in Ks.items()}))
    uGu = float(u @ GU[-1])
    diag_part = sum(r["share"] * r["rq_ggn"] for r in rows)
    uHu = float(u @ H.matvec(u))
    g = lanczos(G.matvec, G.n, which="LA", k=1, tol=1e-4, max_matvecs=150, dtype=torch.float64, seed=0)
    out = dict(rayleigh_hessian=uHu, lambda_hessian=lam_H, rayleigh_ggn=uGu, ggn_block_diagonal_part=diag_part,
               ggn_cross_layer_part=uGu - diag_part, top_ggn=float(g.values.max()),
               ggn_products=int(g.matvecs), blocks=rows)
    for c, K in Ks.items():
        vals, vecs = K.top_eigenpairs(1)
        out[f"rayleigh_kfac_{c}"] = float(u @ KU[c][-1])
        out[f"top_kfac_{c}"] = float(vals[0])
        out[f"overlap_kfac_top_{c}"] = float((vecs[0].double() @ u).abs())
    return out


def _block_top(K: KFAC, i: int) -> float:
    if i < len(K.blocks):
        (la, _), (lg, _) = K.blocks[i].eig_A, K.blocks[i].eig_G
        return float(la.max() * lg.max())
    return float(K.diagonal.max()) if K.diagonal.numel() else 0.0


def main(argv=None):
    args = small_case_parser(__doc__).parse_args(argv)
    cache, data, X, Y = load_small_case(args)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), cases={})
    for name, epochs in CASES.items():
        model, meta = small_checkpoint(cache, data, name, epochs)
        eig = eigenvectors(cache, name, model, X, Y)
        out = analyse(model, X, Y, eig["max"], float(eig["values"][-1]))
        out["train_acc"] = meta["train_acc"]
        report["cases"][name] = out
        log(f"{name} (train acc {meta['train_acc']:.3f}): u^T H u {out['rayleigh_hessian']:.4g}, "
            f"u^T G u {out['rayleigh_ggn']:.4g} = blocks {out['ggn_block_diagonal_part']:.4g} + cross "
            f"{out['ggn_cross_layer_part']:.4g}; top G {out['top_ggn']:.4g}; "
            + "; ".join(f"{c}: u^T K u {out[f'rayleigh_kfac_{c}']:.4g}, top K {out[f'top_kfac_{c}']:.4g}, "
                        f"|<top K vector, u>| {out[f'overlap_kfac_top_{c}']:.3f}" for c in CONV_FACTORS))
        for r in out["blocks"]:
            log(f"   {r['block']:>28} ({r['params']:>5} params): share {r['share']:.3f}, "
                f"RQ exact block {r['rq_ggn']:.4g}, "
                + ", ".join(f"{c} {r[f'rq_kfac_{c}']:.4g} (block top {r[f'kfac_top_{c}']:.4g})"
                            for c in CONV_FACTORS))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
