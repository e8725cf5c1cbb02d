"""Convnet products per second: pyflat's graph engine against autograd, side by side.

    python -m bench.convnets                  # digits CNN and ResNet-8, table + JSON
    python -m bench.convnets --models resnet8 --k 8 --seconds 10

Models (float32, eval mode): a small CNN on a batch of scikit-learn's 8x8 digits, and a
CIFAR-style ResNet-8 (BatchNorm, strided shortcut convolutions) on 32x32 random images.
Each method is checked once against the float64 reference before timing; methods run in
interleaved rounds; medians reported. "gradients" is a product's time over the time of
one loss gradient (forward + backward) measured in the same run.
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
from pyflat.applications.models import digits_cnn
from pyflat.applications.sweep import block
from pyflat.applications.timing import (
    allocator_argument,
    allocator_text,
    apply_allocator,
    machine,
    write_results,
)

from .common import (
    ResNet8,
    compare_methods,
    random_images,
    targets_markdown,
    targets_report,
    timing_arguments,
    wrong_results,
)


def digit_images(batch: int):
    """The first ``batch`` digits (file order, float32) as 1x8x8 images."""
    return load_digits(batch, dtype=torch.float32, images=True)


MODELS = {
    # name: (model builder, data builder(batch), title, default batch)
    "cnn": (digits_cnn, digit_images, "digits CNN (conv 16, conv 32, max pool, linear)", 1024),
    "resnet8": (ResNet8, random_images, "ResNet-8 (16-32-64 channels, BatchNorm), 32x32", 256),
}

# Speed-ups pyflat is built to reach on a 2-core CPU (the project's targets).
TARGETS = {("ggn", 1, "torch.func"): {"cnn": 1.5, "resnet8": 1.5}}
CHECK_TOL = 1e-3  # float32 against the float64 reference: a broken method is off by O(1)


def methods_for(model: nn.Module, data, k: int):
    f = reference.functions(model, data)
    G, H = pyflat.GGN(model, data, backend="fused"), pyflat.Hessian(model, data, backend="fused")
    return {
        ("ggn", 1, "pyflat"): G.matvec,
        ("ggn", 1, "torch.func"): f.ggn_vp,
        ("ggn", 1, "torch.func linearized (forward cached)"): f.linearized_ggn(),
        ("hessian", 1, "pyflat"): H.matvec,
        ("hessian", 1, "torch.func"): f.hvp,
        ("hessian", 1, "double backward"): f.hvp_double_backward_rebuilt,
        ("hessian", 1, "double backward, graph kept"): f.hvp_double_backward,
        ("ggn", k, "pyflat"): G.matmat,
        ("ggn", k, "torch.func"): block(f.ggn_vp),
        ("hessian", k, "pyflat"): H.matmat,
        ("hessian", k, "torch.func"): block(f.hvp),
    }


def bench_model(name: str, batch: int, k: int, min_seconds: float,
                min_rounds: int) -> dict:
    build, make_data, title, _ = MODELS[name]
    model = build().eval()
    data = make_data(batch)
    rows, grad_time = compare_methods(model, data, methods_for(model, data, k), k, min_seconds,
                                      min_rounds)
    return {"model": name, "title": title, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "gradient_ms": grad_time * 1e3, "rows": rows}


def markdown(results: list[dict], report: list[dict], info: dict) -> str:
    lines = ["# pyflat convnet benchmark", "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
             f"{allocator_text(info['allocator'])}, "
             f"{info['date']}. float32, eval mode.", ""]
    for res in results:
        lines += [f"## {res['title']}, batch {res['batch']} ({res['params']:,} parameters; a "
                  f"gradient takes {res['gradient_ms']:.1f} ms)", "",
                  "| product | k | method | ms / product | (q1-q3) | products/s | "
                  "pyflat speed-up | gradients | rel. error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['product']} | {r['k']} | {r['method']} | "
                         f"{r['ms_per_product']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
                         f"{r['products_per_s']:.1f} | {r['pyflat_speedup']:.2f}x | "
                         f"{r['gradients']:.2f} | {r['rel_error']:.1e} |")
        lines.append("")
    lines += targets_markdown(report)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 1024 digits for the CNN, 256 for ResNet-8)")
    parser.add_argument("--k", type=int, default=4, help="directions per block")
    timing_arguments(parser, seconds=3.0, rounds=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for convnets.json and convnets.md")
    allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.default_allocator)
    if args.k < 2:
        parser.error(f"--k must be at least 2 (single products are always timed), got {args.k}")
    torch.set_num_threads(args.threads)
    info = machine()
    results = []
    for name in args.models:
        print(f"timing {MODELS[name][2]} ...", file=sys.stderr, flush=True)
        batch = args.batch if args.batch is not None else MODELS[name][3]
        results.append(bench_model(name, batch, args.k, args.seconds, args.rounds))
    report = targets_report(results, TARGETS, args.k)
    text = markdown(results, report, info)
    write_results(args.out, "convnets", text, {"machine": info, "results": results,
                                                "targets": report})
    return wrong_results(results, CHECK_TOL)


if __name__ == "__main__":
    sys.exit(main())
