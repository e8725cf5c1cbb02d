"""Analyses built on the curvature operators: the sharpness report and the validation of
the fused engines against autograd on a user's model."""
from .sharpness import SharpnessReport, sharpness
from .validate import ValidationReport, validate

__all__ = ["SharpnessReport", "ValidationReport", "sharpness", "validate"]
