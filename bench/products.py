"""Products per second: pyflat against autograd, side by side in one process.

    python -m bench.products                 # the three digits models, table + JSON
    python -m bench.products --models mlp256 --k 16 --out bench/results

For each model (float32, a batch of scikit-learn's digits) it times single products and
blocks of k with pyflat, torch.func (GGN as jvp / loss Hessian / vjp; Hessian as
forward-over-reverse, vmap for blocks), double-backward autograd (graph rebuilt per
product, and kept as PyHessian does), the strongest torch.func formulation with the
forward cached (linearize with a reused vjp), and the same recurrences as plain ATen
calls from Python with the forward cached. Every method is checked once against the
float64 reference before timing. Methods run in interleaved rounds; medians reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import pyflat
from pyflat import reference
from pyflat.applications.digits import load_digits
from pyflat.applications.models import mlp
from pyflat.applications.sweep import block
from pyflat.applications.timing import (
    allocator_argument,
    allocator_text,
    apply_allocator,
    machine,
    write_results,
)
from pyflat.generic import GenericGGN, GenericHessian

from .common import (
    compare_methods,
    matmul_ceiling,
    product_flops,
    targets_markdown,
    targets_report,
    timing_arguments,
    wrong_results,
)

MODELS = {
    "logreg": ([64, 10], nn.ReLU, "logistic regression 64-10"),
    "mlp256": ([64, 256, 256, 10], nn.ReLU, "MLP 64-256-256-10 (ReLU)"),
    "mlp512": ([64, 512, 512, 512, 10], nn.Tanh, "MLP 64-512-512-512-10 (tanh)"),
}

# Speed-ups pyflat is built to reach on a 2-core CPU (the project's targets).
TARGETS = {
    ("ggn", 1, "torch.func"): {"logreg": 5.0, "mlp256": 2.25, "mlp512": 1.8},
    ("hessian", 1, "torch.func"): {"logreg": 5.0, "mlp256": 2.5, "mlp512": 1.5},
    ("hessian", 1, "double backward"): {"logreg": 4.0},
    ("ggn", "k", "torch.func"): {"logreg": 1.0, "mlp256": 1.0, "mlp512": 1.0},
    ("hessian", "k", "torch.func"): {"logreg": 1.0, "mlp256": 1.0, "mlp512": 1.0},
}
CHECK_TOL = 1e-3  # float32 products against the float64 reference: a broken method is off by O(1)


def methods_for(model: nn.Module, data, k: int):
    """{(product, k, label): fn(x) -> result} for every method on this model."""
    f = reference.functions(model, data)
    G, H = pyflat.GGN(model, data), pyflat.Hessian(model, data)
    GG, GH = GenericGGN(model, data), GenericHessian(model, data)
    lin_ggn, lin_hvp = f.linearized_ggn(), f.linearized_hvp()
    return {
        ("ggn", 1, "pyflat"): G.matvec,
        ("ggn", 1, "torch.func"): f.ggn_vp,
        ("ggn", 1, "torch.func linearized (forward cached)"): lin_ggn,
        ("ggn", 1, "plain ATen (forward cached)"): GG.matvec,
        ("hessian", 1, "pyflat"): H.matvec,
        ("hessian", 1, "torch.func"): f.hvp,
        ("hessian", 1, "double backward"): f.hvp_double_backward_rebuilt,
        ("hessian", 1, "double backward, graph kept"): f.hvp_double_backward,
        ("hessian", 1, "torch.func linearized (forward cached)"): lin_hvp,
        ("hessian", 1, "plain ATen (forward cached)"): GH.matvec,
        ("ggn", k, "pyflat"): G.matmat,
        ("ggn", k, "torch.func"): block(f.ggn_vp),
        ("ggn", k, "plain ATen (forward cached)"): GG.matmat,
        ("hessian", k, "pyflat"): H.matmat,
        ("hessian", k, "torch.func"): block(f.hvp),
        ("hessian", k, "plain ATen (forward cached)"): GH.matmat,
    }


def bench_model(name: str, batch: int, k: int, min_seconds: float,
                min_rounds: int) -> dict:
    widths, activation, title = MODELS[name]
    model = mlp(widths, activation)
    data = load_digits(batch, dtype=torch.float32)
    rows, grad_time = compare_methods(model, data, methods_for(model, data, k), k, min_seconds,
                                      min_rounds)
    for row in rows:
        flops = product_flops(widths, batch, row["product"] == "hessian")
        row["gflops"] = flops / (row["ms_per_product"] / 1e3) / 1e9
    return {"model": name, "title": title, "widths": widths, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "gradient_ms": grad_time * 1e3, "rows": rows}


def markdown(results: list[dict], report: list[dict], info: dict, ceiling: float) -> str:
    lines = ["# pyflat products benchmark", "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
             f"{allocator_text(info['allocator'])}, "
             f"{info['date']}. float32, digits batch {results[0]['batch']}. "
             f"Plain {2048}^3 matmul in this run: {ceiling:.0f} GFLOP/s.", ""]
    for res in results:
        lines += [f"## {res['title']} ({res['params']:,} parameters; a gradient takes "
                  f"{res['gradient_ms']:.2f} ms)", "",
                  "| product | k | method | ms / product | products/s | pyflat speed-up | "
                  "gradients | GFLOP/s | rel. error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['product']} | {r['k']} | {r['method']} | {r['ms_per_product']:.3f} "
                         f"| {r['products_per_s']:.0f} | {r['pyflat_speedup']:.2f}x | "
                         f"{r['gradients']:.2f} | {r['gflops']:.1f} | {r['rel_error']:.1e} |")
        lines.append("")
    lines += targets_markdown(report)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16, help="directions per block")
    timing_arguments(parser, seconds=2.0, rounds=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for products.json and products.md")
    allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.default_allocator)
    if args.k < 2:
        parser.error(f"--k must be at least 2 (single products are always timed), got {args.k}")
    torch.set_num_threads(args.threads)
    info = machine()
    ceiling = matmul_ceiling()
    results = []
    for name in args.models:
        print(f"timing {MODELS[name][2]} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args.batch, args.k, args.seconds, args.rounds))
    report = targets_report(results, TARGETS, args.k)
    text = markdown(results, report, info, ceiling)
    write_results(args.out, "products", text, {"machine": info, "matmul_gflops": ceiling,
                                                "results": results, "targets": report})
    return wrong_results(results, CHECK_TOL)


if __name__ == "__main__":
    sys.exit(main())
