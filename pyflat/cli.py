"""The ``pyflat`` command line: ``pyflat demo``, ``pyflat sharpness``, ``pyflat bench``.

Errors a user can fix (a missing file, a bad entry point, an unsupported model) end in one
line on stderr and exit status 2; ``--traceback`` shows the whole story.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for, reported in one line."""


# ---------------------------------------------------------------------------- demo

def _digits(dtype: torch.dtype, train_size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("pyflat demo needs scikit-learn for its bundled digits data: "
                         "pip install scikit-learn") from None
    data = load_digits()
    X = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    # a fixed shuffled split: the file is ordered by writer, so the head alone is biased
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    return (X[:train_size], y[:train_size]), (X[train_size:], y[train_size:])


def _train(model: nn.Module, data, weight_decay: float, steps: int, lr: float) -> None:
    """Full-batch Adam on CE + mu/2 |theta|^2, from the model's seeded initialisation."""
    X, y = data
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)
        loss.backward()
        optimizer.step()


def _accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).double().mean())


def _with_l2(report, weight_decay: float) -> dict:
    """The same measures of CE + mu/2 |theta|^2: the operator plus mu I. Exact from the
    cross-entropy measures (every eigenvalue moves by mu): the spectral norm from the
    extreme eigenvalues, trace + mu P, |A + mu I|_F^2 = |A|_F^2 + 2 mu tr A + mu^2 P.
    The rank of A + mu I is P whenever mu > 0."""
    P, mu = report.num_params, weight_decay
    top = max(report.top_eigenvalues) + mu
    low = (report.min_eigenvalue if report.min_eigenvalue is not None else 0.0) + mu
    fro2 = report.frobenius ** 2 + 2 * mu * report.trace + mu ** 2 * P
    return {"spectral_norm": max(abs(top), abs(low)), "trace": report.trace + mu * P,
            "frobenius": math.sqrt(max(fro2, 0.0)), "rank": float(P) if mu > 0 else
            report.rank["rank"]}


