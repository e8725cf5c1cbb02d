"""The curvature front door: GGN and exact Hessian of a cross-entropy loss, as operators.

``GGN`` and ``Hessian`` check their arguments and the model, choose a back end once (the
MLP or graph engine where the model allows, the autograd reference otherwise; see
:mod:`pyflat.curvature.batch`) for a batch, or wrap a whole data set
(:mod:`pyflat.curvature.dataset`), and add the L2 term mu I. They follow the operator
protocol of :mod:`pyflat.linalg`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..linalg import CurvatureOperator
from .batch import BatchCurvature, batch_curvature
from .checks import check_batch, check_eval_mode, check_model_state, model_dtype_device
from .dataset import DatasetCurvature, batches_of, default_cache_bytes

__all__ = ["GGN", "Hessian"]


def prepared_batch(model: nn.Module, data, *, exact: bool, reduction: str, backend: str,
                   caller: str, warn_stacklevel: int = 2) -> BatchCurvature:
    """The batch operator of ``backend`` after the checks every back end shares (so a
    failing one is not a reason to fall back): the model's dtype, device, mode and
    BatchNorm statistics, and the batch against them."""
    named = list(model.named_parameters())
    if named:
        dtype, device = model_dtype_device([p for _, p in named], [n for n, _ in named],
                                           caller, kernels=False)
        check_batch(data, dtype, device, None, caller, allow_integer=True)
    check_eval_mode(model, caller)
    check_model_state(model, caller)
    return batch_curvature(model, data, exact=exact, reduction=reduction, backend=backend,
                           caller=caller, warn_stacklevel=warn_stacklevel + 1)


class _Curvature(CurvatureOperator):
    _exact: bool

    def __init__(self, model: nn.Module, data, *, reduction: str = "mean",
                 weight_decay: float = 0.0, backend: str = "auto",
                 batch_size: int | None = None, cache_bytes: int | None = None,
                 check_determinism: bool = True, distributed: bool = False,
                 process_group=None):
        caller = f"pyflat.{type(self).__name__}"
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{caller}: reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
            raise TypeError(f"{caller}: weight_decay must be a number (mu of mu I), got "
                            f"{type(weight_decay).__name__} {weight_decay!r}")
        if not np.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"{caller}: weight_decay must be a finite number >= 0, got "
                             f"{weight_decay!r}")
        if backend not in ("auto", "fused", "reference"):
            raise ValueError(f"{caller}: backend must be 'auto', 'fused' or 'reference', got "
                             f"{backend!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        self.reduction = reduction
        #: mu of the L2 term mu I, added once to every product
        self.weight_decay = float(weight_decay)
        single = isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data)
        if single and batch_size is None and not distributed:
            inner = prepared_batch(model, data, exact=self._exact, reduction=reduction,
                                   backend=backend, caller=caller)
        else:
            inner = self._dataset(model, data, backend, batch_size, cache_bytes, caller,
                                  distributed, process_group)
        super().__init__(inner.layout, inner.dtype, inner.device)
        #: the operator of the back end chosen at construction: a batch operator
        #: (MLPBatch, GraphBatch, ReferenceBatch) or a DatasetCurvature summing them
        self.backend_operator = inner
        #: "fused" or "reference" (autograd); ``engine``: "mlp", "graph" or None
        self.backend, self.engine = inner.backend, inner.engine
        self.num_samples, self.num_classes = inner.num_samples, inner.num_classes
        #: the cross-entropy (without the L2 term) at the batch or over the data set
        self.loss = inner.loss
        if isinstance(inner, DatasetCurvature):
            self.num_batches, self.cache_report = inner.num_batches, inner.cache_report
            if check_determinism:
                self._check_determinism(caller)

    def _dataset(self, model, data, backend, batch_size, cache_bytes, caller, distributed,
                 process_group) -> DatasetCurvature:
        """Many batches: a DatasetCurvature of sum-reduced batch operators."""
        params = list(model.parameters())
        if not params:
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtype, device = params[0].dtype, params[0].device
        batches = batches_of(data, batch_size, caller)
        budget = default_cache_bytes(device) if cache_bytes is None else int(cache_bytes)
        exact = self._exact

        def make(X, y, backend=backend):
            return prepared_batch(model, (X, y), exact=exact, reduction="sum",
                                  backend=backend, caller=caller, warn_stacklevel=5)

        return DatasetCurvature(make, batches, reduction=self.reduction, cache_bytes=budget,
                                device=device, dtype=dtype, caller=caller,
                                distributed=distributed, process_group=process_group,
                                model=model)

    def _check_determinism(self, caller: str) -> None:
        """Two products on one vector must agree: a run of hundreds relies on it."""
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(self.shape[0], 1, generator=gen, dtype=torch.float64)
        v = v.to(dtype=self.dtype, device=self.device)
        first = self.backend_operator._matmat(v)
        second = self.backend_operator._matmat(v)
        tol = 1e-12 if self.dtype == torch.float64 else 1e-5
        if not torch.allclose(first, second, rtol=tol, atol=tol * float(first.abs().max())):
            raise ValueError(f"{caller}: two products on the same vector differ (relative "
                             f"{float((first - second).abs().max() / first.abs().max()):.1e}): "
                             "the data must come in the same order every pass (shuffle=False, "
                             "fixed augmentation) and the model must be deterministic "
                             "(model.eval(), no dropout)")

    def block_size(self) -> int | None:
        """The back end's bound on directions per product call (None: the reference)."""
        return self.backend_operator.block_size()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.backend_operator._matmat(V)
        if self.weight_decay:  # once, after the sum over batches (and ranks)
            out = out.add(V, alpha=self.weight_decay)
        return out


