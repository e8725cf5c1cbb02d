"""The ``pyflat`` command line: ``pyflat demo``, ``pyflat sharpness``, ``pyflat bench``.

Errors a user can fix (a bad argument, a missing file, a bad entry point, a checkpoint that
is not a state_dict, data that are not (X, y) batches, an unsupported model) end in one line
on stderr and exit status 2; ``--traceback`` shows the whole story. What the arguments alone
decide (their ranges, the device, where results go) is checked before any user code runs or
any training starts.

This module builds the parser, parses, and calls the applications (pyflat.applications:
demo, user_model, sweep), which do the work and raise UsageError for what the user can fix.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from .allocator import tune_allocator
from .applications.demo import demo
from .applications.sweep import MODELS, sweep
from .applications.usage import UsageError
from .applications.user_model import entry_sharpness

__all__ = ["UsageError", "main"]


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


# ------------------------------------------------------------- the commands' calls

def _demo(args) -> int:
    demo(args.out, weight_decays=args.weight_decays, steps=args.steps, lr=args.lr,
         width=args.width, train_size=args.train_size, trace_products=args.trace_products,
         frobenius_probes=args.frobenius_probes, slq_probes=args.slq_probes,
         slq_steps=args.slq_steps)
    return 0


def _sharpness(args) -> int:
    entry_sharpness(args.entry, checkpoint=args.checkpoint, curvature=args.curvature,
                    weight_decay=args.weight_decay, with_l2=args.with_l2, k=args.k,
                    seed=args.seed, device=args.device, dtype=args.dtype, out=args.out)
    return 0


def _bench(args) -> int:
    return sweep(args.out, models=args.models, batches=args.batches, ks=args.ks,
                 seconds=args.seconds, device=args.device, quick=args.quick)


# --------------------------------------------------------------------------- main

def _allocator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone; by default this long run "
                             "calls pyflat.tune_allocator, so that large temporaries reuse "
                             "freed memory instead of faulting in fresh pages per product")


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
    _allocator_flag(d)
    d.set_defaults(run=_demo)

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
    _allocator_flag(s)
    s.set_defaults(run=_sharpness)

    b = sub.add_parser("bench", help="pyflat against autograd: products per second",
                       description="Sweeps models (MLPs of two widths, a CNN), batch sizes and "
                       "k, timing pyflat against torch.func and double-backward autograd, each "
                       "checked against the float64 reference first; writes sweep.json, "
                       "sweep.md and sweep.png.")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--quick", action="store_true", help="fewer models, one batch size")
    b.add_argument("--models", nargs="+", choices=list(MODELS), metavar="MODELS",
                   help=f"{', '.join(MODELS)} (default: all)")
    b.add_argument("--batches", type=_integer(1), nargs="+",
                   help="batch sizes (default: 128 1024)")
    b.add_argument("--ks", type=_integer(1), nargs="+", help="directions per call (default: 1 8)")
    b.add_argument("--seconds", type=float, help="minimum timing time per case")
    _allocator_flag(b)
    b.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pyflat`` with ``argv`` (default: the command line); returns the exit status:
    the command's, 2 for a mistake the user can fix (reported in one line on stderr)."""
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
        if not args.default_allocator:
            tune_allocator()
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
