"""The curvature of one batch, one class per back end, and the choice between them.

``MLPBatch`` runs the MLP engine (one fused op per product), ``GraphBatch`` the graph
engine (convnets, residual networks), ``ReferenceBatch`` torch.func on the model's own
forward. Each prepares the forward pass once, at construction, from a copy of the
weights and the batch, so it describes the model as it was then. :func:`batch_curvature`
chooses among them once, from what the model is.

A batch operator is the cross-entropy part alone: the L2 term mu I is the front door's.
"""
from __future__ import annotations

import abc
import math
import warnings

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
from .checks import check_batch, check_labels, check_reproduces, model_dtype_device

__all__ = ["BatchCurvature", "GraphBatch", "MLPBatch", "ReferenceBatch", "batch_curvature"]


class BatchCurvature(CurvatureOperator):
    """The GGN (``exact=False``) or exact Hessian (``exact=True``) of the cross-entropy of
    one batch (X, y), for ``reduction`` "mean" or "sum".

    Attributes:
        backend: "fused" or "reference" (autograd).
        engine: the fused engine, "mlp" or "graph"; None for the reference.
        num_samples, num_classes: B and C of the batch's (B, C) logits.
        loss: the cross-entropy at the prepared batch.
    """

    backend: str
    engine: str | None

    @abc.abstractmethod
    def prepared_bytes(self) -> int:
        """Memory the prepared batch holds (what a data set's cache budget counts)."""


class _FusedBatch(BatchCurvature):
    """What the fused engines share: blocks split to bound the tangents' memory."""

    backend = "fused"
    #: upper bound on the tangent memory of one product call; wider blocks are split
    block_memory_bytes: int = 1 << 30
    _bytes_per_direction: int

    def block_size(self) -> int:
        """Directions per product call: as many as keep the tangents of one call under
        ``block_memory_bytes``."""
        return max(1, self.block_memory_bytes // self._bytes_per_direction)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        chunk = self.block_size()
        if k == 1:  # (P, 1) and (1, P) share one memory layout
            return self._product(V.reshape(1, -1)).reshape(-1, 1)
        if k <= chunk:
            return ops.transpose(self._product(ops.transpose(V)))
        return torch.cat([ops.transpose(self._product(ops.transpose(block)))
                          for block in V.split(chunk, dim=1)], dim=1)

    @abc.abstractmethod
    def _product(self, directions: torch.Tensor) -> torch.Tensor:
        """The operator on a (k, P) block of directions (rows), returning (k, P)."""


def _parameter_paths(spec: MLPSpec) -> list[str]:
    paths = []
    for path, b in zip(spec.linear_paths, spec.biases):
        paths.append(f"{path}.weight")
        if b is not None:
            paths.append(f"{path}.bias")
    return paths


class MLPBatch(_FusedBatch):
    """The MLP engine on a chain of Linear layers and elementwise activations."""

    engine = "mlp"

    def __init__(self, model: nn.Module, spec: MLPSpec, data, *, exact: bool, reduction: str,
                 caller: str):
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
        self.exact, self.reduction = exact, reduction
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
                                             reduction, with_hessian_terms=exact)
            last = self._prepared.hidden[-1] if self._prepared.hidden else self._input
            logits = F.linear(last, self._weights[-1], self._biases[-1])
            if spec.activation_modules[-1] is not None:
                logits = spec.activation_modules[-1](logits)
        check_reproduces(model, inputs, logits, caller, "MLP engine's forward")
        self.num_samples = X.shape[0]
        self.num_classes = spec.num_classes
        self.loss = float(self._prepared.loss)
        # tangent memory per direction: (B, d_l) per layer, about 2 live copies for the
        # GGN and 3 for the Hessian (it keeps Ra and, for curved activations, Rz)
        widths = sum(w.shape[0] + w.shape[1] for w in self._weights)
        self._bytes_per_direction = max(1, self.num_samples * widths * X.element_size() *
                                        (3 if exact else 2))

    def prepared_bytes(self) -> int:
        """The prepared forward's tensors and the input copy, in bytes."""
        prepared = self._prepared
        tensors = [prepared.loss, prepared.probs, *prepared.hidden, *prepared.first_derivs,
                   *prepared.deltas, *prepared.curvatures, self._input]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _product(self, directions: torch.Tensor) -> torch.Tensor:
        product = ops.mlp_hessian_matmat if self.exact else ops.mlp_ggn_matmat
        # on the CPU too: oneDNN may run float32 GEMMs in bf16 at the user's request
        with full_precision(self._device):
            return product(self._input, self._weights, self._biases, self._activations,
                           self._prepared, directions, self.reduction)


