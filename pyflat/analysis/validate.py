"""Checks the fused engine on a user's own model before a long run."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import reference
from ..curvature import GGN, Hessian
from ..errors import UnsupportedModel

__all__ = ["ValidationReport", "validate"]


@dataclass
class ValidationReport:
    """Relative errors of the fused products on random directions.

    ``rows`` hold, per product (``"ggn"``, ``"hessian"``), the error of the fused engine and
    of autograd in the model's dtype, both against the autograd reference on a float64
    copy of the model, and whether the fused error is within 4x autograd's own (or 4x 8
    eps of the dtype, where autograd's is smaller): ``fused <= 4 max(autograd, 8 eps)``.
    The error of a product X against the reference R is max|X - R| / max|R|.
    ``supported`` is False, with ``reason``, when the fused engine cannot take the model
    (the operators then fall back to the reference backend).
    """

    supported: bool
    reason: str = ""
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the engine took the model and every product passed."""
        return self.supported and all(row["ok"] for row in self.rows)

    def __str__(self) -> str:
        if not self.supported:
            return f"fused engine not used for this model: {self.reason}"
        lines = ["product   k  fused error  autograd error  ok"]
        for r in self.rows:
            lines.append(f"{r['product']:<8} {r['k']:>2}  {r['fused_error']:.2e}     "
                         f"{r['autograd_error']:.2e}        {'yes' if r['ok'] else 'NO'}")
        return "\n".join(lines)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max())
    diff = float((actual.to(expected.dtype) - expected).abs().max())
    return diff / scale if scale > 0 else diff


def validate(model: nn.Module, data, *, k: int = 4, seed: int = 0, reduction: str = "mean",
             weight_decay: float = 0.0) -> ValidationReport:
    """Runs the fused engine and the autograd reference on ``k`` random directions of the
    user's model and batch, and reports the relative error of each product (GGN, Hessian).

    The directions are a (P, k) float64 Gaussian block drawn from ``seed``; the reference
    is :func:`pyflat.reference.ggn_matmat` / :func:`pyflat.reference.hessian_matmat` on a
    float64 copy of the model and batch.

    Args:
        model: the model, as :class:`pyflat.GGN` takes it.
        data: one batch (X, y): X (B, ...), y (B,) class indices.
        k: number of directions, at least 1.
        seed: seed of the directions.
        reduction, weight_decay: as the operators take them.

    Returns:
        A :class:`ValidationReport`; ``supported=False`` when the fused engine refuses the
        model (UnsupportedModel), with the reason.

    Example:
        >>> report = pyflat.validate(model, (X, y))
        >>> print(report); assert report.ok
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"pyflat.validate: k must be an int >= 1, got {k!r}")
    model64 = copy.deepcopy(model).double()
    X, y = data
    data64 = (X.double() if X.is_floating_point() else X, y)
    rows = []
    for name, operator, ref_fn in (("ggn", GGN, reference.ggn_matmat),
                                   ("hessian", Hessian, reference.hessian_matmat)):
        try:
            op = operator(model, data, reduction=reduction, weight_decay=weight_decay,
                          backend="fused")
        except UnsupportedModel as err:
            return ValidationReport(False, str(err))
        gen = torch.Generator().manual_seed(seed)
        V = torch.randn(op.shape[0], k, generator=gen, dtype=torch.float64)
        exact = ref_fn(model64, data64, V.to(X.device), reduction=reduction,
                       weight_decay=weight_decay)
        Vm = V.to(dtype=op.dtype, device=op.device)
        fused = _relative_error(op @ Vm, exact)
        autograd = _relative_error(ref_fn(model, data, Vm, reduction=reduction,
                                          weight_decay=weight_decay), exact)
        floor = 8 * torch.finfo(op.dtype).eps
        rows.append({"product": name, "k": k, "fused_error": fused, "autograd_error": autograd,
                     "ok": fused <= 4 * max(autograd, floor)})
    return ValidationReport(True, "", rows)
