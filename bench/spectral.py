"""Time to publishable spectral numbers: pyflat against PyHessian-style autograd loops.

    python -m bench.spectral                # table + bench/results/spectral.{md,json}

On an MLP trained on scikit-learn's digits (float64, so that a relative residual of
1e-6 is well above the products' rounding), it measures, side by side in one process:

* top-1 and top-10 Hessian eigenvalues to a relative residual ||Hv - lambda v|| <= 1e-6
  |lambda|: pyflat.eigsh (Lanczos, fused products) against power iteration with
  deflation (PyHessian's algorithm) on double-backward autograd products with the graph
  kept, as PyHessian runs them;
* the Hessian trace to a 1% standard error: pyflat.adaptive_trace (a Hutch++ sketch, then
  blocks of deflated probes until the error is met) against Hutchinson's estimator one
  autograd product at a time (PyHessian's algorithm, stopped at the same criterion).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pyflat
from pyflat import reference
from pyflat.applications.digits import load_digits
from pyflat.applications.models import mlp
from pyflat.applications.timing import (
    allocator_argument,
    allocator_text,
    apply_allocator,
    machine,
    write_results,
)
from pyflat.applications.training import train


def trained_mlp(widths, samples, epochs, seed=0):
    """A tanh MLP trained ``epochs`` full-batch Adam steps (lr 0.01, float64) on the first
    ``samples`` digits."""
    data = load_digits(samples, dtype=torch.float64)
    model = train(mlp(widths, nn.Tanh, seed=seed).double(), data, steps=epochs, lr=0.01)
    return model, data


def power_iteration_top(hvp, n, k, rtol, max_products, seed):
    """PyHessian's eigenvalue loop: power iteration per eigenvalue, deflated against the
    ones found, run until the relative residual meets ``rtol`` (or the budget ends)."""
    gen = torch.Generator().manual_seed(seed)
    found, vectors, products, converged = [], [], 0, True
    for _ in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        v /= v.norm()
        eigenvalue = 0.0
        while True:
            for u in vectors:  # deflation, as PyHessian orthonormalizes
                v -= (v @ u) * u
            v /= v.norm()
            Hv = hvp(v)
            products += 1
            eigenvalue = float(v @ Hv)
            residual = float((Hv - eigenvalue * v).norm())
            if residual <= rtol * abs(eigenvalue):
                break
            if products >= max_products:
                converged = False
                break
            v = Hv
        found.append(eigenvalue)
        vectors.append(v.clone())
        if not converged:
            break
    return sorted(found), products, converged


def hutchinson_sequential(hvp, n, rel_stderr, max_products, seed):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    while True:
        v = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        samples.append(float(v @ hvp(v)))
        m = len(samples)
        if m >= 10:
            mean = sum(samples) / m
            var = sum((s - mean) ** 2 for s in samples) / (m - 1)
            if math.sqrt(var / m) <= rel_stderr * abs(mean):
                return mean, math.sqrt(var / m), m, True
        if m >= max_products:
            return sum(samples) / m, float("nan"), m, False


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 128, 10])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-products", type=int, default=3000,
                        help="budget of autograd products per baseline task")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.default_allocator)
    torch.set_num_threads(args.threads)
    model, data = trained_mlp(args.widths, args.samples, args.epochs)
    P = sum(p.numel() for p in model.parameters())
    fns = reference.functions(model, data)
    fns.hvp_double_backward(torch.zeros(P, dtype=torch.float64))  # build the kept graph
    rows = []

    for k in (1, 10):
        (res, t_ours) = timed(lambda: pyflat.eigsh(pyflat.Hessian(model, data), k=k,
                                                   which="LA", tol=1e-6, seed=0))
        (base, t_base) = timed(lambda: power_iteration_top(fns.hvp_double_backward, P, k, 1e-6,
                                                           args.max_products, seed=0))
        values, products, converged = base
        agree = max(abs(a - b) / abs(b) for a, b in zip(values, res.eigenvalues.tolist())) \
            if converged else float("nan")
        rows.append({"task": f"top-{k} eigenvalues, residual 1e-6",
                     "pyflat_s": t_ours, "pyflat_products": res.steps,
                     "pyflat_converged": bool(res.converged),
                     "baseline": "power iteration + deflation, double backward",
                     "baseline_s": t_base, "baseline_products": products,
                     "baseline_converged": converged, "speedup": t_base / t_ours,
                     "max_rel_difference": agree})

    (ours, t_ours) = timed(lambda: pyflat.adaptive_trace(pyflat.Hessian(model, data), 0.01,
                                                         max_products=8 * args.max_products,
                                                         seed=0))
    (base, t_base) = timed(lambda: hutchinson_sequential(fns.hvp_double_backward, P, 0.01,
                                                         args.max_products, seed=0))
    ours_ok = ours.converged
    mean, stderr, products, converged = base
    rows.append({"task": "trace to 1% standard error", "pyflat_s": t_ours,
                 "pyflat_products": ours.products, "pyflat_converged": bool(ours_ok),
                 "baseline": "Hutchinson, one double-backward product at a time",
                 "baseline_s": t_base, "baseline_products": products,
                 "baseline_converged": converged, "speedup": t_base / t_ours,
                 "max_rel_difference": abs(ours.value - mean) / abs(mean)})

    info = machine()
    lines = ["# pyflat spectral benchmark", "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
             f"{allocator_text(info['allocator'])}, {info['date']}. "
             f"MLP {'-'.join(map(str, args.widths))} (tanh, {P:,} parameters) trained "
             f"{args.epochs} Adam steps on {args.samples} digits, float64 Hessian.", "",
             "| task | pyflat s (products) | baseline | baseline s (products) | speed-up | "
             "results differ by |", "|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["baseline_converged"] else " (budget ran out)"
        lines.append(f"| {r['task']} | {r['pyflat_s']:.2f} ({r['pyflat_products']}) | "
                     f"{r['baseline']} | {r['baseline_s']:.2f} ({r['baseline_products']}){ok} | "
                     f"{r['speedup']:.1f}x | {r['max_rel_difference']:.1e} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "spectral", text, {"machine": info, "rows": rows})
    return 0 if all(r["pyflat_converged"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
