"""GPU benchmark: pyflat's CUDA path against torch.func, side by side on one GPU.

    python -m bench.gpu --out results/      # needs a CUDA GPU and a CUDA build of pyflat

float32 with TF32 off (torch's fp32_precision settings for cuBLAS and cuDNN convolutions;
the legacy allow_tf32 switches on older torch), CUDA-event timings in
interleaved rounds, medians. Models (random Gaussian inputs, MNIST-sized, random labels;
no download on the GPU machine):

* MLP 784-1024-1024-10 (ReLU), batch 4096: single GGN product against torch.func's GGN
  product (jvp, loss Hessian, vjp); a block of 16 Hessian products against torch.func's
  forward-over-reverse under vmap;
* MLP 784-1024-512-256-128-64-10 (ReLU), batch 512: single GGN product against torch.func
  (launch- and overhead-bound);
* the convnets of bench.convnets (graph engine): the digits CNN on 1x8x8 Gaussian images,
  batch 1024, and ResNet-8 on 3x32x32, batch 256: single GGN and Hessian products.

Each method is checked against the float64 reference once before timing. The achieved
TFLOP/s (GEMM work of the product, MLPs only) is reported next to a large float32 matmul
timed in the same run.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import vmap

import pyflat
from pyflat import reference
from pyflat.applications.models import digits_cnn, mlp
from pyflat.applications.timing import (
    cuda_clock,
    machine,
    tf32_off,
    time_interleaved,
    write_results,
)

from .common import ResNet8, matmul_ceiling, product_flops

CASES = [
    # name, widths (MLP) or (model builder, sample shape), batch, product, k,
    # target speed-up over torch.func
    ("mlp1024-ggn", [784, 1024, 1024, 10], 4096, "ggn", 1, 1.5),
    ("mlp1024-hessian16", [784, 1024, 1024, 10], 4096, "hessian", 16, 1.0),
    ("mlp-deep-ggn", [784, 1024, 512, 256, 128, 64, 10], 512, "ggn", 1, 10.0),
    ("cnn-ggn", (digits_cnn, (1, 8, 8)), 1024, "ggn", 1, 1.5),
    ("resnet8-ggn", (ResNet8, (3, 32, 32)), 256, "ggn", 1, 1.5),
    ("resnet8-hessian", (ResNet8, (3, 32, 32)), 256, "hessian", 1, 1.5),
]


def run_case(name, widths, batch, product, k, target, seconds):
    gen = torch.Generator().manual_seed(0)
    if isinstance(widths, tuple):  # a convnet
        build, shape = widths
        model = build().eval().cuda()
        X = torch.randn(batch, *shape, generator=gen).cuda()
        classes = 10
    else:
        model = mlp(widths, nn.ReLU).cuda()
        X = torch.randn(batch, widths[0], generator=gen).cuda()
        classes = widths[-1]
    y = torch.randint(0, classes, (batch,), generator=gen).cuda()
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, k, generator=gen).cuda()
    x = V[:, 0] if k == 1 else V

    op = (pyflat.GGN if product == "ggn" else pyflat.Hessian)(model, (X, y))
    fns = reference.functions(model, (X, y))
    base = fns.ggn_vp if product == "ggn" else fns.hvp
    if k > 1:
        base = vmap(base, in_dims=1, out_dims=1)
    methods = {"pyflat": lambda: op @ x, "torch.func": lambda: base(x)}

    model64 = copy.deepcopy(model).double()
    ref = reference.ggn_matmat if product == "ggn" else reference.hessian_matmat
    exact = ref(model64, (X.double(), y), x.double())
    errors = {m: float((fn().double() - exact).abs().max() / exact.abs().max())
              for m, fn in methods.items()}
    times = time_interleaved(methods, min_seconds=seconds, max_rounds=200, clock=cuda_clock)
    flops = (None if isinstance(widths, tuple)
             else product_flops(widths, batch, product == "hessian") * k)
    rows = {}
    for m, t in times.items():
        rows[m] = {"ms": t["median_s"] * 1e3, "q1_ms": t["q1_s"] * 1e3, "q3_ms": t["q3_s"] * 1e3,
                   "tflops": flops / t["median_s"] / 1e12 if flops else None,
                   "rel_error": errors[m]}
    speedup = rows["torch.func"]["ms"] / rows["pyflat"]["ms"]
    return {"case": name, "widths": widths if flops else name.split("-")[0], "batch": batch,
            "product": product, "k": k,
            "params": P, "methods": rows, "speedup": speedup, "target": target,
            "met": speedup >= target}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    tf32_off()
    info = machine()
    ceiling = matmul_ceiling(torch.float32, 8192, device="cuda") / 1e3
    results = [run_case(*case, seconds=args.seconds) for case in CASES]
    lines = ["# pyflat GPU benchmark", "",
             f"{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), {info['date']}. "
             f"float32, TF32 off. Plain 8192^3 float32 matmul: {ceiling:.1f} TFLOP/s.", "",
             "| case | method | ms | TFLOP/s | rel. error | speed-up | target |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for m, row in r["methods"].items():
            speed = f"{r['speedup']:.2f}x" if m == "pyflat" else ""
            target = (f">= {r['target']}x {'met' if r['met'] else 'MISSED'}" if m == "pyflat"
                      else "")
            tflops = "" if row["tflops"] is None else f"{row['tflops']:.2f}"
            lines.append(f"| {r['case']} (batch {r['batch']}, k={r['k']}) | {m} | "
                         f"{row['ms']:.3f} | {tflops} | {row['rel_error']:.1e} | "
                         f"{speed} | {target} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "gpu", text,
                  {"machine": info, "fp32_matmul_tflops": ceiling, "results": results})
    wrong = [r["case"] for r in results for row in r["methods"].values()
             if not row["rel_error"] < 1e-3]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
