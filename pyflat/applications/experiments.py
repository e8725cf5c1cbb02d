"""The further experiments of "Flatness is a False Friend" (Granziol, 2020), on the digits.

1. :func:`last_layer_scaling`. Multiply the last layer of an MLP that classifies every
   training point correctly by alpha > 1: the predictions (argmax) do not change, yet the
   loss and the GGN's spectral norm and trace fall toward 0 as alpha grows. Why: with every
   margin positive, softmax(alpha f) tends to the one-hot labels, so the loss Hessian
   diag(p) - p p^T vanishes (exponentially once alpha x margin is large), faster than the
   Jacobian's alpha^2 growth. The exact Hessian falls too here, because its extra term is
   weighted by the loss gradient p - y, which vanishes for the same reason; with a
   misclassified training point that term does not vanish and the exact Hessian need not
   fall. Flatness measured this way says nothing about generalisation: the function's
   decisions are the same at every alpha.
2. :func:`logistic_regression_rank`. For softmax regression on inputs X (n x d), the
   Hessian is sum_n (diag p_n - p_n p_n^T) kron [x_n, 1][x_n, 1]^T / n; each per-sample
   factor has rank C - 1, so rank(H) <= (C - 1) x rank([X, 1]), with equality for
   generic data. The function counts eigenvalues above eps = rtol x the largest, for a
   few rtol, and shows the gap at the predicted rank.
3. :func:`outliers`. The top of the Hessian spectrum of a trained MLP: about C outliers
   (one per class, minus one) separated from the bulk by a gap.

Each function returns a dict, computed in float64 with fixed seeds on the digits shuffled
with seed 0 (the one loader) and models trained by the one trainer; :func:`run_all` runs
the three with their defaults, prints them and writes them as JSON
(``python -m pyflat.paper``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..curvature import GGN, Hessian
from ..linalg import eigsh
from .digits import load_digits
from .models import mlp
from .training import accuracy, train
from .usage import writable_file

__all__ = ["last_layer_scaling", "logistic_regression_rank", "outliers", "run_all",
           "trained_mlp"]


def _digits(samples: int):
    return load_digits(samples, dtype=torch.float64, shuffle=True, seed=0)


def trained_mlp(data, *, width: int = 32, steps: int = 1500, lr: float = 0.02,
                weight_decay: float = 0.0, seed: int = 0) -> nn.Sequential:
    """A d-width-C tanh MLP (float64, initialised from ``seed``) for the batch (X, y),
    trained by the one trainer (full-batch Adam on CE + weight_decay/2 |theta|^2); in
    eval mode."""
    X, y = data
    model = mlp([X.shape[1], width, int(y.max()) + 1], nn.Tanh, seed=seed).double()
    return train(model, data, steps=steps, lr=lr, weight_decay=weight_decay)


def last_layer_scaling(data=None, alphas: Sequence[float] = (1, 2, 4, 8, 16),
                       model: nn.Sequential | None = None) -> dict:
    """Scales the last Linear layer (weight and bias) by each alpha and measures the loss,
    training accuracy, and the top eigenvalue and trace of the GGN and the Hessian.

    Both are exact, from the dense matrix, which needs a small model; the default MLP
    (500 digits) has 2,410 parameters.
    """
    data = _digits(500) if data is None else data
    model = trained_mlp(data) if model is None else model
    X, y = data
    with torch.no_grad():
        predictions = model(X).argmax(1)
    base_accuracy = accuracy(model, data)
    rows = []
    last = model[-1]
    for alpha in alphas:
        scaled = nn.Sequential(*list(model)[:-1], nn.Linear(last.in_features,
                                                            last.out_features)).double()
        with torch.no_grad():
            scaled[-1].weight.copy_(last.weight * alpha)
            scaled[-1].bias.copy_(last.bias * alpha)
        row = {"alpha": alpha}
        with torch.no_grad():
            row["same_predictions"] = bool((scaled(X).argmax(1) == predictions).all())
        for name, Operator in (("ggn", GGN), ("hessian", Hessian)):
            op = Operator(scaled, data)
            row["loss"] = op.loss
            dense = op.to_dense()
            row[f"{name}_top"] = float(torch.linalg.eigvalsh(dense)[-1])
            row[f"{name}_trace"] = float(torch.trace(dense))
        rows.append(row)
    return {"experiment": "last-layer scaling", "train_accuracy": base_accuracy,
            "all_correct": base_accuracy == 1.0, "rows": rows}


def logistic_regression_rank(data=None, steps: int = 100,
                             rtols: Sequence[float] = (1e-4, 1e-8, 1e-11)) -> dict:
    """Exact rank of the Hessian of softmax regression against (C - 1) x rank([X, 1]).

    Returns the rank at each relative threshold (eigenvalues above rtol x the largest) and
    the eigenvalues at the predicted rank and just past it, relative to the largest: the
    structural zeros sit at float64 round-off, the rest above it. Confident predictions
    (long training on separable data) push some of the nonzero eigenvalues down toward
    the round-off too, so a coarse threshold undercounts; ``steps`` sets how long the model
    trains (full-batch Adam, learning rate 0.05; 400 digits by default).
    """
    data = _digits(400) if data is None else data
    X, y = data
    classes = int(y.max()) + 1
    model = train(mlp([X.shape[1], classes], seed=0).double(), data, steps=steps, lr=0.05)
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    design_rank = int(torch.linalg.matrix_rank(design))
    predicted = (classes - 1) * design_rank
    magnitudes = torch.linalg.eigvalsh(Hessian(model, data).to_dense()).abs().sort(
        descending=True).values
    top = float(magnitudes[0])
    return {"experiment": "logistic-regression rank", "classes": classes, "steps": steps,
            "rank_design": design_rank, "predicted": predicted,
            "parameters": len(magnitudes),
            "rank_at": {str(r): int((magnitudes > r * top).sum()) for r in rtols},
            "relative_eigenvalue_at_predicted": float(magnitudes[predicted - 1]) / top,
            "relative_eigenvalue_after": (float(magnitudes[predicted]) / top
                                          if predicted < len(magnitudes) else 0.0)}


def outliers(data=None, k: int = 20, model: nn.Sequential | None = None,
             weight_decay: float = 0.01) -> dict:
    """The k largest Hessian eigenvalues of a trained MLP (by default trained 1,000 steps
    on 1,000 digits with the L2 term mu = ``weight_decay``, as in the demo) and where the
    largest ratio between neighbours falls among them."""
    data = _digits(1000) if data is None else data
    if model is None:
        model = trained_mlp(data, steps=1000, weight_decay=weight_decay)
    result = eigsh(Hessian(model, data), k=k, which="LA", seed=0)
    top = sorted((float(v) for v in result.eigenvalues), reverse=True)
    ratios = [top[i] / top[i + 1] if top[i + 1] > 0 else float("inf")
              for i in range(len(top) - 1)]
    gap_after = max(range(len(ratios)), key=lambda i: ratios[i]) + 1
    return {"experiment": "outliers", "classes": int(data[1].max()) + 1, "top": top,
            "largest_gap_after": gap_after, "gap_ratio": ratios[gap_after - 1]}


def run_all(out: str | Path | None = None) -> list[dict]:
    """The three experiments with their defaults (about half a minute on 2 CPU cores),
    printed, and written as JSON to ``out`` when given (checked writable first: a
    UsageError before the work, not after it). Returns their three dicts."""
    if out:
        writable_file(Path(out), "--out")
    results = [last_layer_scaling(), logistic_regression_rank(), outliers()]
    scaling, rank, top = results
    print(f"1. Last-layer scaling (MLP 64-32-10, 500 digits, train accuracy "
          f"{scaling['train_accuracy']:.3f}):")
    print(f"   {'alpha':>5} {'same argmax':>11} {'loss':>10} {'GGN top':>10} {'GGN trace':>10} "
          f"{'H top':>10} {'H trace':>10}")
    for r in scaling["rows"]:
        print(f"   {r['alpha']:>5g} {str(r['same_predictions']):>11} {r['loss']:>10.3g} "
              f"{r['ggn_top']:>10.4g} {r['ggn_trace']:>10.4g} {r['hessian_top']:>10.4g} "
              f"{r['hessian_trace']:>10.4g}")
    print(f"2. Logistic-regression Hessian ({rank['parameters']} parameters, {rank['steps']} Adam "
          f"steps): (C - 1) x rank([X, 1]) = {rank['classes'] - 1} x {rank['rank_design']} = "
          f"{rank['predicted']}; rank at eps = rtol x largest: "
          + ", ".join(f"{r}: {n}" for r, n in rank["rank_at"].items())
          + f"; eigenvalue {rank['predicted']} / largest = "
          f"{rank['relative_eigenvalue_at_predicted']:.1e}, the next "
          f"{rank['relative_eigenvalue_after']:.1e}")
    print(f"3. Top Hessian eigenvalues of an MLP trained with L2 ({top['classes']} classes): "
          f"largest gap after "
          f"eigenvalue {top['largest_gap_after']} (ratio {top['gap_ratio']:.2f}); top "
          + ", ".join(f"{v:.3g}" for v in top["top"][:12]))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    return results
