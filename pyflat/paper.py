"""The further experiments of "Flatness is a False Friend" (Granziol, 2020), on the digits.

    python -m pyflat.paper            # all three, about half a minute on 2 CPU cores
    python -m pyflat.paper --help

Last-layer scaling, the rank of the logistic-regression Hessian, and the outliers of an
MLP's Hessian spectrum; pyflat/applications/experiments.py holds them and documents the
conditions of each. This module parses the arguments and runs them.
"""
from __future__ import annotations

import argparse
import sys

from .applications.experiments import run_all
from .applications.usage import UsageError

__all__ = ["main"]


def main(argv=None) -> int:
    """Runs ``python -m pyflat.paper`` with ``argv``; returns the exit status (2 when
    ``--out`` cannot be written)."""
    parser = argparse.ArgumentParser(prog="python -m pyflat.paper",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write all results as JSON here")
    args = parser.parse_args(argv)
    try:
        run_all(args.out)
    except UsageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
