"""The curvature front door: GGN and exact Hessian of a cross-entropy loss, as operators.

``GGN`` and ``Hessian`` check their arguments, choose a back end once (the MLP or graph
engine where the model allows, the autograd reference otherwise) and wrap a batch or a
whole data set; they follow the operator protocol of :mod:`pyflat.linalg`.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..engines.graph import GraphEngine, capture
from ..engines.mlp import MLPSpec, check_plain_modules, parse_mlp
from ..errors import UnsupportedModel
from ..linalg import CurvatureOperator, ParameterLayout
from ..precision import full_precision
from ..reference import ReferenceGGN, ReferenceHessian, autograd_friendly_attention
from .checks import (
    check_batch,
    check_eval_mode,
    check_labels,
    check_model_state,
    check_reproduces,
    model_dtype_device,
)
from .dataset import DatasetCurvature, batches_of, default_cache_bytes

__all__ = ["GGN", "Hessian"]


def _parameter_paths(spec: MLPSpec) -> list[str]:
    paths = []
    for path, b in zip(spec.linear_paths, spec.biases):
        paths.append(f"{path}.weight")
        if b is not None:
            paths.append(f"{path}.bias")
    return paths


class _MLPCurvature(CurvatureOperator):
    _exact: bool

    def __init__(self, model: nn.Module, data, *, reduction: str = "mean",
                 weight_decay: float = 0.0, backend: str = "auto",
                 batch_size: int | None = None, cache_bytes: int | None = None,
                 check_determinism: bool = True, distributed: bool = False,
                 process_group=None):
        caller = f"pyflat.{type(self).__name__}"
        self._dataset = None
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
        self.weight_decay = float(weight_decay)
        single = isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data)
        if not single or batch_size is not None or distributed:
            self._init_dataset(model, data, backend, batch_size, cache_bytes,
                               check_determinism, caller, distributed, process_group)
            return
        named = list(model.named_parameters())
        if named:  # the same for every backend: not a reason to fall back
            dtype, device = model_dtype_device([p for _, p in named], [n for n, _ in named],
                                                caller, kernels=False)
            check_batch(data, dtype, device, None, caller, allow_integer=True)
        check_eval_mode(model, caller)
        check_model_state(model, caller)
        if backend != "reference":
            try:
                self._init_fused(model, data, caller)
                return
            except UnsupportedModel as err:
                if backend == "fused":
                    raise
                warnings.warn(f"{err}. Falling back to the autograd reference backend "
                              "(exact, slower); backend='reference' chooses it without this "
                              "warning, backend='fused' makes this an error.", stacklevel=3)
        self._init_reference(model, data, caller)

    def _init_fused(self, model: nn.Module, data, caller: str) -> None:
        """The MLP engine (one op per product) where the model is a chain of Linear
        layers; else the graph engine (convnets, residual networks). UnsupportedModel says
        the fused engines cannot compute this model's own function; any other error is not
        a reason to fall back."""
        check_plain_modules(model, caller)
        try:
            spec = parse_mlp(model, caller)
        except UnsupportedModel:
            spec = None
        if spec is not None:
            self._init_mlp(model, spec, data, caller)
        else:
            self._init_graph(model, data, caller)

    def _init_mlp(self, model: nn.Module, spec: MLPSpec, data, caller: str) -> None:
        """The MLP engine: one fused op per product."""
        #: which engine computes the products: "fused" or "reference" (autograd)
        self.backend = "fused"
        #: which fused engine: "mlp" (chains of Linear layers) or "graph" (any captured graph)
        self.engine = "mlp"
        dtype, device = model_dtype_device(spec.parameters, _parameter_paths(spec), caller)
        X, y = check_batch(data, dtype, device, spec.num_classes, caller)
        inputs = X
        X = spec.transform_input(X.detach().clone())  # ReLU(inplace=True) may come first
        if X.dim() > 2 and X.shape[-1] == spec.in_features:
            # torch applies Linear to the last axis (per token): a function the engine, which
            # takes one row per sample, does not compute; the autograd backend judges it
            raise UnsupportedModel(
                f"{caller}: the first Linear ('{spec.linear_paths[0]}') gets X as "
                f"{tuple(X.shape)}, applied along its last axis; the MLP engine takes (batch, "
                "features) inputs (add nn.Flatten() to flatten)", spec.linear_paths[0])
        if X.dim() != 2 or X.shape[1] != spec.in_features:
            raise ValueError(f"{caller}: the first Linear ('{spec.linear_paths[0]}') expects "
                             f"{spec.in_features} features per sample, but X becomes "
                             f"{tuple(X.shape)} before it")
        super().__init__(ParameterLayout.of(model), dtype, device)
        # Snapshot: the operator describes the model as it is now, even if training goes on.
        self._weights = [w.clone() for w in spec.weights]
        self._biases = [None if b is None else b.clone() for b in spec.biases]
        self._activations = list(spec.activations)
        # a copy, not a view: writes to X after construction (in place, through numpy or
        # DLPack, which bump no version counter) must not reach the products
        self._input = X.detach().clone(memory_format=torch.contiguous_format)
        with full_precision(device):
            self._prepared = ops.mlp_forward(self._input, y, self._weights, self._biases,
                                             self._activations, spec.activation_params,
                                             self.reduction, with_hessian_terms=self._exact)
            last = self._prepared.hidden[-1] if self._prepared.hidden else self._input
            logits = F.linear(last, self._weights[-1], self._biases[-1])
            if spec.activation_modules[-1] is not None:
                logits = spec.activation_modules[-1](logits)
        check_reproduces(model, inputs, logits, caller, "MLP engine's forward")
        self.num_samples = X.shape[0]
        self.num_classes = spec.num_classes
        #: the cross-entropy (without the L2 term) at the prepared batch
        self.loss = float(self._prepared.loss)
        # tangent memory per direction: (B, d_l) per layer, about 2 live copies for the
        # GGN and 3 for the Hessian (it keeps Ra and, for curved activations, Rz)
        widths = sum(w.shape[0] + w.shape[1] for w in self._weights)
        self._bytes_per_direction = max(1, self.num_samples * widths * X.element_size() *
                                        (3 if self._exact else 2))

    def _init_graph(self, model: nn.Module, data, caller: str) -> None:
        """The graph engine: convnets and residual networks, captured with torch.fx."""
        layout = ParameterLayout.of(model)
        if not len(layout):
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtype, device = model_dtype_device(layout.parameters, layout.names, caller)
        X, y = check_batch(data, dtype, device, None, caller)
        # a copy, not a view: the prepared forward keeps the input of the first layer
        X = X.detach().clone(memory_format=torch.contiguous_format)
        with full_precision(device):
            graph = capture(model, X, caller)
            engine = GraphEngine(graph, X, self.reduction, self._exact, caller)
            check_labels(y, engine.num_classes, caller)
            engine.prepare_loss(y)
        check_reproduces(model, X, engine.logits, caller, "graph captured by torch.fx")
        self.backend, self.engine = "fused", "graph"
        super().__init__(graph.layout, dtype, device)
        self._graph_engine = engine
        self.num_samples = X.shape[0]
        self.num_classes = engine.num_classes
        self.loss = float(engine.loss)
        # tangents per direction: every node's output per sample, ~2 live copies (GGN),
        # 3 (Hessian: tangents are kept for the backward)
        per_sample = sum(math.prod(s) for s in engine.shapes)
        self._bytes_per_direction = max(1, self.num_samples * per_sample * X.element_size() *
                                        (3 if self._exact else 2))

    def _init_dataset(self, model, data, backend, batch_size, cache_bytes, check_determinism,
                      caller, distributed=False, process_group=None) -> None:
        """Many batches: a DatasetCurvature of sum-reduced batch operators."""
        params = list(model.parameters())
        if not params:
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtype, device = params[0].dtype, params[0].device
        batches = batches_of(data, batch_size, caller)
        budget = default_cache_bytes(device) if cache_bytes is None else int(cache_bytes)
        kind = type(self)
        dataset = DatasetCurvature(
            lambda X, y, backend=backend: kind(model, (X, y), reduction="sum",
                                               backend=backend),
            batches, reduction=self.reduction, weight_decay=self.weight_decay,
            cache_bytes=budget, device=device, dtype=dtype, caller=caller,
            distributed=distributed, process_group=process_group, model=model)
        super().__init__(dataset.layout, dataset.dtype, dataset.device)
        self._dataset = dataset
        for name in ("backend", "engine", "num_samples", "num_batches",
                     "num_classes", "loss", "cache_report"):
            setattr(self, name, getattr(dataset, name))
        if check_determinism:
            self._check_determinism(caller)

    def _check_determinism(self, caller: str) -> None:
        """Two products on one vector must agree: a run of hundreds relies on it."""
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(self.shape[0], 1, generator=gen, dtype=torch.float64)
        v = v.to(dtype=self.dtype, device=self.device)
        first, second = self._dataset._matmat(v), self._dataset._matmat(v)
        tol = 1e-12 if self.dtype == torch.float64 else 1e-5
        if not torch.allclose(first, second, rtol=tol, atol=tol * float(first.abs().max())):
            raise ValueError(f"{caller}: two products on the same vector differ (relative "
                             f"{float((first - second).abs().max() / first.abs().max()):.1e}): "
                             "the data must come in the same order every pass (shuffle=False, "
                             "fixed augmentation) and the model must be deterministic "
                             "(model.eval(), no dropout)")

    def _init_reference(self, model: nn.Module, data, caller: str) -> None:
        """Any model: products by torch.func on the model's own forward."""
        params = list(model.parameters())
        if not params:
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"{caller}: all parameters must share one dtype and device, got "
                            f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        dtype, device = dtypes.pop(), devices.pop()
        check_eval_mode(model, caller)
        X, y = check_batch(data, dtype, device, None, caller, allow_integer=True)
        with torch.no_grad(), autograd_friendly_attention():
            logits = model(X.clone())  # a forward may write to its input in place
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{caller}: model(X) must return a tensor of logits, got "
                            f"{type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[0] != X.shape[0]:
            tokens = ("; token-level losses (one prediction per position) are not supported "
                      "yet" if logits.dim() > 2 else "")
            raise ValueError(f"{caller}: the model must map X to logits of shape "
                             f"({X.shape[0]}, classes), got {tuple(logits.shape)}{tokens}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{caller}: model(X) is not finite (NaN or inf in the logits); "
                             "check the weights, the inputs and BatchNorm's running statistics")
        check_labels(y, logits.shape[1], caller)
        super().__init__(ParameterLayout.of(model), dtype, device)
        self.backend = "reference"
        self.engine = None
        reference_type = ReferenceHessian if self._exact else ReferenceGGN
        self._reference = reference_type(model, (X, y), reduction=self.reduction,
                                         weight_decay=self.weight_decay)
        self.num_samples = X.shape[0]
        self.num_classes = logits.shape[1]
        self.loss = float(torch.nn.functional.cross_entropy(logits, y, reduction=self.reduction))

    def _prepared_bytes(self) -> int:
        """Memory the prepared batch holds (what a data set's cache budget counts)."""
        if self.backend == "reference":  # only the batch and the parameters
            return sum(t.numel() * t.element_size()
                       for t in self._reference._functions.param_tuple)
        if self.engine == "graph":
            return self._graph_engine.prepared_bytes()
        prepared = self._prepared
        tensors = [prepared.loss, prepared.probs, *prepared.hidden, *prepared.first_derivs,
                   *prepared.deltas, *prepared.curvatures, self._input]
        return sum(t.numel() * t.element_size() for t in tensors)

    #: upper bound on the tangent memory of one product call; wider blocks are split
    block_memory_bytes: int = 1 << 30

    def _directions_per_call(self) -> int:
        return max(1, self.block_memory_bytes // self._bytes_per_direction)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._dataset is not None:
            return self._dataset._matmat(V)
        if self.backend == "reference":
            return self._reference._matmat(V)
        k = V.shape[1]
        chunk = self._directions_per_call()
        if k == 1:  # (P, 1) and (1, P) share one memory layout
            out = self._product(V.reshape(1, -1)).reshape(-1, 1)
        elif k <= chunk:
            out = ops.transpose(self._product(ops.transpose(V)))
        else:
            out = torch.cat([ops.transpose(self._product(ops.transpose(block)))
                             for block in V.split(chunk, dim=1)], dim=1)
        if self.weight_decay:
            out = out.add(V, alpha=self.weight_decay)
        return out

    def _product(self, directions: torch.Tensor) -> torch.Tensor:
        """The op on a (k, P) block of directions (rows), returning (k, P)."""
        if self.engine == "graph":
            with full_precision(self._device):
                return self._graph_engine.matmat(directions)
        product = ops.mlp_hessian_matmat if self._exact else ops.mlp_ggn_matmat
        # on the CPU too: oneDNN may run float32 GEMMs in bf16 at the user's request
        with full_precision(self._device):
            return product(self._input, self._weights, self._biases, self._activations,
                           self._prepared, directions, self.reduction)


class GGN(_MLPCurvature):
    r"""Generalized Gauss-Newton matrix of a cross-entropy loss: G = J^T H_loss J (+ mu I).

    J is the Jacobian of the logits w.r.t. the parameters and H_loss the Hessian of the
    cross-entropy w.r.t. the logits, diag(p) - p p^T per sample (divided by B for
    ``reduction="mean"``). G is positive semi-definite.

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


class Hessian(_MLPCurvature):
    r"""Exact Hessian of a cross-entropy loss w.r.t. the parameters (+ mu I).

    H = G + sum_n sum_c (dloss/df_nc) d^2 f_nc / dtheta^2: the GGN plus the terms of the
    network's own curvature, weighted by the loss gradient. It can be indefinite. For
    piecewise-linear networks (ReLU) H != G in general, yet trace(H) = trace(G).

    ``weight_decay=mu`` adds mu I (the Hessian of mu/2 |theta|^2); arguments as
    :class:`GGN`.
    """

    _exact = True
