"""The curvature front door: ``GGN`` and ``Hessian`` of a cross-entropy loss on a batch or a
whole data set, with their input checks and the choice of back end."""
from .operators import GGN, Hessian

__all__ = ["GGN", "Hessian"]
