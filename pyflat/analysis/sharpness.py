"""The sharpness report: the curvature numbers papers publish, in one call.

"Flatness is a False Friend" (Granziol 2020) shows that for cross-entropy, solutions with
large weights have small Hessian trace, Frobenius and spectral norms, so raw flatness
must be read beside the weight scale. The report therefore gives every measure next to
the parameter norm and weight-scale-aware companions (measure x |theta|^2 / P).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..curvature import GGN, Hessian
from ..curvature.dataset import batches_of
from ..linalg import eigsh, frobenius_norm, hutchpp_trace, slq
from ..linalg.trace import _check_count

__all__ = ["SharpnessReport", "sharpness"]


@dataclass
class SharpnessReport:
    """Curvature of one model on one batch; ``to_dict()`` / ``to_json()`` for the record.

    All eigenvalue-based numbers are of the operator named by ``curvature`` (``"ggn"`` or
    ``"hessian"``) and ``with_l2`` (cross-entropy alone, or with the L2 term mu/2
    |theta|^2, which adds mu to every eigenvalue). With A that operator and P parameters:

    * ``top_eigenvalues``: the k largest eigenvalues of A by Lanczos, ascending: the top
      of the spectrum, where a trained classifier's outliers stand apart from the bulk
      (Papyan 2019); ``top_residuals`` their Ritz residual bounds.
    * ``spectral_norm``: ||A||_2 = max |lambda_i|, from the top eigenvalues and, for the
      Hessian, ``min_eigenvalue``.
    * ``trace``: tr(A) = sum lambda_i by Hutch++ (Meyer, Musco, Musco & Woodruff 2021).
    * ``frobenius``: ||A||_F = sqrt(sum lambda_i^2) by E ||A v||^2.
    * ``rank``: the numerical rank of the cross-entropy part, P times the spectral mass
      outside [-eps, eps], eps = rank_rtol x its spectral norm, from the spectral density
      of stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019); the dict of
      :meth:`pyflat.SpectralDensity.rank`.
    * ``scaled``: spectral norm, trace and Frobenius norm times |theta|^2 / P. Granziol
      2020 ("Flatness is a False Friend") shows that for cross-entropy these measures
      are small at solutions with large weights, so raw numbers compare solutions only
      next to the weight scale.
    * ``per_layer``: for each Linear, Conv1d and Conv2d layer, the top eigenvalue and the
      Hutch++ trace of its diagonal block A[S, S] (weight and bias), and |theta_l|.
    """

    curvature: str
    with_l2: bool
    weight_decay: float
    num_samples: int
    num_params: int
    loss: float                      # cross-entropy (mean over the batch)
    objective: float                 # loss + mu/2 |theta|^2 when with_l2, else loss
    accuracy: float
    param_norm: float                # |theta|_2
    top_eigenvalues: list[float]     # largest algebraic, ascending
    top_residuals: list[float]       # Ritz residual bounds of those
    min_eigenvalue: float | None  # smallest algebraic (Hessian only)
    spectral_norm: float
    trace: float
    trace_stderr: float
    frobenius: float
    frobenius_stderr: float
    rank: dict
    scaled: dict                     # measure x |theta|^2 / P
    per_layer: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Every field as plain Python values (nested dicts and lists)."""
        return asdict(self)

    def to_json(self, path=None, **kwargs) -> str:
        """The report as indented JSON; written to ``path`` too when given. ``kwargs`` go
        to :func:`json.dumps`."""
        text = json.dumps(self.to_dict(), indent=2, **kwargs)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def __str__(self) -> str:
        view = "with L2" if self.with_l2 else "cross-entropy only"
        r = self.rank
        lines = [
            f"{self.curvature.upper()} ({view}; mu={self.weight_decay:g}), "
            f"{self.num_params:,} parameters, {self.num_samples:,} samples",
            f"  loss {self.loss:.6g}   accuracy {self.accuracy:.4f}   "
            f"|theta| {self.param_norm:.6g}",
            f"  spectral norm {self.spectral_norm:.6g}   top eigenvalues "
            + ", ".join(f"{v:.5g}" for v in reversed(self.top_eigenvalues)),
        ]
        if self.min_eigenvalue is not None:
            lines.append(f"  smallest eigenvalue {self.min_eigenvalue:.6g}")
        lines += [
            f"  trace {self.trace:.6g} +- {self.trace_stderr:.2g}   Frobenius "
            f"{self.frobenius:.6g} +- {self.frobenius_stderr:.2g}",
            f"  rank {r['rank']:.1f} +- {r['stderr']:.1f} of {r['dimension']} "
            f"(|lambda| > {r['rtol']:g} x spectral norm"
            + ("" if r["resolved"] else "; NOT resolved by the quadrature") + ")",
            "  x |theta|^2/P: " + ", ".join(f"{k} {v:.5g}" for k, v in self.scaled.items()),
        ]
        for layer in self.per_layer:
            lines.append(f"  layer {layer['name']}: {layer['params']:,} params, top eigenvalue "
                         f"{layer['top_eigenvalue']:.5g}, trace {layer['trace']:.5g} +- "
                         f"{layer['trace_stderr']:.2g}, |theta_l| {layer['param_norm']:.5g}")
        return "\n".join(lines)


