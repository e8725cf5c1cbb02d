"""Curvature operators: GGN and exact Hessian of a cross-entropy loss, as linear operators.

Both follow one protocol (``shape``, ``dtype``, ``device``, ``@``, ``matvec``, ``matmat``,
``to_scipy()``, ``to_dense()``), on flat vectors (P,), blocks (P, k) and parameter lists,
so every algorithm in pyflat takes either, the autograd reference operators, or a dense
tensor. The flat layout is ``torch.cat([p.flatten() for p in model.parameters()])``
(pyflat.layout.ParameterLayout, ``op.layout``).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._model import MLPSpec, check_plain_modules, parse_mlp
from .errors import UnsupportedModel
from .layout import ParameterLayout
from .precision import full_precision

__all__ = ["CurvatureOperator", "GGN", "Hessian", "LinearCombination", "Restricted"]

Vector = torch.Tensor | Sequence[torch.Tensor]


class CurvatureOperator(abc.ABC):
    """A symmetric P x P linear operator over a model's flattened parameters.

    Subclasses implement ``_matmat(V)`` for a (P, k) block V of their dtype and device;
    this class validates inputs and provides the rest of the protocol: products on
    vectors, blocks and parameter lists, scipy interop, a dense matrix for small P, and
    algebra (``A + B``, ``A - B``, ``c * A``, ``A.restrict(...)``) whose results are
    operators again.
    """

    def __init__(self, layout: ParameterLayout | Sequence[torch.Size], dtype: torch.dtype,
                 device: torch.device):
        #: the flat parameter layout (names, shapes, offsets) directions follow
        self.layout = layout if isinstance(layout, ParameterLayout) else ParameterLayout(layout)
        #: shapes of the parameters, for the parameter-list form of ``matvec``
        self.param_shapes = self.layout.shapes
        #: the parameters the flat layout runs over, when the operator knows them
        self.parameters: list[torch.Tensor] | None = self.layout.parameters
        self._dim = self.layout.size
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @abc.abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(P, k) -> (P, k) for V of the operator's dtype and device, already checked."""

    def _check_block(self, V: torch.Tensor, name: str) -> None:
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.{name}: expected a torch.Tensor, got "
                            f"{type(V).__name__}")
        if V.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__}.{name}: expected dtype {self.dtype}, got "
                            f"{V.dtype}")
        if V.device != self.device:
            raise ValueError(f"{type(self).__name__}.{name}: expected a tensor on "
                             f"{self.device}, got one on {V.device}")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Applies the operator to a block of k directions: (P, k) -> (P, k)."""
        self._check_block(V, "matmat")
        if V.dim() != 2 or V.shape[0] != self._dim or V.shape[1] == 0:
            raise ValueError(f"{type(self).__name__}.matmat: expected a block of shape "
                             f"({self._dim}, k) with k >= 1, got {tuple(V.shape)}")
        # directions are data: products are not differentiated through
        return self._matmat(V.detach())

    def matvec(self, v: Vector) -> Vector:
        """Applies the operator to one direction: a flat (P,) vector, or a list of
        tensors shaped like the parameters (the result then has the same form)."""
        if isinstance(v, (list, tuple)):
            return self._matvec_list(v)
        self._check_block(v, "matvec")
        if v.dim() != 1 or v.shape[0] != self._dim:
            raise ValueError(f"{type(self).__name__}.matvec: expected a vector of shape "
                             f"({self._dim},), got {tuple(v.shape)}")
        return self._matmat(v.detach().view(-1, 1)).view(-1)

    def _matvec_list(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(vs) != len(self.param_shapes):
            raise ValueError(f"{type(self).__name__}.matvec: expected {len(self.param_shapes)} "
                             f"tensors (one per parameter), got {len(vs)}")
        for i, (t, shape) in enumerate(zip(vs, self.param_shapes)):
            if not isinstance(t, torch.Tensor) or t.shape != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{type(self).__name__}.matvec: entry {i} must have shape "
                                 f"{tuple(shape)}, got {got}")
        return self.layout.split(self.matvec(self.layout.concatenate(vs)))

    def __matmul__(self, x: Vector) -> Vector:
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x)
        return self.matvec(x)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy arrays (float64 or
        float32 as the operator); vectors travel to the operator's device and back."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def apply(x):
            x = np.asarray(x)
            block = torch.as_tensor(np.ascontiguousarray(x.reshape(self._dim, -1)),
                                    dtype=self.dtype, device=self.device)
            return self.matmat(block).cpu().numpy().reshape(x.shape).astype(np_dtype, copy=False)

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply,
                              rmatmat=apply, dtype=np_dtype)

    def to_dense(self, chunk: int = 256) -> torch.Tensor:
        """The P x P matrix, built from blocks of unit vectors (small models only)."""
        dense = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for start in range(0, self._dim, chunk):
            stop = min(start + chunk, self._dim)
            eye = torch.zeros(self._dim, stop - start, dtype=self.dtype, device=self.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            dense[:, start:stop] = self._matmat(eye)
        return dense

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---- algebra ------------------------------------------------------------------------

    def __add__(self, other: CurvatureOperator) -> LinearCombination:
        return LinearCombination([(1.0, self), (1.0, other)])

    def __sub__(self, other: CurvatureOperator) -> LinearCombination:
        return LinearCombination([(1.0, self), (-1.0, other)])

    def __mul__(self, scalar: float) -> LinearCombination:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return LinearCombination([(float(scalar), self)])

    __rmul__ = __mul__

    def __neg__(self) -> LinearCombination:
        return LinearCombination([(-1.0, self)])

    def restrict(self, which: Sequence[int | torch.Tensor]) -> Restricted:
        """The operator on a subset of the parameters (one layer, one block): the
        principal submatrix A[S, S] for the parameters S, given by position in the
        flat layout or, where the operator knows its parameters, as the tensors."""
        return Restricted(self, which)


class LinearCombination(CurvatureOperator):
    """sum_i c_i A_i of operators over the same parameters, e.g. ``Hessian - GGN``.

    Example:
        >>> residual = pyflat.Hessian(model, data) - pyflat.GGN(model, data)
        >>> pyflat.eigsh(residual, k=3, which="BE")
    """

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]]):
        flat: list[tuple[float, CurvatureOperator]] = []
        for coef, op in terms:
            if not isinstance(op, CurvatureOperator):
                raise TypeError("operator algebra takes pyflat operators, got "
                                f"{type(op).__name__}")
            if isinstance(op, LinearCombination):
                flat += [(coef * c, inner) for c, inner in op.terms]
            else:
                flat.append((coef, op))
        first = flat[0][1]
        for _, op in flat[1:]:
            if op.param_shapes != first.param_shapes:
                raise ValueError("operator algebra needs operators over the same parameters: "
                                 f"{type(first).__name__} has shape {first.shape}, "
                                 f"{type(op).__name__} has {op.shape} (parameter shapes differ)")
            if op.dtype != first.dtype or op.device != first.device:
                raise ValueError("operator algebra needs one dtype and device: "
                                 f"{first.dtype} on {first.device} and {op.dtype} on {op.device}")
        super().__init__(first.layout, first.dtype, first.device)
        self.terms = flat

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        for coef, op in self.terms:
            part = op._matmat(V)
            out = part.mul(coef) if out is None else out.add_(part, alpha=coef)
        return out

    def __repr__(self) -> str:
        inner = " + ".join(f"{c:g} * {type(op).__name__}" for c, op in self.terms)
        return f"LinearCombination({inner}, shape={self.shape})"


class Restricted(CurvatureOperator):
    """The principal submatrix A[S, S] of an operator for a subset S of its parameters.

    A product embeds V into the full space (zeros elsewhere), applies A once and keeps the
    rows of S, so it costs one full product.
    """

    def __init__(self, operator: CurvatureOperator, which: Sequence[int | torch.Tensor]):
        if isinstance(which, (torch.Tensor, int)):  # one parameter, not a list of them
            which = [which]
        which = list(which)
        if not which:
            raise ValueError("restrict: which must name at least one parameter, got none")
        positions = []
        for item in which:
            if isinstance(item, torch.Tensor):
                if operator.parameters is None:
                    raise TypeError(f"restrict: {type(operator).__name__} does not know its "
                                    "parameters; give positions in the flat layout")
                position = operator.layout.position(item)
                if position is None:
                    raise ValueError(f"restrict: a tensor of shape {tuple(item.shape)} is not "
                                     "one of the operator's parameters")
                positions.append(position)
            elif isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"restrict: which holds parameter positions (ints) or the "
                                f"parameter tensors, got {type(item).__name__} {item!r}")
            elif 0 <= item < len(operator.param_shapes):
                positions.append(item)
            else:
                raise ValueError(f"restrict: parameters are given by position in [0, "
                                 f"{len(operator.param_shapes)}) or as tensors, got {item!r}")
        if len(set(positions)) != len(positions):
            raise ValueError(f"restrict: a parameter is named twice (positions {positions})")
        positions.sort()
        super().__init__(operator.layout.select(positions), operator.dtype, operator.device)
        self.operator = operator
        self.positions = positions
        self._rows = operator.layout.indices(positions).to(operator.device)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = V.new_zeros(self.operator.shape[0], V.shape[1])
        full[self._rows] = V
        return self.operator._matmat(full)[self._rows]


def check_batch(data, dtype: torch.dtype, device: torch.device, num_classes: int | None,
                caller: str, allow_integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a batch ``(X, y)`` for a model of the given dtype, device and classes
    (the label range is checked when ``num_classes`` is given). ``allow_integer`` admits
    an integer X (token ids), which has no tangent; a float X must have the model's
    dtype either way."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, got "
                        f"{type(data).__name__}")
    X, y = data
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, got "
                        f"({type(X).__name__}, {type(y).__name__})")
    integer = not (X.dtype.is_floating_point or X.dtype.is_complex or X.dtype == torch.bool)
    if X.dtype != dtype and not (integer and allow_integer):
        if integer:  # a valid input the autograd backend takes; it has no tangent here
            raise UnsupportedModel(f"{caller}: X must have the model's dtype {dtype}, got "
                                   f"{X.dtype} (integer inputs such as token ids run through "
                                   "backend='reference')")
        raise TypeError(f"{caller}: X must have the model's dtype {dtype}, got {X.dtype}")
    if X.device != device or y.device != device:
        raise ValueError(f"{caller}: X and y must be on the model's device {device}, got "
                         f"{X.device} and {y.device}")
    if X.dim() < 2 or X.shape[0] == 0:
        raise ValueError(f"{caller}: X must be (batch, features...) with batch >= 1, got "
                         f"{tuple(X.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{caller}: y must hold integer class indices, got {y.dtype} "
                        "(soft labels are not supported)")
    if y.shape != (X.shape[0],):
        raise ValueError(f"{caller}: y must have shape ({X.shape[0]},) to match X, got "
                         f"{tuple(y.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{caller}: X holds NaN or inf")
    if num_classes is not None:
        check_labels(y, num_classes, caller)
    return X, y.long()


def check_labels(y: torch.Tensor, num_classes: int, caller: str) -> None:
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{caller}: y must hold class indices in [0, {num_classes}), got {bad}")


def _model_dtype_device(parameters: Sequence[torch.Tensor], paths: Sequence[str],
                        caller: str, kernels: bool = True) -> tuple[torch.dtype, torch.device]:
    """The model's one dtype (float32 or float64) and device, its parameters finite;
    with ``kernels``, pyflat's ops must exist for that device (the fused engines)."""
    dtypes = {p.dtype for p in parameters}
    devices = {p.device for p in parameters}
    if len(dtypes) != 1 or len(devices) != 1:
        raise TypeError(f"{caller}: all parameters must share one dtype and device, got "
                        f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{caller}: the model must be float32 or float64, got {dtype}")
    if kernels and not torch._C._dispatch_has_kernel_for_dispatch_key("pyflat::mlp_forward",
                                                                       device.type.upper()):
        raise ValueError(f"{caller}: this build of pyflat has no kernels for {device.type} "
                         f"devices; the model is on {device}")
    for p, path in zip(parameters, paths):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{caller}: parameter '{path}' holds NaN or inf")
    return dtype, device


def _check_eval_mode(model: nn.Module, caller: str) -> None:
    """Dropout draws new masks and BatchNorm uses batch statistics in training mode: the
    curvature is of the eval-mode function, so such models must be in eval mode."""
    for path, module in model.named_modules():
        if module.training and isinstance(module, (nn.modules.dropout._DropoutNd,
                                                   nn.modules.batchnorm._BatchNorm)):
            raise ValueError(f"{caller}: {type(module).__name__} at '{path or '<model>'}' is in "
                             "training mode; curvature is measured in eval mode: call "
                             "model.eval() first")


def _check_model_state(model: nn.Module, caller: str) -> None:
    """BatchNorm's running statistics define the eval-mode function: a NaN, an infinity
    or a negative variance makes model(X) meaningless, so it is refused by every backend."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or \
                module.running_mean is None:
            continue
        where = f"{type(module).__name__} at '{path or '<model>'}'"
        for name in ("running_mean", "running_var"):
            stat = getattr(module, name)
            if not bool(torch.isfinite(stat).all()):
                raise ValueError(f"{caller}: {where} has {name} with NaN or inf entries")
        if bool((module.running_var < 0).any()):
            raise ValueError(f"{caller}: {where} has running_var with negative entries "
                             f"(min {float(module.running_var.min()):.3g}); a variance is >= 0")


def _forward_tolerance(dtype: torch.dtype) -> float:
    """How far an engine's logits may sit from model(X), relative to their largest
    magnitude: a few dozen rounding errors of the dtype (measured engine-vs-module gaps
    are 0-6 ulps on deep MLPs), far below any dropped constant or skipped hook."""
    return 64 * torch.finfo(dtype).eps


#: set while a data set prepares again a batch whose logits were checked at construction
#: (the same samples, by fingerprint, and the same model state): the check's extra
#: forward would cost a fifth of each product
_FORWARD_CHECKED = contextvars.ContextVar("pyflat_forward_checked", default=False)


@contextlib.contextmanager
def forward_already_checked():
    token = _FORWARD_CHECKED.set(True)
    try:
        yield
    finally:
        _FORWARD_CHECKED.reset(token)


def _check_reproduces(model: nn.Module, X: torch.Tensor, logits: torch.Tensor, caller: str,
                      what: str) -> None:
    """The fused engines' second line of defence, after the structural checks: the
    prepared logits must be model(X). NaN-aware: a non-finite output is refused outright."""
    if _FORWARD_CHECKED.get():
        return
    with torch.no_grad(), full_precision(X.device):
        expected = model(X.clone())  # a forward may write to its input in place
    if not isinstance(expected, torch.Tensor) or expected.shape != logits.shape:
        got = tuple(expected.shape) if isinstance(expected, torch.Tensor) else \
            type(expected).__name__
        raise UnsupportedModel(f"{caller}: the {what} gives logits of shape "
                               f"{tuple(logits.shape)}, model(X) gives {got}")
    if not bool(torch.isfinite(expected).all()):
        raise ValueError(f"{caller}: model(X) is not finite (NaN or inf in the logits); "
                         "check the weights, the inputs and BatchNorm's running statistics")
    scale = float(expected.abs().max()) or 1.0
    gap = float((expected - logits.to(expected.dtype)).abs().max())
    if not gap <= _forward_tolerance(expected.dtype) * scale:
        raise UnsupportedModel(f"{caller}: the {what} does not reproduce model(X) (relative "
                               f"gap {gap / scale:.1e}): the forward does something the engine "
                               "cannot see")


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
            dtype, device = _model_dtype_device([p for _, p in named], [n for n, _ in named],
                                                caller, kernels=False)
            check_batch(data, dtype, device, None, caller, allow_integer=True)
        _check_eval_mode(model, caller)
        _check_model_state(model, caller)
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
        dtype, device = _model_dtype_device(spec.parameters, _parameter_paths(spec), caller)
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
        _check_reproduces(model, inputs, logits, caller, "MLP engine's forward")
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
        from ._graph import GraphEngine, capture

        layout = ParameterLayout.of(model)
        if not len(layout):
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtype, device = _model_dtype_device(layout.parameters, layout.names, caller)
        X, y = check_batch(data, dtype, device, None, caller)
        # a copy, not a view: the prepared forward keeps the input of the first layer
        X = X.detach().clone(memory_format=torch.contiguous_format)
        with full_precision(device):
            graph = capture(model, X, caller)
            engine = GraphEngine(graph, X, self.reduction, self._exact, caller)
            check_labels(y, engine.num_classes, caller)
            engine.prepare_loss(y)
        _check_reproduces(model, X, engine.logits, caller, "graph captured by torch.fx")
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
        from .dataset import DatasetCurvature, batches_of, default_cache_bytes

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
        from .reference import ReferenceGGN, ReferenceHessian, autograd_friendly_attention

        params = list(model.parameters())
        if not params:
            raise TypeError(f"{caller}: model {type(model).__name__} has no parameters")
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"{caller}: all parameters must share one dtype and device, got "
                            f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        dtype, device = dtypes.pop(), devices.pop()
        _check_eval_mode(model, caller)
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
            torch.fx can trace; see :data:`pyflat._graph.SUPPORTED`) through the graph
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
