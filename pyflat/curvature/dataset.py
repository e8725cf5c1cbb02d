"""Curvature over a whole data set: the sample-weighted sum of per-batch operators.

The data-set curvature is sum_i (B_i / N) G_i for mean reduction (G_i the mean-reduced
batch curvature), i.e. the sum over batches of the sum-reduced curvatures divided by the
total sample count N: a short last batch weighs what its samples weigh (the front door
adds the L2 term once, after the sum). Prepared batches (the forward quantities the
products reuse) are kept while they fit a memory budget; batches beyond it are prepared
again for every product from the data source, which must then yield the same batches each
pass.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..linalg import CurvatureOperator
from .batch import BatchCurvature
from .checks import forward_already_checked

__all__ = ["DatasetCurvature", "default_cache_bytes"]


def default_cache_bytes(device: torch.device) -> int:
    """Half of the free memory of a GPU, a quarter of the RAM of the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def batches_of(data, batch_size: int | None, caller: str) -> Callable[[], Iterable]:
    """A function returning a fresh iterator over (X, y) batches of ``data``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        X, y = data
        if batch_size is None:
            return lambda: iter([(X, y)])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"{caller}: batch_size must be an int >= 1, got "
                            f"{type(batch_size).__name__} {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"{caller}: batch_size must be an int >= 1, got {batch_size!r}")
        if y.shape[:1] != X.shape[:1]:
            raise ValueError(f"{caller}: y must have shape ({X.shape[0]},) to match X, got "
                             f"{tuple(y.shape)}")
        return lambda: zip(X.split(batch_size), y.split(batch_size))
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(
            isinstance(t, np.ndarray) for t in data):
        raise TypeError(f"{caller}: data must be a pair (X, y) of torch tensors, got "
                        f"{_describe(data)}; torch.from_numpy converts numpy arrays")
    if isinstance(data, (torch.Tensor, str, bytes)) or (
            isinstance(data, (tuple, list)) and len(data) == 2 and any(
                isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, a DataLoader or an "
                        f"iterable of (X, y) batches, got {_describe(data)}")
    if batch_size is not None:
        raise ValueError(f"{caller}: batch_size applies to a tensor pair (X, y); a data loader "
                         "brings its own batches")
    if hasattr(data, "__next__"):
        raise TypeError(f"{caller}: data is an iterator, which can be read only once; pass a "
                        "DataLoader, a list of (X, y) batches or a tensor pair")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, a DataLoader or an "
                        f"iterable of (X, y) batches, got {type(data).__name__}")
    return lambda: iter(data)


def _fingerprint(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What identifies the samples of a batch at the cost of a few reductions: pairs
    (value, magnitude) in float64 of the sample count, the sums of X and X^2, of y and
    y^2, and of y times each sample's sum of X (which ties labels to inputs). Sums over
    a pass do not depend on the order of samples or batches, beyond rounding."""
    with torch.no_grad():
        x = X.detach().reshape(X.shape[0], -1).double()
        labels = y.detach().reshape(-1).double()
        rows, rows_abs, squares = x.sum(1), x.abs().sum(1), x.square().sum()
        count = torch.tensor(float(X.shape[0]), dtype=torch.float64, device=x.device)
        pairs = [(count, count), (rows.sum(), rows_abs.sum()), (squares, squares),
                 (labels.sum(), labels.abs().sum()), (labels.square().sum(),) * 2,
                 ((labels * rows).sum(), (labels.abs() * rows_abs).sum())]
        return torch.stack([t for pair in pairs for t in pair]).cpu()


def _state_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares of every parameter and buffer, in float64: any write to the
    model's state (in place, through .data or numpy) changes it."""
    with torch.no_grad():
        parts = [t.detach().double() for t in (*model.parameters(), *model.buffers())
                 if t.is_floating_point()]
        sums = [torch.stack([t.sum(), t.square().sum()]) for t in parts]
        return torch.cat(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)


def _describe(data) -> str:
    if isinstance(data, (tuple, list)):
        return f"({', '.join(type(t).__name__ for t in data)})"
    return type(data).__name__


