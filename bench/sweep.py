"""The sweep behind `pyflat bench`: products per second over models, batch sizes and k.

    python -m bench.sweep                          # CPU: MLPs of two widths and the digits CNN
    python -m bench.sweep --device cuda --out results/
    python -m bench.sweep --models mlp128 --batches 64 --ks 1 --seconds 0.1   # a smoke run

For every (model, batch, k, product) it times pyflat, torch.func (vmap over the k
directions), for single Hessian products double-backward autograd with the graph rebuilt
per product, and curvlinops' GGN and Hessian operators when curvlinops is installed
(`pip install curvlinops-for-pytorch`; it is not a dependency of pyflat). Each method's
result is checked once against the float64 reference before timing (a wrong result fails
the run). Writes sweep.json, sweep.md and sweep.png
(products per second, log scale) to --out. Inputs are the digits (8x8, as vectors for the
MLPs and images for the CNN), repeated when a batch exceeds the 1,797 images.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

import pyflat
from pyflat import reference

from .common import (
    block,
    cuda_clock,
    digits_cnn,
    host_clock,
    machine,
    mlp,
    tf32_off,
    time_interleaved,
    write_results,
)

MODELS = {
    "mlp128": ("MLP 64-128-10 (ReLU)", lambda: mlp([64, 128, 10]), "vector"),
    "mlp512": ("MLP 64-512-512-10 (tanh)", lambda: mlp([64, 512, 512, 10], nn.Tanh), "vector"),
    "cnn": ("digits CNN", lambda: digits_cnn().eval(), "image"),
}
CHECK_TOL = 1e-3  # float32 against the float64 reference: a broken method is off by O(1)


def batch_of(size: int, layout: str, device):
    from sklearn.datasets import load_digits

    data = load_digits()
    reps = -(-size // len(data.target))
    X = (torch.tensor(data.data, dtype=torch.float32) / 16.0).repeat(reps, 1)[:size]
    y = torch.tensor(data.target, dtype=torch.long).repeat(reps)[:size]
    if layout == "image":
        X = X.view(-1, 1, 8, 8)
    return X.to(device), y.to(device)


def curvlinops_product(model, data, product: str):
    """curvlinops' operator on this batch (its matmul takes (P,) and (P, k) tensors), or
    None when curvlinops is not installed."""
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError:
        return None
    kind = GGNLinearOperator if product == "ggn" else HessianLinearOperator
    op = kind(model, nn.CrossEntropyLoss(), list(model.parameters()), [data],
              check_deterministic=False, num_data=len(data[1]))
    return lambda v: op @ v


def methods(model, data, product: str, k: int):
    f = reference.functions(model, data)
    op = (pyflat.GGN if product == "ggn" else pyflat.Hessian)(model, data, backend="fused")
    base = f.ggn_vp if product == "ggn" else f.hvp
    out = {"pyflat": op.matvec if k == 1 else op.matmat,
           "torch.func": base if k == 1 else block(base)}
    if product == "hessian" and k == 1:
        out["double backward"] = f.hvp_double_backward_rebuilt
    other = curvlinops_product(model, data, product)
    if other is not None:
        out["curvlinops"] = other
    return out


def run(models, batches, ks, seconds, device) -> list[dict]:
    clock = cuda_clock if device.type == "cuda" else host_clock
    rows = []
    for name in models:
        title, build, layout = MODELS[name]
        model = build().to(device)
        model64 = copy.deepcopy(model).double()
        P = sum(p.numel() for p in model.parameters())
        for batch in batches:
            data = batch_of(batch, layout, device)
            data64 = (data[0].double(), data[1])
            V = torch.randn(P, max(ks), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64).to(device)
            for product in ("ggn", "hessian"):
                ref = reference.ggn_matmat if product == "ggn" else reference.hessian_matmat
                exact = ref(model64, data64, V)
                for k in ks:
                    x = V[:, 0].float() if k == 1 else V[:, :k].float().contiguous()
                    want = exact[:, 0] if k == 1 else exact[:, :k]
                    calls, errors = {}, {}
                    for label, fn in methods(model, data, product, k).items():
                        result = fn(x).double()
                        errors[label] = float((result - want).abs().max() / want.abs().max())
                        calls[label] = (lambda fn=fn: fn(x))
                    times = time_interleaved(calls, min_seconds=seconds, clock=clock)
                    ours = times["pyflat"]["median_s"]
                    for label, t in times.items():
                        rows.append({"model": name, "title": title, "params": P, "batch": batch,
                                     "k": k, "product": product, "method": label,
                                     "ms_per_product": t["median_s"] / k * 1e3,
                                     "products_per_s": k / t["median_s"],
                                     "pyflat_speedup": t["median_s"] / ours,
                                     "rel_error": errors[label], "rounds": t["rounds"]})
    return rows


def markdown(rows: list[dict], info: dict, device) -> str:
    where = info["gpu"] if device.type == "cuda" else f"{info['threads']} threads, {info['cpu']}"
    lines = ["# pyflat sweep", "",
             f"torch {info['torch']}, {where}, {info['date']}. float32"
             + (", TF32 off." if device.type == "cuda" else "."), "",
             "| model | batch | k | product | method | ms / product | products/s | "
             "pyflat speed-up | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['k']} | {r['product']} | {r['method']} "
                     f"| {r['ms_per_product']:.3f} | {r['products_per_s']:.1f} | "
                     f"{r['pyflat_speedup']:.2f}x | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["model"], r["batch"], r["k"], r["product"]) for r in rows))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4.5), dpi=120)
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, case in enumerate(cases):
            match = [r for r in rows if (r["model"], r["batch"], r["k"], r["product"]) == case
                     and r["method"] == label]
            if match:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(match[0]["products_per_s"])
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{m}\nB{b} k{k}\n{p}" for m, b, k, p in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("products per second")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches) or any(k < 1 for k in args.ks):
        parser.error("--batches and --ks must be positive")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible to torch")
        tf32_off()
    else:
        torch.set_num_threads(args.threads)
    info = machine()
    rows = run(args.models, args.batches, args.ks, args.seconds, device)
    write_results(args.out, "sweep", markdown(rows, info, device),
                  {"machine": info, "device": str(device), "rows": rows})
    plot(rows, args.out / "sweep.png")
    print(f"wrote {args.out / 'sweep.png'}")
    bad = [r for r in rows if not r["rel_error"] < CHECK_TOL]
    for r in bad:
        print(f"WRONG RESULT: {r['model']} batch {r['batch']} k {r['k']} {r['product']} "
              f"{r['method']}: {r['rel_error']:.1e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
