"""``pyflat bench``: products per second over models, batch sizes and k.

    pyflat bench                           # CPU: MLPs of two widths and the digits CNN
    pyflat bench --device cuda --out results/
    pyflat bench --models mlp128 --batches 64 --ks 1 --seconds 0.1   # a smoke run

For every (model, batch, k, product) it times pyflat, torch.func (vmap over the k
directions), for single Hessian products double-backward autograd with the graph rebuilt
per product, and curvlinops' GGN and Hessian operators when curvlinops is installed
(`pip install curvlinops-for-pytorch`; it is not a dependency of pyflat). Each method's
result is checked once against the float64 reference before timing (a wrong result fails
the run). Writes sweep.json, sweep.md and sweep.png
(products per second, log scale) to ``out``. Inputs are the digits in the file's order
(8x8, as vectors for the MLPs and images for the CNN), repeated when a batch exceeds the
1,797 images.
"""
from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import reference
from ..curvature import GGN, Hessian
from .digits import load_digits
from .models import digits_cnn, mlp
from .timing import (
    allocator_text,
    cuda_clock,
    host_clock,
    machine,
    tf32_off,
    time_interleaved,
    write_results,
)
from .usage import usable_device

__all__ = ["CHECK_TOL", "FULL", "MODELS", "QUICK", "block", "methods", "run", "sweep"]

MODELS = {
    "mlp128": ("MLP 64-128-10 (ReLU)", lambda: mlp([64, 128, 10]), "vector"),
    "mlp512": ("MLP 64-512-512-10 (tanh)", lambda: mlp([64, 512, 512, 10], nn.Tanh), "vector"),
    "cnn": ("digits CNN", lambda: digits_cnn().eval(), "image"),
}
#: the sweep's cases: all of them, and ``quick`` (fewer models, one batch size)
FULL = {"models": list(MODELS), "batches": [128, 1024], "ks": [1, 8], "seconds": 1.0}
QUICK = {"models": ["mlp128", "cnn"], "batches": [256], "ks": [1, 4], "seconds": 0.3}
CHECK_TOL = 1e-3  # float32 against the float64 reference: a broken method is off by O(1)


def batch_of(size: int, layout: str, device):
    """``size`` digits (float32, repeated past 1,797) as vectors or 1x8x8 images."""
    X, y = load_digits(size, dtype=torch.float32, repeat=True, images=layout == "image")
    return X.to(device), y.to(device)


def block(fn):
    """torch.func's way to a block of products: vmap over the columns."""
    from torch.func import vmap

    return vmap(fn, in_dims=1, out_dims=1)


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
    """{label: fn(v)} of the methods timed for this product ("ggn" or "hessian") with k
    directions per call: pyflat, torch.func, double backward with the graph rebuilt per
    product and with it kept across products (single Hessian products), and curvlinops
    when installed."""
    f = reference.functions(model, data)
    op = (GGN if product == "ggn" else Hessian)(model, data, backend="fused")
    base = f.ggn_vp if product == "ggn" else f.hvp
    out = {"pyflat": op.matvec if k == 1 else op.matmat,
           "torch.func": base if k == 1 else block(base)}
    if product == "hessian" and k == 1:
        out["double backward"] = f.hvp_double_backward_rebuilt
        # PyHessian's way: the gradient's graph built once and kept across products
        out["double backward, graph kept"] = f.hvp_double_backward
    other = curvlinops_product(model, data, product)
    if other is not None:
        out["curvlinops"] = other
    return out


def run(models, batches, ks, seconds, device) -> list[dict]:
    """One row per (model, batch, k, product, method): each method checked once against
    the float64 reference (``rel_error``), then timed in interleaved rounds."""
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
    """The rows as sweep.md: one table under a line naming torch, the machine and the date."""
    where = info["gpu"] if device.type == "cuda" else f"{info['threads']} threads, {info['cpu']}"
    lines = ["# pyflat sweep", "",
             f"torch {info['torch']}, {where}, {allocator_text(info['allocator'])}, "
             f"{info['date']}. float32"
             + (", TF32 off." if device.type == "cuda" else "."), "",
             "| model | batch | k | product | method | ms / product | products/s | "
             "pyflat speed-up | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['k']} | {r['product']} | {r['method']} "
                     f"| {r['ms_per_product']:.3f} | {r['products_per_s']:.1f} | "
                     f"{r['pyflat_speedup']:.2f}x | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Products per second of every method, one group of bars per case, log scale."""
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


def _positive(values, name: str) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                         for v in values):
        raise ValueError(f"{name} must be integers >= 1, got {values!r}")
    return [int(v) for v in values]


def sweep(out: str | Path = "bench/results", *, models: Sequence[str] | None = None,
          batches: Sequence[int] | None = None, ks: Sequence[int] | None = None,
          seconds: float | None = None, device: str = "cpu", threads: int = 2,
          quick: bool = False) -> int:
    """Runs the sweep, prints its table and writes sweep.json, sweep.md and sweep.png to
    ``out``; returns the exit status: 0, or 1 when a method's result was off the float64
    reference by CHECK_TOL or more (each printed as WRONG RESULT on stderr).

    ``models`` (keys of MODELS), ``batches``, ``ks`` and ``seconds`` (the least timing
    time per case) left None take FULL's values, or QUICK's with ``quick``. On the CPU
    torch runs ``threads`` threads; on a GPU, float32 in IEEE precision (TF32 off).

    Raises:
        UsageError: ``device`` is not usable (no GPU for cuda).
        ValueError: a model not in MODELS, or batches or ks not all integers >= 1.
    """
    cases = QUICK if quick else FULL
    models = list(cases["models"] if models is None else models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"models must be among {', '.join(MODELS)}, got {models!r}")
    batches = _positive(cases["batches"] if batches is None else batches, "batches")
    ks = _positive(cases["ks"] if ks is None else ks, "ks")
    seconds = cases["seconds"] if seconds is None else seconds
    out = Path(out)
    device = usable_device(device)
    if device.type == "cuda":
        tf32_off()
    else:
        torch.set_num_threads(threads)
    info = machine()
    rows = run(models, batches, ks, seconds, device)
    write_results(out, "sweep", markdown(rows, info, device),
                  {"machine": info, "device": str(device), "rows": rows})
    plot(rows, out / "sweep.png")
    print(f"wrote {out / 'sweep.png'}")
    bad = [r for r in rows if not r["rel_error"] < CHECK_TOL]
    for r in bad:
        print(f"WRONG RESULT: {r['model']} batch {r['batch']} k {r['k']} {r['product']} "
              f"{r['method']}: {r['rel_error']:.1e}", file=sys.stderr)
    return 1 if bad else 0
