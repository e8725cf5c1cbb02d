"""Autograd ground truth: every product of pyflat, computed by torch.func / autograd.

This module is the oracle of the tests and the baseline of the benchmarks. It never
touches the engine: it calls the model's own forward with its parameters and buffers
swapped for the transform's inputs (as ``torch.func.functional_call`` does, but each module
slot once: see :func:`_substituted`), so any model works here, fused engine or not
(attention runs on its math path, which forward-mode AD supports). The loss Hessian of the GGN is
its own cancellation-free form (:func:`cross_entropy_hessian_matmat`), not autograd's.

Vectors use the flat layout of the operators: the parameters of ``model.parameters()``
flattened and concatenated (P entries); blocks are (P, k), on the device of the model's
parameters and normally in their dtype. ``data`` is a batch ``(X, y)``: X (B, ...) as the
model takes it, y (B,) class indices in [0, C); the logits f(theta) are (B, C).

The math, for the loss L(theta) = l(f(theta)) with l the cross-entropy:

* GGN (Schraudolph 2002; Martens 2010): G = J^T H_loss J, with J = df/dtheta the
  (B*C, P) Jacobian of the logits and H_loss the Hessian of l w.r.t. the logits, block
  diagonal with diag(p_b) - p_b p_b^T per sample b (p_b = softmax(f_b); divided by B for
  ``reduction="mean"``).
* Hessian: H = G + sum_{b,c} g_{bc} d^2 f_{bc} / dtheta^2, g = dl/df the (B, C) gradient
  of the loss w.r.t. the logits. Its products are Hessian-vector products without the
  P x P matrix, Pearlmutter's R-operator (Pearlmutter 1994) as forward-mode AD.
* ``weight_decay`` mu adds mu I (the Hessian of the L2 term mu/2 ||theta||^2).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, linearize, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .linalg import CurvatureOperator, ParameterLayout
from .precision import full_precision

__all__ = [
    "CurvatureFunctions",
    "ReferenceGGN",
    "ReferenceHessian",
    "autograd_friendly_attention",
    "cross_entropy_gradient",
    "cross_entropy_hessian_matmat",
    "functions",
    "ggn_dense",
    "ggn_matmat",
    "hessian_dense",
    "hessian_matmat",
    "hessian_matmat_double_backward",
    "loss",
]


class CurvatureFunctions:
    """Autograd products for one model and batch; each maps a flat (P,) vector to (P,).

    Attributes:
        ggn_vp: GGN product J^T H_loss J v: jvp of the logits, the loss Hessian
            (:func:`cross_entropy_hessian_matmat`), vjp.
        hessian_vp: exact Hessian product, the oracle: the GGN product above plus the
            network's curvature weighted by the loss gradient, sum_c g_c (d^2 f_c) v
            (a jvp of the vjp of the logits with g held fixed), g computed without
            forming p_y - 1 (see :func:`cross_entropy_gradient`). Accurate on
            confident models, where autograd's own forms below lose digits.
        hvp: exact Hessian product, forward-over-reverse (jvp of the gradient), as
            torch.func composes it: the benchmarks' baseline.
        hvp_double_backward: exact Hessian product by double backward, with the graph of
            the gradient built once and kept (PyHessian's formulation).
        hvp_double_backward_rebuilt: the same with forward, gradient graph and double
            backward run for every product, as most scripts write it.
        params: the parameters, detached, as a flat (P,) vector.

    Args:
        model: any model mapping X to (B, C) logits. Its parameters, buffers and modules'
            training modes, and the batch, are snapshotted now: later changes to them do not
            reach the products.
        data: the batch (X, y), y (B,) class indices.
        reduction: "mean" or "sum" of the cross-entropy over the batch.
    """

    def __init__(self, model: nn.Module, data, reduction: str = "mean"):
        X, y = data
        y = y.long()
        named = list(model.named_parameters())
        self.layout = ParameterLayout.of(model)
        self.names = self.layout.names
        # copies: like the fused operators, products describe the model and the batch as
        # they are now (BatchNorm's running statistics are buffers; X may be written to)
        self.param_tuple = tuple(p.detach().clone() for _, p in named)
        self.params = self.layout.concatenate(self.param_tuple)
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        # every name each tensor is reached by (a tied weight has several): the index of
        # its replacement, parameters first, then buffers
        index = {id(p): i for i, (_, p) in enumerate(named)}
        index.update({id(b): len(named) + i for i, (_, b) in enumerate(model.named_buffers())})
        self.slots = {name: index[id(t)] for named_tensors in (
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False)) for name, t in named_tensors}
        # and in the modes they are in now: model.train() later must not switch BatchNorm
        # to batch statistics (or Dropout to fresh masks) inside a product
        self.modes = [(m, m.training) for m in model.modules()]
        self.model, self.reduction = model, reduction
        self.X, self.y = X.detach().clone(), y.detach().clone()
        self._graph = None
        self._gradient = None

    def unflatten(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A flat (P,) vector as a tuple of tensors shaped like the parameters (views)."""
        return tuple(self.layout.split(v))

    def flatten(self, parts) -> torch.Tensor:
        """Tensors shaped like the parameters as one flat (P,) vector."""
        return self.layout.concatenate(parts)

    def logits(self, *params: torch.Tensor) -> torch.Tensor:
        """f(params): the (B, C) logits of the snapshot batch, the model run with
        ``params`` (one tensor per parameter, in layout order) in place of its parameters
        and with the buffers and training modes of the snapshot."""
        # every product runs the forward here; its kernels fix the derivatives used
        tensors = params + tuple(self.buffers.values())
        with autograd_friendly_attention(), _modes(self.modes), \
                _substituted(self.model, self.slots, tensors):
            return self.model(self.X.clone())  # a forward may write to its input

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """l(logits): the scalar cross-entropy of (B, C) logits with the snapshot labels."""
        return F.cross_entropy(logits, self.y, reduction=self.reduction)

    def loss(self, *params: torch.Tensor) -> torch.Tensor:
        """L(params) = l(f(params)), a scalar (differentiable in ``params``)."""
        return self.cross_entropy(self.logits(*params))

    def ggn_vp(self, v: torch.Tensor) -> torch.Tensor:
        """G v = J^T H_loss J v for a flat (P,) v: J v by jvp, H_loss by
        :func:`cross_entropy_hessian_matmat`, J^T by vjp; returns (P,)."""
        logits, jv = jvp(self.logits, self.param_tuple, self.unflatten(v))
        hjv = cross_entropy_hessian_matmat(logits, jv, reduction=self.reduction)
        _, vjp_fn = vjp(self.logits, *self.param_tuple)
        return self.flatten(vjp_fn(hjv))

    def hessian_vp(self, v: torch.Tensor) -> torch.Tensor:
        """H v = G v + (sum_{b,c} g_{bc} d^2 f_{bc}) v for a flat (P,) v, the oracle: the
        second term a jvp of theta -> J(theta)^T g with g = dl/df held fixed at the
        snapshot (:func:`cross_entropy_gradient`); returns (P,)."""
        if self._gradient is None:  # dloss/dlogits at the snapshot, held fixed below
            with torch.no_grad():
                logits = self.logits(*self.param_tuple)
            self._gradient = cross_entropy_gradient(logits, self.y, reduction=self.reduction)
        gradient = self._gradient

        def weighted_gradient(*params):
            _, pull = vjp(self.logits, *params)
            return pull(gradient)

        _, curvature = jvp(weighted_gradient, self.param_tuple, self.unflatten(v))
        return self.ggn_vp(v) + self.flatten(curvature)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat (P,) v by forward-over-reverse: jvp of ``torch.func.grad`` of the
        loss (Pearlmutter's R-operator on the gradient); returns (P,)."""
        gradient = grad(self.loss, argnums=tuple(range(len(self.param_tuple))))
        _, hv = jvp(gradient, self.param_tuple, self.unflatten(v))
        return self.flatten(hv)

    def hvp_double_backward(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat (P,) v as the gradient of <grad L, v> (double backward), the
        graph of grad L built on the first call and kept; returns (P,)."""
        if self._graph is None:
            leaves = [p.clone().requires_grad_(True) for p in self.param_tuple]
            with torch.enable_grad():
                grads = torch.autograd.grad(self.loss(*leaves), leaves, create_graph=True)
            self._graph = (leaves, grads)
        leaves, grads = self._graph
        hv = torch.autograd.grad(grads, leaves, grad_outputs=self.unflatten(v),
                                 retain_graph=True)
        return self.flatten(hv)

    def hvp_double_backward_rebuilt(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat (P,) v by double backward, forward and gradient graph rebuilt on
        every call; returns (P,)."""
        leaves = [p.clone().requires_grad_(True) for p in self.param_tuple]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.loss(*leaves), leaves, create_graph=True)
            hv = torch.autograd.grad(grads, leaves, grad_outputs=self.unflatten(v))
        return self.flatten(hv)

    def linearized_ggn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """GGN product with the forward cached: ``torch.func.linearize`` for J v and one
        vjp closure reused for J^T u; the loss Hessian a closure over the probabilities
        at the logits. The strongest autograd formulation of a GGN product. The closure
        maps a flat (P,) v to G v, (P,)."""
        with _quiet_linearize():
            logits, jvp_fn = linearize(lambda *p: self.logits(*p), *self.param_tuple)
        loss_hvp = _cross_entropy_hessian(logits.detach(), self.reduction)
        _, vjp_fn = vjp(self.logits, *self.param_tuple)
        return lambda v: self.flatten(vjp_fn(loss_hvp(jvp_fn(*self.unflatten(v)))))

    def linearized_hvp(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Exact Hessian product with the forward and backward cached: the gradient
        function linearized once (``torch.func.linearize``), then one jvp per product. The
        closure maps a flat (P,) v to H v, (P,)."""
        gradient = grad(self.loss, argnums=tuple(range(len(self.param_tuple))))
        with _quiet_linearize():
            _, hvp_fn = linearize(gradient, *self.param_tuple)
        return lambda v: self.flatten(hvp_fn(*self.unflatten(v)))


@contextlib.contextmanager
def _modes(modes: list[tuple[nn.Module, bool]]):
    """Puts every module in the training mode it had when the snapshot was taken, and
    back afterwards."""
    now = [(m, m.training) for m, _ in modes]
    try:
        for m, training in modes:
            m.training = training
        yield
    finally:
        for m, training in now:
            m.training = training


@contextlib.contextmanager
def _substituted(model: nn.Module, slots: dict[str, int], tensors: tuple[torch.Tensor, ...]):
    """``model`` computing with ``tensors[slots[name]]`` as its parameter or buffer
    ``name`` for the duration, and its own tensors back afterwards, exceptions included.

    Each module slot is swapped once, however many paths reach it: torch.func's
    functional_call swaps a module called twice (reached by two paths) twice, and under jvp
    restores it with the transform's wrapper in place of the Parameter (torch 2.13). Every
    name a tied tensor is reached by maps to the same replacement, so all its uses follow.
    """
    swapped: list[tuple[dict, str, torch.Tensor | None]] = []
    seen: set[tuple[int, str]] = set()
    try:
        for path, module in model.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for name in list(table):
                    full = f"{path}.{name}" if path else name
                    if full not in slots or (id(table), name) in seen:
                        continue
                    seen.add((id(table), name))
                    swapped.append((table, name, table[name]))
                    table[name] = tensors[slots[full]]
        yield
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


@contextlib.contextmanager
def _quiet_linearize():
    """torch.func.linearize's constant folding warns about an internal detail of its own
    graph ("Attempted to insert a get_attr Node ..."); the results are unaffected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        yield


@contextlib.contextmanager
def autograd_friendly_attention():
    """Attention on its math path for the duration: the fused CPU kernels (flash
    ``scaled_dot_product_attention``, the fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer``) have no forward-mode AD. The user's settings are
    restored on exit, exceptions included."""
    mha = getattr(torch.backends, "mha", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if mha is not None and hasattr(mha, "get_fastpath_enabled"):
            stack.callback(mha.set_fastpath_enabled, mha.get_fastpath_enabled())
            mha.set_fastpath_enabled(False)
        yield


def _cross_entropy_hessian(logits: torch.Tensor,
                           reduction: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """U -> H U for the cross-entropy Hessian at ``logits``, the probabilities computed
    once. Per sample H u = p * (u - p.u); with w = u - u_m (m the top class, w_m = 0
    exactly) this is p * (w - p.w), where p.w sums only the small p_c of the other
    classes: diag(p) - p p^T would subtract numbers near p_m = 1 that agree to the
    digits of 1 - p_m."""
    batch, classes = logits.shape
    probs = torch.log_softmax(logits, dim=1).exp()
    is_top = torch.arange(classes, device=logits.device) == logits.argmax(1, keepdim=True)

    def product(U: torch.Tensor) -> torch.Tensor:
        shape = (batch, classes) + (1,) * (U.dim() - 2)
        p, top = probs.reshape(shape), is_top.reshape(shape)
        w = U - torch.where(top, U, torch.zeros_like(U)).sum(1, keepdim=True)
        out = p * (w - (p * w).sum(1, keepdim=True))
        return out / batch if reduction == "mean" else out

    return product


def cross_entropy_gradient(logits: torch.Tensor, y: torch.Tensor, *,
                           reduction: str = "mean") -> torch.Tensor:
    """dloss/dlogits = p - onehot(y) (divided by B for "mean"), (B, C), with the label's
    entry -(1 - p_y) computed as minus the sum of the other classes' probabilities,
    exp(logsumexp of the other logits - logsumexp of all): never 1 - p_y, whose digits
    vanish once the model is confident.

    Args:
        logits: (B, C) float logits.
        y: (B,) class indices in [0, C).
        reduction: "mean" or "sum".

    Returns:
        (B, C), the dtype and device of ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy_gradient: logits must be (batch, classes), got "
                         f"{tuple(logits.shape)}")
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    probs = (logits - lse).exp()
    label = F.one_hot(y.long(), logits.shape[1]).bool()
    others = torch.logsumexp(logits.masked_fill(label, float("-inf")), dim=1, keepdim=True)
    out = torch.where(label, -(others - lse).exp(), probs)
    return out / logits.shape[0] if reduction == "mean" else out


def cross_entropy_hessian_matmat(logits: torch.Tensor, U: torch.Tensor, *,
                                 reduction: str = "mean") -> torch.Tensor:
    """H_loss U: the Hessian of the cross-entropy w.r.t. the logits, diag(p) - p p^T per
    sample (divided by the batch size for ``reduction="mean"``), times the logit
    tangents U, in a form without catastrophic cancellation: accurate to near the
    dtype's precision even when 1 - p_top is far below its epsilon. The labels play no
    part.

    Per sample, (diag(p) - p p^T) u = p * (u - p.u); it is computed as p * (w - p.w) with
    w = u - u_m (m the most probable class), which is equal since the rows of the matrix
    sum to zero, and whose dot product p.w skips the p_m ~ 1 term.

    Args:
        logits: (B, C).
        U: (B, C), or (B, C, k) for k tangents at once; the dtype of ``logits``.
        reduction: "mean" or "sum".

    Returns:
        The shape of U, in the dtype of ``logits``.
    """
    where = "pyflat.reference.cross_entropy_hessian_matmat"
    for name, t in (("logits", logits), ("U", U)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits: expected shape (batch, classes), got "
                         f"{tuple(logits.shape)}")
    if U.dim() not in (2, 3) or tuple(U.shape[:2]) != tuple(logits.shape):
        B, C = logits.shape
        raise ValueError(f"{where}: U: expected shape ({B}, {C}) or ({B}, {C}, k), got "
                         f"{tuple(U.shape)}")
    if U.dtype != logits.dtype:
        raise TypeError(f"{where}: U: expected dtype {logits.dtype}, got {U.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction: expected 'mean' or 'sum', got {reduction!r}")
    return _cross_entropy_hessian(logits, reduction)(U)


def functions(model: nn.Module, data, reduction: str = "mean") -> CurvatureFunctions:
    """The autograd products for ``model`` on the batch ``data = (X, y)``: a
    :class:`CurvatureFunctions` holding a snapshot of the parameters, buffers, modes and
    batch as they are now."""
    return CurvatureFunctions(model, data, reduction)


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> torch.Tensor:
    """fn on a (P,) vector, or on every column of a (P, k) block under vmap; on a GPU
    without TF32 unless pyflat allows it."""
    with full_precision(V.device):
        if V.dim() == 1:
            return fn(V)
        return vmap(fn, in_dims=1, out_dims=1)(V)


def loss(model: nn.Module, data, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``model`` on ``data = (X, y)`` (no L2 term): a 0-dim tensor, the
    mean or sum over the batch, computed without gradients by the model in its current
    mode."""
    X, y = data
    with torch.no_grad(), autograd_friendly_attention():
        return F.cross_entropy(model(X), y.long(), reduction=reduction)


def ggn_matmat(model: nn.Module, data, V: torch.Tensor, *, reduction: str = "mean",
               weight_decay: float = 0.0) -> torch.Tensor:
    """(G + mu I) V, G = J^T H_loss J the generalized Gauss-Newton matrix (Schraudolph 2002;
    Martens 2010), by torch.func: jvp, loss Hessian (:func:`cross_entropy_hessian_matmat`),
    vjp; the columns of a block under vmap.

    Args:
        model: any model mapping X to (B, C) logits.
        data: the batch (X, y).
        V: (P,) or (P, k), on the device of the model's parameters and normally in their
            dtype.
        reduction: "mean" or "sum" of the cross-entropy over the batch.
        weight_decay: mu.

    Returns:
        The shape of V.
    """
    out = _apply(functions(model, data, reduction).ggn_vp, V)
    return out + weight_decay * V if weight_decay else out


def hessian_matmat(model: nn.Module, data, V: torch.Tensor, *, reduction: str = "mean",
                   weight_decay: float = 0.0) -> torch.Tensor:
    """(H + mu I) V, H the exact Hessian of the loss, the oracle
    (:meth:`CurvatureFunctions.hessian_vp`: the GGN product plus the logits' curvature
    weighted by dl/df, by jvp of a vjp, Pearlmutter 1994); the columns of a block under
    vmap.

    Arguments and shapes as :func:`ggn_matmat`: V (P,) or (P, k), the result likewise.
    """
    out = _apply(functions(model, data, reduction).hessian_vp, V)
    return out + weight_decay * V if weight_decay else out


def hessian_matmat_double_backward(model: nn.Module, data, V: torch.Tensor, *,
                                   reduction: str = "mean",
                                   weight_decay: float = 0.0) -> torch.Tensor:
    """(H + mu I) V by double backward (torch.autograd.grad twice), column by column;
    arguments and shapes as :func:`ggn_matmat`. The formulation most scripts use, a check
    independent of :func:`hessian_matmat`'s."""
    fns = functions(model, data, reduction)
    with full_precision(V.device):
        out = (fns.hvp_double_backward(V) if V.dim() == 1 else
               torch.stack([fns.hvp_double_backward(V[:, j]) for j in range(V.shape[1])], 1))
    return out + weight_decay * V if weight_decay else out


def hessian_dense(model: nn.Module, data, *, reduction: str = "mean",
                  weight_decay: float = 0.0) -> torch.Tensor:
    """The (P, P) Hessian H + mu I, from the oracle's product on the columns of the
    identity (vmap over P columns: tiny models only), symmetrized as (H + H^T) / 2."""
    fns = functions(model, data, reduction)
    eye = torch.eye(fns.params.numel(), dtype=fns.params.dtype, device=fns.params.device)
    H = _apply(fns.hessian_vp, eye)
    H = (H + H.T) / 2  # symmetric up to rounding; make it exactly so
    return H + weight_decay * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def ggn_dense(model: nn.Module, data, *, reduction: str = "mean",
              weight_decay: float = 0.0) -> torch.Tensor:
    """The (P, P) GGN J^T H_loss J + mu I from the full (B, C, P) Jacobian of the logits
    (``torch.func.jacrev``) and the loss Hessian applied to its columns (tiny models
    only)."""
    fns = functions(model, data, reduction)
    J = torch.func.jacrev(lambda theta: fns.logits(*fns.unflatten(theta)))(fns.params)
    logits = fns.logits(*fns.param_tuple)
    HJ = cross_entropy_hessian_matmat(logits, J, reduction=reduction)  # (B, C, P)
    G = torch.einsum("ncp,ncq->pq", J, HJ)
    return G + weight_decay * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


class _ReferenceOperator(CurvatureOperator):
    _product = ""

    def __init__(self, model: nn.Module, data, *, reduction: str = "mean",
                 weight_decay: float = 0.0):
        layout = ParameterLayout.of(model)
        super().__init__(layout, layout.parameters[0].dtype, layout.parameters[0].device)
        self._functions = functions(model, data, reduction)
        self.weight_decay = float(weight_decay)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = _apply(getattr(self._functions, self._product), V)
        return out + self.weight_decay * V if self.weight_decay else out


class ReferenceGGN(_ReferenceOperator):
    """The GGN J^T H_loss J (+ mu I) as a (P, P) linear operator backed by torch.func; any
    model. Its dtype and device are those of the model's first parameter.

    Args:
        model: any model mapping X to (B, C) logits.
        data: the batch (X, y), snapshotted with the parameters at construction.
        reduction: "mean" or "sum".
        weight_decay: mu.
    """

    _product = "ggn_vp"


class ReferenceHessian(_ReferenceOperator):
    """The exact Hessian (+ mu I) as a (P, P) linear operator backed by torch.func
    (:meth:`CurvatureFunctions.hessian_vp`); any model. Arguments as
    :class:`ReferenceGGN`."""

    _product = "hessian_vp"