def demo(args) -> int:
    import pyflat

    torch.manual_seed(0)
    dtype = torch.float64
    train, test = _digits(dtype, args.train_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        "logreg": ("logistic regression 64-10",
                   lambda: nn.Sequential(nn.Linear(64, 10))),
        "mlp": (f"MLP 64-{args.width}-10 (tanh)",
                lambda: nn.Sequential(nn.Linear(64, args.width), nn.Tanh(),
                                      nn.Linear(args.width, 10))),
    }
    runs, start = [], time.perf_counter()
    print(f"scikit-learn digits: {len(train[1])} train / {len(test[1])} test images (8x8), "
          f"float64; full-batch Adam, {args.steps} steps, seed 0\n")
    for key, (title, build) in models.items():
        rows = []
        for mu in args.weight_decays:
            torch.manual_seed(0)  # the same initialisation for every weight decay
            model = build().to(dtype)
            _train(model, train, mu, args.steps, args.lr)
            model.eval()
            run = {"model": key, "title": title, "weight_decay": mu,
                   "train_accuracy": _accuracy(model, train),
                   "test_accuracy": _accuracy(model, test), "curvature": {}}
            for curvature in ("ggn", "hessian"):
                report = pyflat.sharpness(model, train, curvature=curvature, weight_decay=mu,
                                          k=1, trace_products=args.trace_products,
                                          frobenius_probes=args.frobenius_probes,
                                          slq_probes=args.slq_probes, slq_steps=args.slq_steps,
                                          per_layer=False, seed=0)
                run["curvature"][curvature] = {"cross_entropy": report.to_dict(),
                                               "with_l2": _with_l2(report, mu)}
            run["param_norm"] = run["curvature"]["hessian"]["cross_entropy"]["param_norm"]
            run["loss"] = run["curvature"]["hessian"]["cross_entropy"]["loss"]
            stem = f"{key}_wd{mu:g}"
            density = pyflat.slq(pyflat.Hessian(model, train), args.slq_probes,
                                 min(args.slq_steps, sum(p.numel() for p in model.parameters())),
                                 seed=0)
            density.plot(out / f"{stem}_density.png",
                         title=f"{title}, wd {mu:g}: Hessian density")
            run["density_png"] = f"{stem}_density.png"
            rows.append(run)
            runs.append(run)
        print(_demo_table(title, rows, sum(p.numel() for p in build().parameters())))
    summary = {"data": {"name": "scikit-learn digits", "train": len(train[1]),
                        "test": len(test[1])},
               "settings": {"steps": args.steps, "lr": args.lr, "seed": 0,
                            "weight_decays": args.weight_decays,
                            "trace_products": args.trace_products,
                            "frobenius_probes": args.frobenius_probes,
                            "slq_probes": args.slq_probes, "slq_steps": args.slq_steps,
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
    return 0


def _demo_table(title: str, rows: list[dict], P: int) -> str:
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


# ---------------------------------------------------------------------- sharpness

def _load_entry(spec: str):
    if ":" not in spec:
        raise UsageError(f"--entry must be 'module:function' (a Python module on the path or "
                         f"a .py file, and a function returning (model, data)); got {spec!r}")
    module_name, function_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--entry: no such file: {module_name}")
            loader = importlib.machinery.SourceFileLoader(path.stem, str(path))
            spec_ = importlib.util.spec_from_loader(path.stem, loader)
            module = importlib.util.module_from_spec(spec_)
            loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"--entry: cannot import {module_name!r}: {type(err).__name__}: "
                         f"{err}") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise UsageError(f"--entry: {module_name!r} has no function {function_name!r}")
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UsageError(f"--entry: {spec} must return (model, data) with model an nn.Module "
                         f"and data a batch (X, y) or an iterable of batches; got "
                         f"{type(result).__name__}")
    return result


class _Moved:
    """An iterable of batches moved to a device and dtype as they come."""

    def __init__(self, batches, device, dtype):
        self.batches, self.device, self.dtype = batches, device, dtype

    def __iter__(self):
        for X, y in self.batches:
            # token ids stay integers; inputs take the model's dtype
            X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
            yield X, y.to(self.device)


def sharpness_command(args) -> int:
    import pyflat

    model, data = _load_entry(args.entry)
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise UsageError(f"--checkpoint: no such file: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as err:
            raise UsageError(f"--checkpoint: {path} does not fit the model: "
                             f"{str(err).splitlines()[0]}") from None
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    model = model.to(device=device, dtype=dtype).eval()
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        X = data[0].to(device, dtype) if data[0].is_floating_point() else data[0].to(device)
        data = (X, data[1].to(device))
    elif hasattr(data, "__next__"):
        # products read the batches many times; an iterator would be empty after the first
        raise UsageError(f"--entry: {args.entry} returned an iterator or generator of batches, "
                         "which can be read only once; return a list of batches or a "
                         "DataLoader")
    else:
        data = _Moved(data, device, dtype)
    try:
        report = pyflat.sharpness(model, data, curvature=args.curvature,
                                  weight_decay=args.weight_decay, with_l2=args.with_l2,
                                  k=args.k, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(report)
    if args.out:
        report.to_json(args.out)
        print(f"wrote {args.out}")
    return 0


# -------------------------------------------------------------------------- bench

def bench(args) -> int:
    try:
        from bench import sweep
    except ImportError:
        raise UsageError("pyflat bench runs the benchmark sweep in a source checkout's bench/ "
                         "folder: run it from the repository root") from None
    argv = ["--out", args.out, "--device", args.device]
    if args.quick:
        argv += ["--models", "mlp128", "cnn", "--batches", "256", "--ks", "1", "4",
                 "--seconds", "0.3"]
    for flag in ("models", "batches", "ks"):
        if getattr(args, flag):
            argv += [f"--{flag}", *map(str, getattr(args, flag))]
    if args.seconds is not None:
        argv += ["--seconds", str(args.seconds)]
    return sweep.main(argv)


# --------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyflat", description="Fast, exact curvature of cross-entropy networks.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="command")

    d = sub.add_parser("demo", help="the paper's central finding on scikit-learn's digits",
                       description="Trains logistic regression and an MLP on scikit-learn's "
                       "bundled digits with a sweep of weight decay, then measures the GGN "
                       "and Hessian (spectral norm, trace, Frobenius norm, rank; cross-"
                       "entropy alone and with the L2 term) and writes JSON and spectral-"
                       "density plots.")
    d.add_argument("--out", default="pyflat-demo", help="output folder (default: pyflat-demo)")
    d.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 1e-3, 1e-2],
                   help="the L2 coefficients mu of CE + mu/2 |theta|^2 (default: 0 1e-3 1e-2)")
    d.add_argument("--steps", type=int, default=1000, help="full-batch Adam steps")
    d.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    d.add_argument("--width", type=int, default=32, help="hidden width of the MLP")
    d.add_argument("--train-size", type=int, default=1200, help="training images (of 1,797)")
    d.add_argument("--trace-products", type=int, default=99, help="Hutch++ products")
    d.add_argument("--frobenius-probes", type=int, default=30)
    d.add_argument("--slq-probes", type=int, default=10)
    d.add_argument("--slq-steps", type=int, default=80)
    d.set_defaults(run=demo)

    s = sub.add_parser("sharpness", help="the sharpness report of your model and data",
                       description="Loads (model, data) from a Python entry point and prints "
                       "the sharpness report; writes JSON with --out.")
    s.add_argument("--entry", required=True,
                   help="module:function or path/to/file.py:function returning (model, data); "
                        "data is a batch (X, y) or an iterable of batches")
    s.add_argument("--checkpoint", help="a state_dict saved with torch.save, loaded into model")
    s.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--with-l2", action="store_true",
                   help="measure CE + mu/2 |theta|^2 instead of the cross-entropy alone")
    s.add_argument("--k", type=int, default=5, help="top eigenvalues")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    s.add_argument("--out", help="write the report as JSON here")
    s.set_defaults(run=sharpness_command)

    b = sub.add_parser("bench", help="pyflat against autograd: products per second",
                       description="Sweeps models (MLPs of two widths, a CNN), batch sizes and "
                       "k, timing pyflat against torch.func and double-backward autograd, each "
                       "checked against the float64 reference first; writes sweep.json, "
                       "sweep.md and sweep.png. Run from a source checkout (bench/).")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--quick", action="store_true", help="fewer models, one batch size")
    b.add_argument("--models", nargs="+", help="mlp128, mlp512, cnn (default: all)")
    b.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 128 1024)")
    b.add_argument("--ks", type=int, nargs="+", help="directions per call (default: 1 8)")
    b.add_argument("--seconds", type=float, help="minimum timing time per case")
    b.set_defaults(run=bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as err:
        if args.traceback:
            raise
        print(f"pyflat {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