class GraphBatch(_FusedBatch):
    """The graph engine: convnets and residual networks, captured with torch.fx."""

    engine = "graph"

    def __init__(self, model: nn.Module, data, *, exact: bool, reduction: str, caller: str):
        layout = ParameterLayout.of(model)
        if not len(layout):
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtype, device = model_dtype_device(layout.parameters, layout.names, caller)
        X, y = check_batch(data, dtype, device, None, caller)
        # a copy, not a view: the prepared forward keeps the input of the first layer
        X = X.detach().clone(memory_format=torch.contiguous_format)
        with full_precision(device):
            graph = capture(model, X, caller)
            engine = GraphEngine(graph, X, reduction, exact, caller)
            check_labels(y, engine.num_classes, caller)
            engine.prepare_loss(y)
        check_reproduces(model, X, engine.logits, caller, "graph captured by torch.fx")
        super().__init__(graph.layout, dtype, device)
        self.exact, self.reduction = exact, reduction
        self._engine = engine
        self.num_samples = X.shape[0]
        self.num_classes = engine.num_classes
        self.loss = float(engine.loss)
        # tangents per direction: every node's output per sample, ~2 live copies (GGN),
        # 3 (Hessian: tangents are kept for the backward)
        per_sample = sum(math.prod(s) for s in engine.shapes)
        self._bytes_per_direction = max(1, self.num_samples * per_sample * X.element_size() *
                                        (3 if exact else 2))

    def prepared_bytes(self) -> int:
        """What the graph engine keeps of its forward, in bytes."""
        return self._engine.prepared_bytes()

    def _product(self, directions: torch.Tensor) -> torch.Tensor:
        with full_precision(self._device):
            return self._engine.matmat(directions)


class ReferenceBatch(BatchCurvature):
    """Any model: products by torch.func on the model's own forward (exact, slower)."""

    backend = "reference"
    engine = None

    def __init__(self, model: nn.Module, data, *, exact: bool, reduction: str, caller: str):
        params = list(model.parameters())
        if not params:
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"{caller}: all parameters must share one dtype and device, got "
                            f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        dtype, device = dtypes.pop(), devices.pop()
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
        self.exact, self.reduction = exact, reduction
        reference_type = ReferenceHessian if exact else ReferenceGGN
        self._reference = reference_type(model, (X, y), reduction=reduction)
        self.num_samples = X.shape[0]
        self.num_classes = logits.shape[1]
        self.loss = float(F.cross_entropy(logits, y, reduction=reduction))

    def prepared_bytes(self) -> int:
        """The parameters' copy, in bytes (the batch is not prepared)."""
        return sum(t.numel() * t.element_size() for t in self._reference._functions.param_tuple)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._reference._matmat(V)


def fused_batch(model: nn.Module, data, *, exact: bool, reduction: str,
                caller: str) -> _FusedBatch:
    """The MLP engine where the model is a chain of Linear layers, else the graph engine.
    UnsupportedModel says the fused engines cannot compute this model's own function; any
    other error is not a reason to fall back."""
    check_plain_modules(model, caller)
    try:
        spec = parse_mlp(model, caller)
    except UnsupportedModel:
        return GraphBatch(model, data, exact=exact, reduction=reduction, caller=caller)
    return MLPBatch(model, spec, data, exact=exact, reduction=reduction, caller=caller)


def batch_curvature(model: nn.Module, data, *, exact: bool, reduction: str, backend: str,
                    caller: str, warn_stacklevel: int = 2) -> BatchCurvature:
    """The batch operator of the back end chosen once: ``"fused"`` (refuses a model the
    engines cannot take), ``"reference"``, or ``"auto"`` (fused where the model allows,
    else the reference with one warning saying why)."""
    if backend != "reference":
        try:
            return fused_batch(model, data, exact=exact, reduction=reduction, caller=caller)
        except UnsupportedModel as err:
            if backend == "fused":
                raise
            warnings.warn(f"{err}. Falling back to the autograd reference backend "
                          "(exact, slower); backend='reference' chooses it without this "
                          "warning, backend='fused' makes this an error.",
                          stacklevel=warn_stacklevel + 1)
    return ReferenceBatch(model, data, exact=exact, reduction=reduction, caller=caller)