class GGN(_Curvature):
    r"""Generalized Gauss-Newton matrix of a cross-entropy loss: G = J^T H_loss J (+ mu I).

    J is the Jacobian of the logits w.r.t. the parameters and H_loss the Hessian of the
    cross-entropy w.r.t. the logits, diag(p) - p p^T per sample (divided by B for
    ``reduction="mean"``). G is positive semi-definite (Schraudolph 2002; Martens 2010).
    A product G V, V of shape (P, k), runs as forward-mode tangents J V of the logits,
    the loss Hessian on them, and one backward pass, with the forward pass cached.

    With ``weight_decay=mu`` the objective is CE + mu/2 |theta|^2 and the operator is
    G + mu I: the L2 term is convex, so its Hessian mu I joins the GGN whole. With
    ``weight_decay=0`` (the default) the operator is the cross-entropy part alone; the two
    views differ by a shift of every eigenvalue by mu.

    The forward pass is computed once, at construction, and reused by every product; the
    operator keeps a copy of the weights, so it describes the model as it was then.

    Args:
        model: float32 or float64, in eval mode. An ``nn.Sequential`` of Linear layers and
            activations runs through the MLP engine; convnets and residual networks
            (Conv1d/Conv2d, pooling, eval-mode BatchNorm, additions, any ``forward()`` that
            torch.fx can trace; see :data:`pyflat.engines.graph.SUPPORTED`) through the graph
            engine; other models through the autograd reference (see ``backend``).
            BatchNorm counts as the fixed affine map of its running statistics, so the
            curvature is that of the eval-mode function; its weight and bias are
            parameters like any other.
        data: a batch ``(X, y)``; y holds class indices. See below for data sets.
        reduction: ``"mean"`` (the default, as ``F.cross_entropy``) or ``"sum"``.
        weight_decay: mu >= 0 of the L2 term mu/2 |theta|^2.
        data: a batch ``(X, y)``; or the whole data set: a DataLoader or any iterable of
            (X, y) batches that yields the same batches every pass, or a tensor pair split
            into batches of ``batch_size``. The curvature is then the sample-weighted
            average over batches (the sum for ``reduction="sum"``).
        batch_size: split a tensor pair into batches of this size.
        cache_bytes: memory for the prepared batches of a data set (default: half the
            free GPU memory, a quarter of host RAM); batches beyond it are prepared again
            for every product. ``cache_report`` says which path was taken.
        check_determinism: for a data set, check at construction that two products on one
            vector agree (a freshly augmenting data source fails it, with what to fix).
        distributed, process_group: ``data`` is this rank's shard of the data set; counts,
            losses and products are summed over the ranks (torch.distributed, one
            all_reduce per product) and the L2 term is added once, after the sum. Run the
            same algorithm with the same seeds on every rank; see the README for torchrun.
        backend: ``"fused"`` (the engine; a model it cannot take is refused with the
            module's name and path), ``"reference"`` (torch.func on the model's own
            forward: any model, exact, slower) or ``"auto"`` (the default: fused where the
            model allows, else the reference with one warning saying why). The
            ``backend`` attribute says which one runs.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> G = pyflat.GGN(model, (X, y))
        >>> G.shape
        (67, 67)
        >>> (G @ torch.randn(67, 5, dtype=torch.float64)).shape
        torch.Size([67, 5])
    """

    _exact = False


class Hessian(_Curvature):
    r"""Exact Hessian of a cross-entropy loss w.r.t. the parameters (+ mu I).

    H = G + sum_n sum_c (dloss/df_nc) d^2 f_nc / dtheta^2: the GGN plus the terms of the
    network's own curvature, weighted by the loss gradient. It can be indefinite. For
    piecewise-linear networks (ReLU) H != G in general, yet trace(H) = trace(G). A product
    H V is the R-operator of the gradient (Pearlmutter 1994): the GGN's passes plus the
    second-order terms of every layer, k directions at a time.

    ``weight_decay=mu`` adds mu I (the Hessian of mu/2 |theta|^2); arguments as
    :class:`GGN`.
    """

    _exact = True
