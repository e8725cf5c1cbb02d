"""pyflat: fast, exact curvature of cross-entropy networks.

Operators ``GGN`` and ``Hessian`` give Gauss-Newton and exact Hessian products of the
cross-entropy loss of MLPs, convnets and residual networks, k directions at a time, from
fused engines; ``pyflat.reference`` gives the same products by autograd, as the oracle.
``pyflat`` on the command line runs the demo, the sharpness report and the benchmarks.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (registers torch.ops.pyflat.*)
    ops,
    reference,
)
from .allocator import allocator_settings, tune_allocator
from .analysis import SharpnessReport, ValidationReport, sharpness, validate
from .curvature import GGN, Hessian
from .errors import UnsupportedModel
from .linalg import (
    CurvatureOperator,
    Estimate,
    LinearCombination,
    Restricted,
    SpectralDensity,
    adaptive_trace,
    eigsh,
    exact_rank,
    frobenius_norm,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq,
)
from .precision import get_allow_tf32, set_allow_tf32

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator", "Estimate", "adaptive_trace", "GGN", "Hessian", "eigsh", "frobenius_norm",
    "hutchinson_trace", "hutchpp_trace", "lanczos", "LinearCombination", "ops", "reference",
    "Restricted", "SharpnessReport", "UnsupportedModel", "ValidationReport", "validate",
    "get_allow_tf32", "set_allow_tf32", "SpectralDensity", "exact_rank", "sharpness", "slq",
    "tune_allocator", "allocator_settings",
]
