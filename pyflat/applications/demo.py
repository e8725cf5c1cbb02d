"""``pyflat demo``: the paper's central finding on scikit-learn's digits.

Trains logistic regression and a tanh MLP with a sweep of weight decay (the one trainer:
full-batch Adam on CE + mu/2 |theta|^2, seed 0, float64), then measures the GGN and the
Hessian of each trained model on its training set (spectral norm, trace, Frobenius norm,
rank; the cross-entropy alone and with the L2 term), prints a table per model and writes
demo.json and one spectral-density plot per run.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..allocator import allocator_settings
from ..analysis import sharpness
from ..curvature import Hessian
from ..linalg import slq
from .digits import SIZE, load_digits
from .models import mlp
from .timing import allocator_text
from .training import accuracy, train
from .usage import UsageError, writable_folder

__all__ = ["demo", "with_l2"]


def with_l2(report, weight_decay: float) -> dict:
    """The same measures of CE + mu/2 |theta|^2: the operator plus mu I. Exact from the
    cross-entropy measures of a SharpnessReport (every eigenvalue moves by mu): the
    spectral norm from the extreme eigenvalues, trace + mu P,
    |A + mu I|_F^2 = |A|_F^2 + 2 mu tr A + mu^2 P. The rank of A + mu I is P whenever
    mu > 0."""
    P, mu = report.num_params, weight_decay
    top = max(report.top_eigenvalues) + mu
    low = (report.min_eigenvalue if report.min_eigenvalue is not None else 0.0) + mu
    fro2 = report.frobenius ** 2 + 2 * mu * report.trace + mu ** 2 * P
    return {"spectral_norm": max(abs(top), abs(low)), "trace": report.trace + mu * P,
            "frobenius": math.sqrt(max(fro2, 0.0)), "rank": float(P) if mu > 0 else
            report.rank["rank"]}


def demo(out: str | Path = "pyflat-demo", *, weight_decays: Sequence[float] = (0.0, 1e-3, 1e-2),
         steps: int = 1000, lr: float = 0.02, width: int = 32, train_size: int = 1200,
         trace_products: int = 99, frobenius_probes: int = 30, slq_probes: int = 10,
         slq_steps: int = 80) -> dict:
    """Runs the demo, prints its tables and writes ``out``/demo.json and the density plots.

    The defaults are the command line's. ``train_size`` of the 1,797 digits (a fixed
    shuffled split, seed 0) train; the rest test. Each weight decay mu >= 0 trains both
    models from the same initialisation for ``steps`` Adam steps at ``lr``. The estimators'
    budgets (``trace_products`` for Hutch++, ``frobenius_probes``, ``slq_probes`` and
    ``slq_steps``) are those of :func:`pyflat.sharpness`.

    Returns:
        the summary written to demo.json: the data, the settings, one entry per (model,
        weight decay) with accuracies, loss, parameter norm and both curvatures' measures
        (``cross_entropy``: the report; ``with_l2``: :func:`with_l2`), and the seconds.

    Raises:
        UsageError: ``train_size`` leaves no test images, scikit-learn is missing, or
            ``out`` cannot be a folder to write in; all before any training.
    """
    torch.manual_seed(0)
    dtype = torch.float64
    if train_size >= SIZE:
        raise UsageError(f"--train-size must leave test images: at most {SIZE - 1} of the "
                         f"{SIZE:,} digits, got {train_size}")
    try:
        train_set, test_set = load_digits(dtype=dtype, shuffle=True, seed=0,
                                          train_size=train_size)
    except ModuleNotFoundError as err:
        if err.name != "sklearn":
            raise
        raise UsageError("pyflat demo needs scikit-learn for its bundled digits data: "
                         "pip install scikit-learn") from None
    out = Path(out)
    writable_folder(out, "--out")
    models = {
        "logreg": ("logistic regression 64-10", [64, 10]),
        "mlp": (f"MLP 64-{width}-10 (tanh)", [64, width, 10]),
    }
    runs, start = [], time.perf_counter()
    print(f"scikit-learn digits: {len(train_set[1])} train / {len(test_set[1])} test images "
          f"(8x8), float64; full-batch Adam, {steps} steps, seed 0; "
          f"{allocator_text(allocator_settings())}\n")
    for key, (title, widths) in models.items():
        rows = []
        for mu in weight_decays:
            # the same initialisation for every weight decay
            model = train(mlp(widths, nn.Tanh, seed=0).to(dtype), train_set, steps=steps,
                          lr=lr, weight_decay=mu)
            run = {"model": key, "title": title, "weight_decay": mu,
                   "train_accuracy": accuracy(model, train_set),
                   "test_accuracy": accuracy(model, test_set), "curvature": {}}
            for curvature in ("ggn", "hessian"):
                report = sharpness(model, train_set, curvature=curvature, weight_decay=mu,
                                   k=1, trace_products=trace_products,
                                   frobenius_probes=frobenius_probes, slq_probes=slq_probes,
                                   slq_steps=slq_steps, per_layer=False, seed=0)
                run["curvature"][curvature] = {"cross_entropy": report.to_dict(),
                                               "with_l2": with_l2(report, mu)}
            run["param_norm"] = run["curvature"]["hessian"]["cross_entropy"]["param_norm"]
            run["loss"] = run["curvature"]["hessian"]["cross_entropy"]["loss"]
            stem = f"{key}_wd{mu:g}"
            P = sum(p.numel() for p in model.parameters())
            density = slq(Hessian(model, train_set), slq_probes, min(slq_steps, P), seed=0)
            density.plot(out / f"{stem}_density.png",
                         title=f"{title}, wd {mu:g}: Hessian density")
            run["density_png"] = f"{stem}_density.png"
            rows.append(run)
            runs.append(run)
        print(_table(title, rows, sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))))
    summary = {"data": {"name": "scikit-learn digits", "train": len(train_set[1]),
                        "test": len(test_set[1])},
               "settings": {"steps": steps, "lr": lr, "seed": 0,
                            "allocator": allocator_settings(),
                            "weight_decays": list(weight_decays),
                            "trace_products": trace_products,
                            "frobenius_probes": frobenius_probes,
                            "slq_probes": slq_probes, "slq_steps": slq_steps,
                            "torch": torch.__version__},
               "runs": runs, "seconds": time.perf_counter() - start}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("spectral: largest |eigenvalue| (Lanczos); trace: Hutch++; Frobenius: Hutchinson on "
          "|Av|^2; rank: SLQ estimate of the eigenvalues above 1e-3 x the spectral norm (the "
          "cross-entropy part; CE+L2 adds mu to every eigenvalue, so its rank is P). Training "
          "set, float64.")
    print(f"\nwrote {out / 'demo.json'} and one spectral-density PNG per run to {out}/ "
          f"({summary['seconds']:.0f} s)")
    print("Read each table for the paper's claim: with L2, is the solution sharper (larger "
          "spectral norm, trace, Frobenius norm)? And how does its test accuracy compare?")
    return summary


def _table(title: str, rows: list[dict], P: int) -> str:
    lines = [f"{title}, {P:,} parameters",
             f"{'wd':>7} {'|theta|':>8} {'train':>6} {'test':>6} {'loss':>9}  "
             f"{'curvature':<8} {'view':<6} {'spectral':>10} {'trace':>10} {'Frobenius':>10} "
             f"{'rank':>7}"]
    for r in rows:
        first = True
        for curvature in ("ggn", "hessian"):
            ce = r["curvature"][curvature]["cross_entropy"]
            l2 = r["curvature"][curvature]["with_l2"]
            views = [("CE", ce["spectral_norm"], ce["trace"], ce["frobenius"],
                      ce["rank"]["rank"])]
            if r["weight_decay"] > 0:
                views.append(("CE+L2", l2["spectral_norm"], l2["trace"], l2["frobenius"],
                              l2["rank"]))
            for view, spectral, trace, fro, rank in views:
                head = (f"{r['weight_decay']:>7g} {r['param_norm']:>8.3g} "
                        f"{r['train_accuracy']:>6.3f} {r['test_accuracy']:>6.3f} "
                        f"{r['loss']:>9.3g}" if first else " " * 40)
                lines.append(f"{head}  {curvature:<8} {view:<6} {spectral:>10.4g} "
                             f"{trace:>10.4g} {fro:>10.4g} {rank:>7.1f}")
                first = False
    lines.append("")
    return "\n".join(lines)
