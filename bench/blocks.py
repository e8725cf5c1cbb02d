"""Blocks of k directions against single products, and the fresh pages each one faults in.

    python -m bench.blocks                  # both allocators, table + bench/results/blocks.*

For each model (float32, a batch of 1,024 digits) and product, it times single products
and blocks of 4 and 16 directions in interleaved rounds (one call of each per round) and
reports the per-direction time of a block over the single product's (median of the rounds,
with the quartiles), the minor page faults per call from ``resource.getrusage`` (pages the
kernel handed out zeroed because the allocator had returned them), and a profile of one
call (torch.profiler's self CPU time by category: GEMMs, convolutions, transposes,
pyflat's per-element kernels, copies and fills). It runs twice, each
in its own process, since tuning the allocator cannot be undone: with glibc's default
thresholds, and after ``pyflat.tune_allocator()``; the difference is the allocation's cost.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyflat
from pyflat.applications.digits import load_digits
from pyflat.applications.models import digits_cnn, mlp
from pyflat.applications.timing import machine, write_results

MODELS = {
    "logreg": ("logistic regression 64-10", lambda: mlp([64, 10]), False),
    "mlp256": ("MLP 64-256-256-10 (ReLU)", lambda: mlp([64, 256, 256, 10]), False),
    "cnn": ("digits CNN", lambda: digits_cnn().eval(), True),
}
KS = (1, 4, 16)
#: profile categories: an op's self CPU time goes to the first whose names it matches
CATEGORIES = [
    ("GEMM", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::matmul", "aten::linear", "aten::addmv", "aten::mv")),
    ("convolution", ("aten::mkldnn_convolution", "aten::convolution_backward",
                     "aten::convolution", "aten::_convolution")),
    ("transposes", ("pyflat::transpose",)),
    ("pyflat per-element kernels", ("pyflat::",)),
    ("copies and fills", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone",
                          "aten::contiguous", "aten::zeros", "aten::zeros_like")),
]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile(op, V) -> dict[str, float]:
    """ms of self CPU time per category in one call ``op @ V`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        op @ V
    spent = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for event in prof.key_averages():
        category = next((name for name, keys in CATEGORIES
                         if any(event.key == k or (k.endswith("::") and event.key.startswith(k))
                                for k in keys)), "other")
        spent[category] += event.self_cpu_time_total / 1e3
    return spent


def measure(names, rounds: int, batch: int) -> list[dict]:
    """Rows of (model, product, k): ms per direction (median, quartiles), faults per call."""
    rows = []
    for name in names:
        title, build, images = MODELS[name]
        model = build()
        data = load_digits(batch, dtype=torch.float32, images=images)
        for kind in (pyflat.GGN, pyflat.Hessian):
            op = kind(model, data)
            gen = torch.Generator().manual_seed(0)
            blocks = {k: torch.randn(op.shape[0], k, generator=gen) for k in KS}
            for V in blocks.values():  # warm up: the first call allocates for the first time
                op @ V
            times = {k: [] for k in KS}
            faults = {k: [] for k in KS}
            for _ in range(rounds):
                for k, V in blocks.items():
                    before, start = _faults(), time.perf_counter()
                    op @ V
                    times[k].append((time.perf_counter() - start) / k * 1e3)
                    faults[k].append(_faults() - before)
            single = statistics.median(times[1])
            for k in KS:
                q1, median, q3 = statistics.quantiles(times[k], n=4)
                rows.append({"model": name, "title": title, "product": kind.__name__, "k": k,
                             "ms_per_direction": statistics.median(times[k]),
                             "q1_ms": q1, "q3_ms": q3,
                             "vs_single": statistics.median(times[k]) / single,
                             "faults_per_call": int(statistics.median(faults[k])),
                             "block_size": op.block_size(),
                             "profile_ms": profile(op, blocks[k])})
    return rows


def markdown(runs: dict, info: dict, rounds: int) -> str:
    lines = ["# pyflat blocks of directions", "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
             f"{info['date']}. float32, digits batch 1,024; median of {rounds} interleaved "
             "rounds (quartiles); faults: minor page faults per call (4 KiB pages).", "",
             "| model | product | k | default: ms/direction | x single | faults | "
             "tuned: ms/direction | x single | faults |",
             "|---|---|---|---|---|---|---|---|---|"]
    for plain, tuned in zip(runs["default"], runs["tuned"]):
        lines.append(
            f"| {plain['title']} | {plain['product']} | {plain['k']} | "
            f"{plain['ms_per_direction']:.2f} ({plain['q1_ms']:.2f}-{plain['q3_ms']:.2f}) | "
            f"{plain['vs_single']:.2f}x | {plain['faults_per_call']:,} | "
            f"{tuned['ms_per_direction']:.2f} ({tuned['q1_ms']:.2f}-{tuned['q3_ms']:.2f}) | "
            f"{tuned['vs_single']:.2f}x | {tuned['faults_per_call']:,} |")
    names = [name for name, _ in CATEGORIES] + ["other"]
    lines += ["", "Where a call's time goes (tuned run, one profiled call, self CPU ms of the "
              "calling thread; the MLP engine's own small GEMMs count as pyflat kernels; other: "
              "views, sums, the profiler's own cost); allocation: the default run's median time "
              "per call minus the tuned run's.", "",
              "| model | product | k | " + " | ".join(names) + " | allocation |",
              "|---|---|---|" + "---|" * (len(names) + 1)]
    for plain, tuned in zip(runs["default"], runs["tuned"]):
        spent = tuned["profile_ms"]
        allocation = (plain["ms_per_direction"] - tuned["ms_per_direction"]) * plain["k"]
        lines.append(f"| {plain['title']} | {plain['product']} | {plain['k']} | "
                     + " | ".join(f"{spent[n]:.2f}" for n in names)
                     + f" | {allocation:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:  # one allocator setting, in this process; rows as JSON on stdout
        if args.child == "tuned" and not pyflat.tune_allocator():
            raise SystemExit("pyflat.tune_allocator had no effect here (not glibc)")
        print(json.dumps(measure(args.models, args.rounds, args.batch)))
        return 0
    runs = {}
    for setting in ("default", "tuned"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.blocks", "--child", setting, "--models", *args.models,
             "--rounds", str(args.rounds), "--batch", str(args.batch),
             "--threads", str(args.threads)], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[1])
        runs[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    info = machine()
    write_results(args.out, "blocks", markdown(runs, info, args.rounds),
                  {"machine": info, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
