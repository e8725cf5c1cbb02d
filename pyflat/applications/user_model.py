"""``pyflat sharpness``: the sharpness report of a user's model and data.

The model and data come from an entry point, a function ``build()`` returning
``(model, data)``, named as ``module:function`` or ``path/to/file.py:function``; weights
optionally from a checkpoint (a state_dict, read as tensors only). The batches are
checked to be ``(X, y)`` pairs of tensors and moved to the device and dtype as they are
read; one forward pass on the first batch finds a model that does not fit its data before
the measurement starts. Whatever the user can fix ends in a :class:`UsageError` whose
message names the option it came from.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..analysis import SharpnessReport, sharpness
from .usage import UsageError, first_line, usable_device, writable_file

__all__ = ["entry_sharpness", "load_checkpoint", "load_entry", "prepare_data"]


def load_entry(spec: str):
    """Imports ``module:function`` (a module on the path, the working folder included, or
    a .py file) and returns what the function returns, checked to be (model, data) with
    model an nn.Module."""
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
        raise UsageError(f"--entry: {spec} raised {first_line(err)} (pyflat --traceback "
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


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Loads a state_dict (or a dict holding one under "state_dict") into ``model``; reads
    tensors only (``weights_only``), never runs code from the file."""
    path = Path(path)
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
                         f"damaged): torch.load says {first_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise UsageError(f"--checkpoint: {path} does not fit the model: {detail}") from None


def prepare_data(data, entry: str, device: torch.device, dtype: torch.dtype):
    """The entry's data as a batch moved to ``device`` (floating inputs also to ``dtype``)
    or an iterable of such batches, moved as they are read, and its first batch.

    Refuses an iterator (products read the data many times), anything that is not a batch
    or an iterable of batches, and an iterable without batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(
            isinstance(t, torch.Tensor) for t in data):
        data = first = _moved(*_pair(data, entry, "the batch (X, y)"), device, dtype)
        return data, first
    if hasattr(data, "__next__"):
        # products read the batches many times; an iterator would be empty after the first
        raise UsageError(f"--entry: {entry} returned an iterator or generator of batches, "
                         "which can be read only once; return a list of batches or a "
                         "DataLoader")
    if not hasattr(data, "__iter__") or isinstance(data, (torch.Tensor, str, bytes, dict)):
        raise UsageError(f"--entry: the data of {entry} must be a batch (X, y) or an "
                         f"iterable of (X, y) batches (a list, a DataLoader), got "
                         f"{_describe(data)}")
    data = _Moved(data, entry, device, dtype)
    first = next(iter(data), None)
    if first is None:
        raise UsageError(f"--entry: the data of {entry} has no batches")
    return data, first


def entry_sharpness(entry: str, *, checkpoint: str | Path | None = None,
                    curvature: str = "hessian", weight_decay: float = 0.0,
                    with_l2: bool = False, k: int = 5, seed: int = 0, device: str = "cpu",
                    dtype: str = "float64", out: str | Path | None = None) -> SharpnessReport:
    """The sharpness report of the (model, data) that ``entry`` builds, printed, and
    written as JSON to ``out`` when given.

    What the arguments alone decide (the device, the L2 options, that ``out`` can be
    written) is checked before the entry's code runs. The model (with the checkpoint's
    weights when given) moves to ``device`` and ``dtype`` ("float32" or "float64") in eval
    mode; the other arguments are :func:`pyflat.sharpness`'s, whose TypeError and
    ValueError become UsageError here.
    """
    # everything the arguments alone decide, before the user's code loads data
    device = usable_device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    if with_l2 and weight_decay <= 0:
        raise UsageError(f"--with-l2 measures CE + mu/2 |theta|^2 and needs --weight-decay > 0, "
                         f"got {weight_decay:g}")
    if out:
        writable_file(Path(out), "--out")
    model, data = load_entry(entry)
    if checkpoint:
        load_checkpoint(model, Path(checkpoint))
    model = model.to(device=device, dtype=dtype).eval()
    data, first = prepare_data(data, entry, device, dtype)
    # one forward pass on one batch finds a model that does not fit its data cheaply
    try:
        with torch.no_grad():
            model(first[0].clone())
    except Exception as err:
        raise UsageError(f"--entry: the model of {entry} fails on the first batch: "
                         f"{first_line(err)}") from err
    try:
        report = sharpness(model, data, curvature=curvature, weight_decay=weight_decay,
                           with_l2=with_l2, k=k, seed=seed)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(report)
    if out:
        report.to_json(out)
        print(f"wrote {out}")
    return report
