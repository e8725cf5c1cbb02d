"""Linear algebra over any symmetric operator: the operator protocol and its algebra, the
flat parameter layout, Lanczos and eigsh, stochastic Lanczos quadrature, and randomized
trace and Frobenius-norm estimators.

Everything here takes a pyflat operator, a reference operator or a dense tensor, and
knows nothing of models or losses.
"""
from .lanczos import EigshResult, LanczosResult, eigsh, lanczos
from .layout import ParameterLayout
from .operator import CurvatureOperator, LinearCombination, Restricted
from .spectral import SpectralDensity, exact_rank, slq
from .trace import Estimate, adaptive_trace, frobenius_norm, hutchinson_trace, hutchpp_trace

__all__ = [
    "CurvatureOperator", "EigshResult", "Estimate", "LanczosResult", "LinearCombination",
    "ParameterLayout", "Restricted", "SpectralDensity", "adaptive_trace", "eigsh",
    "exact_rank", "frobenius_norm", "hutchinson_trace", "hutchpp_trace", "lanczos", "slq",
]
