"""curvlab: extreme eigenvalues of the Hessian of a neural network's full-data loss.

The main entry point is :func:`curvlab.extremes`::

    import curvlab, torch
    r = curvlab.extremes(model, torch.nn.functional.cross_entropy, data)
    r.lambda_max, r.lambda_min

Layers, from the bottom: :mod:`curvlab.lanczos` (solvers on explicit
operators), :mod:`curvlab.data` and :mod:`curvlab.functional` (data and model
views), :mod:`curvlab.hvp` (Hessian-vector products), :mod:`curvlab.extremes`
(the policy that combines them).
"""

from .data import as_batches
from .extremes import CURVATURES, CostRecord, ExtremesResult, extremes
from .functional import FunctionalModel, ParamSpec, evaluation_mode, loss_hvp, unflatten
from .hvp import HessianOperator, to_scipy
from .lanczos import EigenResult, LanczosResult, lanczos
from .tracker import CurvatureTracker

__all__ = [
    "extremes", "CURVATURES", "ExtremesResult", "CostRecord", "HessianOperator", "lanczos", "EigenResult", "LanczosResult",
    "FunctionalModel", "ParamSpec", "evaluation_mode", "as_batches",
    "loss_hvp", "unflatten", "to_scipy", "CurvatureTracker",
]
__version__ = "0.1.0"
