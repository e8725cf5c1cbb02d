"""The ``pyflat`` command line: ``pyflat demo``, ``pyflat sharpness``, ``pyflat bench``.

Errors a user can fix (a bad argument, a missing file, a bad entry point, a checkpoint that
is not a state_dict, data that are not (X, y) batches, an unsupported model) end in one line
on stderr and exit status 2; ``--traceback`` shows the whole story. What the arguments alone
decide (their ranges, the device, where results go) is checked before any user code runs or
any training starts.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for, reported in one line."""


class _ArgumentError(UsageError):
    """An argument argparse refused, with the prog of the (sub)parser that refused it."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused argument ends in one line (no usage block) and ``main``
    returns 2 instead of the parser exiting."""

    def error(self, message: str):
        raise _ArgumentError(self.prog, message)


def _integer(minimum: int, why: str = ""):
    """An argparse type: an integer >= minimum; ``why`` says where the minimum comes from."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            got = repr(text) if value is None else value
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, got {got}")
        return value

    return parse


def _number(minimum: float, inclusive: bool):
    """An argparse type: a finite float above minimum (or equal to it when inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum or (
                value == minimum and not inclusive):
            got = repr(text) if value is None else text
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {got}")
        return value

    return parse


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The error's type and first line, cut to its first sentence when that line is long."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[0]
    if len(line) > limit:
        end = line.find(". ", 0, limit)
        line = line[:end + 1] if end > 0 else line[:limit - 3] + "..."
    return f"{type(err).__name__}: {line}"


def _writable_folder(path: Path, option: str) -> None:
    """Creates ``path`` (and its parents) unless it exists, and proves a file can be
    written in it, so that a run does not fail at its end for want of a place to write."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}: {path} is a file; give a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{option}: cannot write in the folder {path}: "
                         f"{err.strerror or err}") from None


def _writable_file(path: Path, option: str) -> None:
    """Proves ``path`` can be written (the file is opened for appending, which leaves an
    existing file as it was, and a new one is removed again), before the work starts."""
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{option}: cannot write {path}: {folder} {what}")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{option}: cannot write {path}: {err.strerror or err}") from None
    if not existed:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- demo

def _digits(dtype: torch.dtype, train_size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("pyflat demo needs scikit-learn for its bundled digits data: "
                         "pip install scikit-learn") from None
    data = load_digits()
    images = len(data.target)
    if train_size >= images:
        raise UsageError(f"--train-size must leave test images: at most {images - 1} of the "
                         f"{images:,} digits, got {train_size}")
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
    _writable_folder(out, "--out")
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
    try:
        result = fn()
    except Exception as err:
        raise UsageError(f"--entry: {spec} raised {_first_line(err)} (pyflat --traceback "
                         f"sharpness ... shows where)") from err
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UsageError(f"--entry: {spec} must return (model, data) with model an nn.Module "
                         f"and data a batch (X, y) or an iterable of batches; got "
                         f"{type(result).__name__}")
    return result


def _describe(value) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:4]) + (", ..." if len(value) > 4 else "")
        return f"a dict (keys {keys})"
    if isinstance(value, (tuple, list)):
        return (f"a {type(value).__name__} of {len(value)} "
                f"({', '.join(type(v).__name__ for v in value[:4])}"
                + (", ...)" if len(value) > 4 else ")"))
    return f"a {type(value).__name__}"


def _pair(batch, entry: str, what: str):
    """``batch`` as (X, y), or the one line that says what came instead."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
            isinstance(t, torch.Tensor) for t in batch):
        return batch
    raise UsageError(f"--entry: {what} of {entry} must be a pair (X, y) of tensors, got "
                     f"{_describe(batch)}")


def _moved(X: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype):
    # token ids stay integers; inputs take the model's dtype
    X = X.to(device, dtype) if X.is_floating_point() else X.to(device)
    return X, y.to(device)


class _Moved:
    """An iterable of batches checked and moved to a device and dtype as they come."""

    def __init__(self, batches, entry: str, device, dtype):
        self.batches, self.entry, self.device, self.dtype = batches, entry, device, dtype

    def __iter__(self):
        for batch in self.batches:
            yield _moved(*_pair(batch, self.entry, "each batch of the data"), self.device,
                         self.dtype)


