"""What only the benchmarks share: ResNet-8 and its random images, GEMM FLOPs of a
product, the side-by-side comparison against the float64 reference, the project's speed-up
targets, the plain-matmul ceiling.

The digits (one loader), the models, the timing and the results writing the benchmarks
share with ``pyflat bench`` live in the package: pyflat.applications.digits, .models,
.timing and .sweep (torch.func's block of products).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from pyflat.applications.timing import cuda_clock, host_clock, time_interleaved


class _BasicBlock(nn.Module):
    """He et al. (2016) basic block: conv-BN-ReLU-conv-BN plus the shortcut (a 1x1
    convolution and BN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """The CIFAR ResNet of He et al. (2016) with one block per stage (6n+2 layers, n=1):
    16, 32, 64 channels, global average pooling, 10 classes (78,042 parameters).
    In eval mode, with running statistics drawn away from the defaults."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.stages = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2),
                                    _BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        out = self.stages(nn.functional.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def random_images(batch: int, size: int = 32, classes: int = 10, seed: int = 0,
                  dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, 3, size, size, generator=gen, dtype=dtype)
    return X, torch.randint(0, classes, (batch,), generator=gen)


def product_flops(widths: list[int], batch: int, exact: bool) -> int:
    """GEMM FLOPs of one product with the forward cached: 2 GEMMs for the first layer
    (a V^T and the weight gradient), 4 for the others under the GGN (plus Ra W^T and
    Rg W), 6 under the exact Hessian (plus e^T Ra and e V)."""
    total = 0
    for l, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        gemms = 2 if l == 0 else (6 if exact else 4)
        total += gemms * 2 * batch * d_in * d_out
    return total


def wrong_results(results: list[dict], tol: float) -> int:
    """Prints every method whose result was off the float64 reference by ``tol`` or more;
    returns the exit status (1 if any)."""
    bad = [(res["model"], r["product"], r["k"], r["method"], r["rel_error"])
           for res in results for r in res["rows"] if not r["rel_error"] < tol]
    for b in bad:
        print(f"WRONG RESULT: {b}", file=sys.stderr)
    return 1 if bad else 0


def timing_arguments(parser, seconds: float, rounds: int) -> None:
    """--threads, --seconds and --rounds, shared by the benchmarks built on
    compare_methods."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=seconds,
                        help="minimum timing time per model (more rounds, less noise)")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="minimum interleaved rounds (one call of every method each): "
                             "medians of few calls move with the machine's noise")


def compare_methods(model: nn.Module, data, methods: dict, k: int, min_seconds: float,
                    min_rounds: int = 5) -> tuple[list[dict], float]:
    """Checks every method once against the float64 reference, then times them (and a
    loss gradient) in interleaved rounds.

    Args:
        methods: {(product, k, label): fn(x)} with product "ggn" or "hessian", k 1 or the
            block width, and a "pyflat" label among each (product, k).
    Returns:
        rows (product, k, method, rel_error, ms_per_product, products_per_s, q1_ms, q3_ms,
        rounds, gradients, pyflat_speedup) and the gradient's median seconds.
    """
    from pyflat import reference

    P = sum(p.numel() for p in model.parameters())
    V64 = torch.randn(P, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model64 = copy.deepcopy(model).double()
    data64 = (data[0].double(), data[1])
    expected = {"ggn": reference.ggn_matmat(model64, data64, V64),
                "hessian": reference.hessian_matmat(model64, data64, V64)}
    inputs = {1: V64[:, 0].float(), k: V64.float()}
    rows, calls = [], {}
    for key, fn in methods.items():
        product, kk, label = key
        result = fn(inputs[kk]).double()
        want = expected[product][:, 0] if kk == 1 else expected[product]
        error = ((result - want).abs().max() / want.abs().max()).item()
        rows.append({"product": product, "k": kk, "method": label, "rel_error": error})
        calls[str(key)] = (lambda fn=fn, x=inputs[kk]: fn(x))
    X, y = data
    params = list(model.parameters())
    calls["gradient"] = lambda: torch.autograd.grad(
        nn.functional.cross_entropy(model(X), y), params)
    timings = time_interleaved(calls, min_seconds=min_seconds, min_rounds=min_rounds,
                               max_rounds=max(50, min_rounds))
    grad_time = timings.pop("gradient")["median_s"]
    for row, key in zip(rows, methods):
        t = timings[str(key)]
        per_vector = t["median_s"] / row["k"]
        row.update(ms_per_product=per_vector * 1e3, products_per_s=1.0 / per_vector,
                   q1_ms=t["q1_s"] / row["k"] * 1e3, q3_ms=t["q3_s"] / row["k"] * 1e3,
                   rounds=t["rounds"], gradients=per_vector / grad_time)
    for row in rows:
        ours = next(r for r in rows if r["product"] == row["product"] and r["k"] == row["k"]
                    and r["method"] == "pyflat")
        row["pyflat_speedup"] = row["ms_per_product"] / ours["ms_per_product"]
    return rows, grad_time


def targets_report(results: list[dict], targets: dict, k: int) -> list[dict]:
    """The speed-ups the project aims at, against those measured: targets maps
    (product, k or "k", baseline) to {model: minimum speed-up}."""
    report = []
    for (product, kk, baseline), per_model in targets.items():
        kk = k if kk == "k" else kk
        for res in results:
            if res["model"] not in per_model:
                continue
            row = next(r for r in res["rows"] if r["product"] == product and r["k"] == kk
                       and r["method"] == baseline)
            report.append({"model": res["model"], "product": product, "k": kk,
                           "baseline": baseline, "speedup": row["pyflat_speedup"],
                           "target": per_model[res["model"]],
                           "met": row["pyflat_speedup"] >= per_model[res["model"]]})
    return report


def targets_markdown(report: list[dict]) -> list[str]:
    lines = ["## Targets", "", "| model | product | k | against | speed-up | target | |",
             "|---|---|---|---|---|---|---|"]
    for t in report:
        lines.append(f"| {t['model']} | {t['product']} | {t['k']} | {t['baseline']} | "
                     f"{t['speedup']:.2f}x | {t['target']}x | {'met' if t['met'] else 'MISSED'} |")
    return lines


def matmul_ceiling(dtype=torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """GFLOP/s of a large plain matmul in this process: the machine's practical ceiling."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    clock = cuda_clock if device == "cuda" else host_clock
    t = time_interleaved({"mm": lambda: a @ b}, min_seconds=1.0, max_rounds=20,
                         clock=clock)["mm"]
    return 2 * n ** 3 / t["median_s"] / 1e9