class DatasetCurvature(CurvatureOperator):
    """Sum over batches of sum-reduced batch operators, scaled to the data set's mean.

    Args:
        make_batch_operator: (X, y, backend=...) -> a sum-reduced operator of one batch;
            batches prepared again pass the backend chosen at construction.
        batches: a function returning a fresh iterator over (X, y) batches.
        reduction: "mean" (divide by the total sample count) or "sum".
        cache_bytes: memory for prepared batches; beyond it batches are re-prepared.
        device, dtype: where batches go (the model's).
        distributed, process_group: each rank holds a shard of the data; the sample count,
            the loss and every product are summed across the ranks of the group (NCCL on
            GPUs, gloo on CPUs) with one all_reduce.
    """

    def __init__(self, make_batch_operator, batches: Callable[[], Iterable], *,
                 reduction: str, cache_bytes: int,
                 device: torch.device, dtype: torch.dtype, caller: str,
                 process_group=None, distributed: bool = False,
                 model: torch.nn.Module | None = None):
        self._make = make_batch_operator
        self._batches = batches
        self._device, self._dtype = device, dtype
        self._caller = caller
        self._model = model
        # batches past the budget are prepared again from the live model: it must be the
        # model as it was now, or the operator would stop being a snapshot
        self._model_print = None if model is None else _state_fingerprint(model)
        self._cached: list[BatchCurvature] = []
        held = 0
        num_samples, num_batches, loss_sum = 0, 0, 0.0
        first, block = None, None
        #: per batch, what a later pass must yield again (see _fingerprint)
        self._fingerprints: list[torch.Tensor] = []
        for X, y in self._iterate():
            op = self._make(X, y)
            first = first or op
            bound = op.block_size()
            if bound is not None:  # the tightest batch bounds every product call
                block = bound if block is None else min(block, bound)
            self._fingerprints.append(_fingerprint(X, y))
            num_batches += 1
            num_samples += op.num_samples
            loss_sum += op.loss
            size = op.prepared_bytes()
            if len(self._cached) == num_batches - 1 and held + size <= cache_bytes:
                self._cached.append(op)
                held += size
        if first is None:
            raise ValueError(f"{caller}: the data yielded no batch")
        self._group = None
        if distributed:
            # every rank holds a shard: sample counts and losses are summed across ranks
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(f"{caller}: distributed=True needs an initialized "
                                   "torch.distributed process group (torchrun, or "
                                   "init_process_group)")
            self._group = process_group
            totals = torch.tensor([float(num_samples), loss_sum], dtype=torch.float64,
                                  device=first.device)
            dist.all_reduce(totals, group=process_group)
            num_samples, loss_sum = int(totals[0]), float(totals[1])
        super().__init__(first.layout, first.dtype, first.device)
        self.backend = first.backend
        self.engine = first.engine
        self.num_samples, self.num_batches = num_samples, num_batches
        self.num_classes = first.num_classes
        self._block_size = block
        self.reduction = reduction
        self._distributed = distributed
        self._scale = 1.0 / num_samples if reduction == "mean" else 1.0
        #: the data set's cross-entropy (mean over all samples, or their sum)
        self.loss = loss_sum * self._scale
        #: which path the products take and the memory the prepared batches hold
        self.cache_report = {"batches": num_batches, "cached_batches": len(self._cached),
                             "bytes_held": held, "budget_bytes": cache_bytes,
                             "path": "all batches cached" if len(self._cached) == num_batches
                             else "batches past the budget prepared again per product"}

    def block_size(self) -> int | None:
        """The smallest bound of the batches' operators, read at construction."""
        return self._block_size

    def _iterate(self):
        for batch in self._batches():
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{self._caller}: every batch must be a pair (X, y), got "
                                f"{type(batch).__name__}")
            X, y = batch
            if X.is_floating_point():
                X = X.to(device=self._device, dtype=self._dtype)
            else:
                X = X.to(self._device)
            yield X, y.to(self._device)

    def _check_same_samples(self, seen: torch.Tensor) -> None:
        """The batches read again must hold the samples read at construction in their
        places (a shuffle among them changes only rounding, so sums are compared with a
        relative tolerance): the products would otherwise sum another data set."""
        expected = torch.stack(self._fingerprints[len(self._cached):]).sum(0)
        value, magnitude = expected[0::2], expected[1::2]
        if not bool(((seen[0::2] - value).abs() <= 1e-9 * magnitude).all()):
            raise ValueError(f"{self._caller}: the batches read again differ from those read at "
                             "construction (other samples, inputs or labels); batches past the "
                             "cache budget are read again for every product, so the data must "
                             "yield the same samples every pass (no random augmentation, and no "
                             "shuffle unless nothing is cached), or raise cache_bytes to keep "
                             "them all")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for op in self._cached:
            out.add_(op._matmat(V))
        if len(self._cached) < self.num_batches:
            if self._model is not None and not torch.equal(_state_fingerprint(self._model),
                                                           self._model_print):
                raise ValueError(f"{self._caller}: the model's parameters or buffers changed "
                                 "after the operator was built; batches past the cache budget "
                                 "are prepared again from the model, so build a new operator "
                                 "(or raise cache_bytes to keep every batch prepared)")
            count, seen = 0, None
            for index, (X, y) in enumerate(self._iterate()):
                count += 1
                if index >= self.num_batches:
                    break
                if index >= len(self._cached):
                    batch = _fingerprint(X, y)
                    seen = batch if seen is None else seen + batch
                    # its samples' logits were checked at construction; the pass's
                    # fingerprint below proves they are the same samples
                    # the backend chosen at construction: a hook added since then is
                    # refused by the fused engines instead of changing the function
                    with forward_already_checked():
                        operator = self._make(X, y, backend=self.backend)
                    out.add_(operator._matmat(V))
            if count != self.num_batches:
                more = "more than " if count > self.num_batches else ""
                raise ValueError(
                    f"{self._caller}: the data yielded {more}{count} batches on this pass and "
                    f"{self.num_batches} at construction; "
                    "batches past the cache budget are read again for every product, so the "
                    "data must yield the same batches every pass (a DataLoader or a list, not "
                    "a one-shot generator), or raise cache_bytes to keep them all")
            self._check_same_samples(seen)
        if self._distributed:
            import torch.distributed as dist

            dist.all_reduce(out, group=self._group)  # one reduction of the parameter-sized sum
        return out.mul_(self._scale)