def _device(name: str) -> torch.device:
    """``--device`` as a torch.device where tensors can live and hold values."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda or cuda:<index>, got {name!r}") from None
    if device.type == "meta":
        raise UsageError("--device meta holds shapes but no values, so there is nothing to "
                         "measure: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch")
    try:
        torch.empty(1, device=device)
    except Exception as err:
        raise UsageError(f"--device {name} is not usable here: {_first_line(err)}") from None
    return device


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    """Loads a state_dict (or a dict holding one under "state_dict") into ``model``; reads
    tensors only (``weights_only``), never runs code from the file."""
    if not path.is_file():
        raise UsageError(f"--checkpoint: no such file: {path}")
    if path.stat().st_size == 0:
        raise UsageError(f"--checkpoint: {path} is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise UsageError(f"--checkpoint: {path} holds a pickled {found.group(1)}, not a "
                             "state_dict (was it saved with torch.save(model)?); save "
                             "model.state_dict() instead: pyflat loads tensors only") from err
        raise UsageError(f"--checkpoint: {path} is not a file torch.save wrote (or it is "
                         "damaged): torch.load cannot read it") from err
    except Exception as err:
        raise UsageError(f"--checkpoint: {path} is not a file torch.save wrote (or it is "
                         f"damaged): torch.load says {_first_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise UsageError(f"--checkpoint: {path} does not fit the model: {detail}") from None


def sharpness_command(args) -> int:
    import pyflat

    # everything the arguments alone decide, before the user's code loads data
    device = _device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.with_l2 and args.weight_decay <= 0:
        raise UsageError(f"--with-l2 measures CE + mu/2 |theta|^2 and needs --weight-decay > 0, "
                         f"got {args.weight_decay:g}")
    if args.out:
        _writable_file(Path(args.out), "--out")
    model, data = _load_entry(args.entry)
    if args.checkpoint:
        _load_checkpoint(model, Path(args.checkpoint))
    model = model.to(device=device, dtype=dtype).eval()
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(
            isinstance(t, torch.Tensor) for t in data):
        data = first = _moved(*_pair(data, args.entry, "the batch (X, y)"), device, dtype)
    elif hasattr(data, "__next__"):
        # products read the batches many times; an iterator would be empty after the first
        raise UsageError(f"--entry: {args.entry} returned an iterator or generator of batches, "
                         "which can be read only once; return a list of batches or a "
                         "DataLoader")
    elif not hasattr(data, "__iter__") or isinstance(data, (torch.Tensor, str, bytes, dict)):
        raise UsageError(f"--entry: the data of {args.entry} must be a batch (X, y) or an "
                         f"iterable of (X, y) batches (a list, a DataLoader), got "
                         f"{_describe(data)}")
    else:
        data = _Moved(data, args.entry, device, dtype)
        first = next(iter(data), None)
        if first is None:
            raise UsageError(f"--entry: the data of {args.entry} has no batches")
    # one forward pass on one batch finds a model that does not fit its data cheaply
    try:
        with torch.no_grad():
            model(first[0].clone())
    except Exception as err:
        raise UsageError(f"--entry: the model of {args.entry} fails on the first batch: "
                         f"{_first_line(err)}") from err
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
        from pyflat.bench import sweep  # an installed wheel ships bench/ as pyflat.bench
    except ModuleNotFoundError as err:
        if err.name != "pyflat.bench":
            raise
        try:
            from bench import sweep  # a source checkout, run from its root
        except ModuleNotFoundError as err:
            if err.name != "bench":
                raise
            raise UsageError("pyflat bench: the benchmark sweep (bench/) is missing from this "
                             "install; reinstall pyflat or run from the repository root") \
                from None
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

_HUTCHPP_MINIMUM = " (Hutch++ spends them in three equal parts of at least 2)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    d.add_argument("--weight-decays", type=_number(0.0, inclusive=True), nargs="+",
                   default=[0.0, 1e-3, 1e-2],
                   help="the L2 coefficients mu >= 0 of CE + mu/2 |theta|^2 (default: 0 1e-3 "
                        "1e-2)")
    d.add_argument("--steps", type=_integer(0), default=1000,
                   help="full-batch Adam steps (0: measure the initialisation)")
    d.add_argument("--lr", type=_number(0.0, inclusive=False), default=0.02,
                   help="Adam learning rate")
    d.add_argument("--width", type=_integer(1), default=32, help="hidden width of the MLP")
    d.add_argument("--train-size", type=_integer(1), default=1200,
                   help="training images (of 1,797; the rest are the test set)")
    d.add_argument("--trace-products", type=_integer(6, _HUTCHPP_MINIMUM), default=99,
                   help="Hutch++ products, used in three equal parts (at least 6)")
    d.add_argument("--frobenius-probes", type=_integer(2, " (a standard error needs 2)"),
                   default=30)
    d.add_argument("--slq-probes", type=_integer(1), default=10)
    d.add_argument("--slq-steps", type=_integer(1), default=80)
    d.set_defaults(run=demo)

    s = sub.add_parser("sharpness", help="the sharpness report of your model and data",
                       description="Loads (model, data) from a Python entry point and prints "
                       "the sharpness report; writes JSON with --out.")
    s.add_argument("--entry", required=True,
                   help="module:function or path/to/file.py:function returning (model, data); "
                        "data is a batch (X, y) or an iterable of batches")
    s.add_argument("--checkpoint", help="a state_dict saved with torch.save, loaded into model")
    s.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    s.add_argument("--weight-decay", type=_number(0.0, inclusive=True), default=0.0,
                   help="mu >= 0 of the L2 term mu/2 |theta|^2")
    s.add_argument("--with-l2", action="store_true",
                   help="measure CE + mu/2 |theta|^2 instead of the cross-entropy alone")
    s.add_argument("--k", type=_integer(1), default=5, help="top eigenvalues")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    s.add_argument("--out", help="write the report as JSON here")
    s.set_defaults(run=sharpness_command)

    b = sub.add_parser("bench", help="pyflat against autograd: products per second",
                       description="Sweeps models (MLPs of two widths, a CNN), batch sizes and "
                       "k, timing pyflat against torch.func and double-backward autograd, each "
                       "checked against the float64 reference first; writes sweep.json, "
                       "sweep.md and sweep.png.")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--quick", action="store_true", help="fewer models, one batch size")
    b.add_argument("--models", nargs="+", help="mlp128, mlp512, cnn (default: all)")
    b.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 128 1024)")
    b.add_argument("--ks", type=int, nargs="+", help="directions per call (default: 1 8)")
    b.add_argument("--seconds", type=float, help="minimum timing time per case")
    b.set_defaults(run=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as err:
        _report(err.prog, err)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as err:
        if args.traceback:
            raise
        _report(f"pyflat {args.command}", err)
        return 2


def _report(prog: str, err: UsageError) -> None:
    """The one line on stderr, whatever line breaks the message brought along."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
