"""Whole-data-set curvature: top eigenvalue and trace over every sample, cache on and off.

    python -m bench.dataset                 # table + bench/results/dataset.{md,json}

Two data sets: scikit-learn's digits (all 1,797 samples) and a synthetic 50,000-sample
set (Gaussian inputs, 64 features, labels from a random teacher network), each with an
MLP 64-128-128-10 (tanh, float32) in batches of 1,024. For each, the top Hessian eigenvalue
(pyflat.eigsh, tol 1e-5) and the trace to 1% standard error (pyflat.adaptive_trace), at
most --max-products products each, with all prepared batches cached and with none (every
product prepares every batch again).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyflat
from pyflat.applications.digits import load_digits
from pyflat.applications.models import mlp
from pyflat.applications.timing import (
    allocator_argument,
    allocator_text,
    apply_allocator,
    machine,
    write_results,
)


def synthetic(samples: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, 64, generator=gen)
    teacher = torch.randn(64, 10, generator=gen)
    y = (X @ teacher + 0.5 * torch.randn(samples, 10, generator=gen)).argmax(1)
    return X, y


def run(name, X, y, batch, cache_bytes, max_products):
    model = mlp([64, 128, 128, 10], nn.Tanh, seed=0)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=False)
    start = time.perf_counter()
    H = pyflat.Hessian(model, loader, cache_bytes=cache_bytes, check_determinism=False)
    prepare = time.perf_counter() - start
    start = time.perf_counter()
    top = pyflat.eigsh(H, k=1, tol=1e-5, seed=0, maxiter=min(H.shape[0], max_products),
                       progress=False)
    t_top = time.perf_counter() - start
    start = time.perf_counter()
    # the sketch and two blocks must fit the budget: a quarter of it each, at most the defaults
    share = max(2, min(16, max_products // 4))
    trace = pyflat.adaptive_trace(H, 0.01, seed=0, max_products=max(max_products, 4 * share),
                                  sketch_products=min(20, share), block_size=share,
                                  progress=False)
    t_trace = time.perf_counter() - start
    return {"data": name, "samples": len(y), "batches": H.num_batches,
            "cache": H.cache_report["path"], "cached_batches": H.cache_report["cached_batches"],
            "cache_mb": H.cache_report["bytes_held"] / 2 ** 20, "prepare_s": prepare,
            "top_eigenvalue": float(top.eigenvalues[-1]), "top_s": t_top,
            "top_products": top.steps, "top_products_per_s": top.steps / t_top,
            "top_converged": top.converged, "trace_converged": trace.converged,
            "trace": trace.value, "trace_stderr": trace.stderr, "trace_s": t_trace,
            "trace_products": trace.products, "trace_products_per_s": trace.products / t_trace}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-samples", type=int, default=50_000)
    parser.add_argument("--digits-samples", type=int, default=1797)
    parser.add_argument("--max-products", type=int, default=400,
                        help="most products per task (eigsh steps, trace probes)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.default_allocator)
    torch.set_num_threads(args.threads)
    sets = {f"digits {args.digits_samples}": load_digits(args.digits_samples, dtype=torch.float32),
            f"synthetic {args.synthetic_samples}":
            synthetic(args.synthetic_samples)}
    rows = []
    for name, (X, y) in sets.items():
        for cache in (None, 1):
            rows.append(run(name, X, y, args.batch, cache, args.max_products))
            print(f"{name}: {rows[-1]['cache']} done", file=sys.stderr, flush=True)
    info = machine()
    lines = ["# pyflat whole-data-set benchmark", "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
             f"{allocator_text(info['allocator'])}, {info['date']}. "
             f"MLP 64-128-128-10 tanh, float32, batches of {args.batch}.", "",
             "| data | cache | prepare s | top eigenvalue | s (products/s) | trace +- stderr | "
             "s (products/s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cache = f"{r['cached_batches']}/{r['batches']} batches, {r['cache_mb']:.0f} MB"
        lines.append(f"| {r['data']} | {cache} | {r['prepare_s']:.2f} | "
                     f"{r['top_eigenvalue']:.5g} | "
                     f"{r['top_s']:.2f} ({r['top_products_per_s']:.1f}) | {r['trace']:.5g} +- "
                     f"{r['trace_stderr']:.2g} | {r['trace_s']:.2f} "
                     f"({r['trace_products_per_s']:.1f}) |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "dataset", text, {"machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