def sharpness(model: nn.Module, data, *, curvature: str = "hessian", weight_decay: float = 0.0,
              with_l2: bool = False, k: int = 5, trace_products: int = 99,
              frobenius_probes: int = 50, slq_probes: int = 10, slq_steps: int = 80,
              rank_rtol: float = 1e-3, per_layer: bool = True, seed: int = 0,
              tol: float = 0.0) -> SharpnessReport:
    """Measures the curvature of ``model`` on ``data``: a batch ``(X, y)`` or a whole
    data set (DataLoader or iterable of batches, as the operators take).

    The measures of flatness papers report, each beside the weight scale as Granziol 2020
    ("Flatness is a False Friend") asks: the top eigenvalues (Lanczos; the outliers of
    Papyan 2019), the smallest eigenvalue (Hessian only), the spectral norm, the trace
    (Hutch++, Meyer et al. 2021), the Frobenius norm (||A||_F^2 = E ||A v||^2), the
    numerical rank (stochastic Lanczos quadrature, Ghorbani, Krishnan & Xiao 2019), the
    loss, accuracy and |theta|_2, and the same per layer; see :class:`SharpnessReport`.

    Args:
        curvature: ``"hessian"`` (exact) or ``"ggn"``.
        weight_decay: mu of the L2 term mu/2 |theta|^2 (reported; used when with_l2).
        with_l2: measure CE + mu/2 |theta|^2 (every eigenvalue shifted by mu) instead of
            the cross-entropy alone. Rank is a property of the cross-entropy part: with the
            L2 term it is trivially full, so the report's rank always uses the CE part.
        k: number of top eigenvalues (Lanczos, converged to ``tol``).
        trace_products: products for the Hutch++ trace.
        frobenius_probes: probes for ||A||_F.
        slq_probes, slq_steps: stochastic Lanczos quadrature for the rank.
        rank_rtol: eigenvalues above rank_rtol x spectral norm count toward the rank.
        per_layer: also the top eigenvalue and trace of each Linear and convolution
            layer's block.
        seed: every random draw derives from it; the same call gives the same numbers.

    Example:
        >>> report = pyflat.sharpness(model, (X, y), curvature="hessian", seed=0)
        >>> print(report); report.to_json("sharpness.json")
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"pyflat.sharpness: curvature must be 'hessian' or 'ggn', got "
                         f"{curvature!r}")
    # every count before the first product: a bad one must not cost a Lanczos run first
    for name, value, least in (("k", k, 1), ("trace_products", trace_products, 6),
                               ("frobenius_probes", frobenius_probes, 2),
                               ("slq_probes", slq_probes, 1), ("slq_steps", slq_steps, 1)):
        _check_count(name, value, least, "pyflat.sharpness")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or \
            not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"pyflat.sharpness: weight_decay must be a finite number >= 0, got "
                         f"{weight_decay!r}")
    if with_l2 and weight_decay <= 0:
        raise ValueError("pyflat.sharpness: with_l2=True needs weight_decay > 0, got "
                         f"{weight_decay!r}")
    Operator = Hessian if curvature == "hessian" else GGN
    ce_op = Operator(model, data)
    op = Operator(model, data, weight_decay=weight_decay) if with_l2 else ce_op
    correct = 0
    with torch.no_grad():
        for X, y in batches_of(data, None, "pyflat.sharpness")():
            X = X.to(device=ce_op.device, dtype=ce_op.dtype)
            correct += int((model(X).argmax(1) == y.to(ce_op.device)).sum())
        accuracy = correct / ce_op.num_samples
        theta = ce_op.layout.concatenate([p.detach() for p in ce_op.parameters]).to(torch.float64)
    param_norm = float(theta.norm())
    P = op.shape[0]

    top = eigsh(op, k=min(k, P), which="LA", seed=seed, tol=tol)
    min_eig = None
    spectral = float(top.eigenvalues.abs().max())
    if curvature == "hessian":
        bottom = eigsh(op, k=1, which="SA", seed=seed + 1, tol=tol)
        min_eig = float(bottom.eigenvalues[0])
        spectral = max(spectral, abs(min_eig))
    tr = hutchpp_trace(op, trace_products, seed=seed + 2)
    fro = frobenius_norm(op, frobenius_probes, seed=seed + 3)
    ce_norm = spectral if not with_l2 else float(eigsh(ce_op, k=1, which="LM", seed=seed).
                                                  eigenvalues.abs().max())
    rank = slq(ce_op, slq_probes, min(slq_steps, P), seed=seed + 4).rank(rank_rtol, ce_norm)

    scale = param_norm ** 2 / P
    scaled = {"spectral_norm": spectral * scale, "trace": tr.value * scale,
              "frobenius": fro.value * scale}
    layers = []
    if per_layer:
        layers = _per_layer(op, model, k_seed=seed + 5, trace_products=max(30, trace_products // 3))
    loss = ce_op.loss
    objective = loss + 0.5 * weight_decay * param_norm ** 2 if with_l2 else loss
    settings = {"seed": seed, "k": k, "tol": tol, "trace_estimator": "hutch++",
                "trace_products": tr.products, "frobenius_probes": frobenius_probes,
                "slq_probes": slq_probes, "slq_steps": min(slq_steps, P),
                "rank_rtol": rank_rtol, "lanczos_steps": top.steps,
                "converged": bool(top.converged), "dtype": str(op.dtype).replace("torch.", ""),
                "device": str(op.device), "torch": torch.__version__}
    return SharpnessReport(
        curvature=curvature, with_l2=with_l2, weight_decay=float(weight_decay),
        num_samples=ce_op.num_samples, num_params=P, loss=loss, objective=objective,
        accuracy=accuracy, param_norm=param_norm,
        top_eigenvalues=[float(v) for v in top.eigenvalues],
        top_residuals=[float(v) for v in top.residuals], min_eigenvalue=min_eig,
        spectral_norm=spectral, trace=tr.value, trace_stderr=tr.stderr,
        frobenius=fro.value, frobenius_stderr=fro.stderr,
        rank=rank,
        scaled=scaled, per_layer=layers, settings=settings)


def _per_layer(op, model: nn.Module, k_seed: int, trace_products: int) -> list[dict]:
    """Top eigenvalue and trace of each Linear and convolution layer's diagonal block."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        block = op.restrict(params)
        top = eigsh(block, k=1, which="LA", seed=k_seed)
        tr = hutchpp_trace(block, trace_products, seed=k_seed + 1)
        norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
        out.append({"name": name or "<model>", "params": block.shape[0],
                    "top_eigenvalue": float(top.eigenvalues[-1]), "trace": tr.value,
                    "trace_stderr": tr.stderr, "param_norm": norm})
    return out
