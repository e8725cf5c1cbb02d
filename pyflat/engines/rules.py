"""The graph engine's layer rules: one class per layer kind, behind one interface.

A rule holds everything one kind of layer contributes to the products (R = directional
derivative, D = delta, e = gradient delta):

* ``forward``: the layer's value on the prepared batch, and what the products will need
  (the input, s' and s'', the argmax, the normalised input) in ``site.cache``;
* ``tangent``: the R-op, (B, k, ...) tangents of the inputs and the directions of the
  layer's parameters to the tangent of its output;
* ``backward``: the vjp, a delta at the output to deltas at the inputs and, in a product,
  the parameter rows of the result; with the exact Hessian, the second-order terms, read
  from the gradient delta ``e`` (or s'' e) that ``keep_second_order`` stored.

The engine (pyflat/engines/graph.py) owns the loops and the memory policy: which tangents and
deltas a rule may overwrite (``overwritable``, ``shared``), which it frees, and where
deltas that fan out are summed. Rules hold no state of their own; per-node state lives in
its :class:`Site`. ``MODULE_RULES`` finds a module's rule by type; the engine's capture
maps traced functions and methods to rules through ``CALL_RULES`` and the affine table.

Adding a layer kind: a Rule subclass with its four passes, an entry in the table, and its
case in tests/engines/test_rules.py (the rule alone against torch.func in float64).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import ops
from ..activations import CURVED, MODULE_READERS
from ..errors import UnsupportedModel

__all__ = ["Rule", "Site", "Products", "MODULE_RULES", "RULES"]


class Site:
    """One node of the prepared batch, as its rule sees it: the node (module, parameters,
    traced call), its cache, its parameters' snapshots, and the batch."""

    __slots__ = ("node", "index", "cache", "params", "engine")

    def __init__(self, node, index: int, cache: dict, params: dict, engine):
        self.node, self.index, self.cache, self.params, self.engine = \
            node, index, cache, params, engine

    @property
    def batch(self) -> int:
        """B, the number of samples of the prepared batch."""
        return self.engine.batch

    @property
    def shape(self) -> tuple[int, ...]:
        """The node's output shape without the batch axis."""
        return self.engine.shapes[self.index]

    def input_shape(self, position: int = 0) -> tuple[int, ...]:
        """The shape of input ``position``'s value without the batch axis."""
        return self.engine.shapes[self.node.inputs[position]]

    @property
    def exact(self) -> bool:
        """Whether the batch is prepared for the exact Hessian (s'' and gradient deltas)."""
        return self.engine.exact

    @property
    def caller(self) -> str:
        """The public name errors speak for (e.g. ``"pyflat.GGN"``)."""
        return self.engine.caller

    def unsupported(self, why: str) -> UnsupportedModel:
        """The UnsupportedModel error for this node: its label, then ``why``."""
        return UnsupportedModel(f"{self.caller}: {self.node.label} {why}", self.node.label)


@dataclass
class Products:
    """One pass over the nodes: ``k`` directions (rows of ``directions``, in the flat
    layout), and ``out`` (k, P) for the parameter rows of the result (None while
    preparing the gradient deltas). ``exact`` adds the Hessian's second-order terms."""

    directions: torch.Tensor | None
    out: torch.Tensor | None
    k: int
    exact: bool
    layout: Any  # pyflat.linalg.ParameterLayout

    def direction(self, parameter: torch.Tensor) -> torch.Tensor:
        """The rows of ``parameter`` in the directions: (k, *parameter.shape)."""
        return self.layout.rows(self.directions, self.layout.position(parameter))

    def write(self, parameter: torch.Tensor, rows: torch.Tensor) -> None:
        """Sets the rows of ``parameter`` in ``out`` to ``rows``, (k, *parameter.shape)."""
        self.layout.write_rows(self.out, self.layout.position(parameter), rows)


# (input position, delta, whether the delta is held elsewhere too)
Sends = list[tuple[int, torch.Tensor, bool]]


class Rule:
    """The interface every layer kind implements; the defaults are those of a layer
    without parameters or second-order terms."""

    #: the kind's name, for messages and tests
    name = ""

    def forward(self, site: Site, x: torch.Tensor, values: list, env: dict) -> torch.Tensor:
        """The value at the node; ``x`` is its first input's value, ``values`` all the
        earlier nodes' values, ``env`` the traced values by fx node (sizes)."""
        raise NotImplementedError

    def reads_input_tangent(self, site: Site) -> bool:
        """Whether the exact Hessian's backward reads the tangent of the first input (the
        engine then keeps that tangent instead of overwriting or freeing it)."""
        return False

    def keep_second_order(self, site: Site, e: torch.Tensor | None) -> None:
        """Called once after the forward with the gradient delta at the node's output
        ((B, ...), None where no parameter reaches the node), for the exact Hessian."""

    def tangent(self, site: Site, inputs: list[torch.Tensor | None],
                overwritable: list[bool], p: Products) -> tuple[torch.Tensor | None, bool]:
        """The tangent of the output, (B, k, ...), from the inputs' tangents (None where an
        input carries none); ``overwritable[j]`` says the rule may write over input j's.
        Returns (tangent, whether it is memory of its own rather than a view of an input)."""
        raise NotImplementedError

    def backward(self, site: Site, d: torch.Tensor, t_in: torch.Tensor | None,
                 needs: list[bool], shared: bool, p: Products) -> Sends:
        """Deltas at the inputs from ``d`` at the output, (B, k, ...); ``needs[j]`` says
        input j carries a tangent (wants a delta); ``shared`` that ``d`` is held elsewhere
        (copy before writing over it); ``t_in`` the first input's tangent in an exact
        product. Writes the parameter rows through ``p.write`` when ``p.out`` is set."""
        raise NotImplementedError


# ------------------------------------------------------------------------ helpers
def _pool_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of adaptive average pooling along one axis."""
    m = torch.zeros(size_out, size_in, dtype=like.dtype, device=like.device)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _conv_params(module: nn.Module) -> dict[str, Any]:
    padding = module.padding
    if isinstance(padding, str):
        padding = [0 if padding == "valid" else d * (s - 1) // 2
                   for d, s in zip(module.dilation, module.kernel_size)]
    return {"stride": list(module.stride), "padding": list(padding),
            "dilation": list(module.dilation), "groups": module.groups}


def _conv(x, weight, p):
    return torch.ops.aten.convolution(x, weight, None, p["stride"], p["padding"], p["dilation"],
                                      False, [0] * len(p["stride"]), p["groups"])


def _conv_backward(grad_out, x, weight, p, want_input: bool, want_weight: bool):
    """(input, weight) gradients of <grad_out, conv(x, weight)>, as asked. ``x`` or
    ``weight`` may be given as a shape where only the other's values are read."""
    if not isinstance(x, torch.Tensor):
        x = grad_out.new_empty(x)
    if not isinstance(weight, torch.Tensor):
        weight = grad_out.new_empty(weight)
    grads = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, p["stride"], p["padding"], p["dilation"], False,
        [0] * len(p["stride"]), p["groups"], [want_input, want_weight, False])
    return grads[0], grads[1]


def _subsample(x: torch.Tensor, stride) -> torch.Tensor:
    """The pixels a 1x1 convolution with this stride reads: x[..., ::s1, ::s2]."""
    if all(s == 1 for s in stride):
        return x
    return x[(Ellipsis,) + tuple(slice(None, None, s) for s in stride)]


def _upsample(sub: torch.Tensor, in_shape, stride) -> torch.Tensor:
    """The adjoint of _subsample: (N, C, pixels) back onto (N, *in_shape), zeros between."""
    if all(s == 1 for s in stride):
        return sub.view(sub.shape[0], *in_shape)
    full = sub.new_zeros((sub.shape[0], *in_shape))
    picked = _subsample(full, stride)
    picked.copy_(sub.view(picked.shape))
    return full


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def run_fx_node(n: fx.Node, env: dict) -> Any:
    """Evaluates a traced call (a size, a reshape, an affine map) on the prepared
    forward's values."""
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


# -------------------------------------------------------------------------- rules
class Input(Rule):
    name = "input"

    def forward(self, site, x, values, env):
        return x

    def backward(self, site, d, t_in, needs, shared, p):
        return []


class _Weighted(Rule):
    """A layer with a weight: its exact backward reads the input's tangent (e Ra into the
    weight's rows) and the gradient delta e at its output."""

    def reads_input_tangent(self, site):
        return True

    def keep_second_order(self, site, e):
        if e is not None:
            site.cache["e"] = e.contiguous()


class Linear(_Weighted):
    """z = a W^T + c.  Rz = Ra W^T + a V^T + Rc;  grad V = D^T a (+ e^T Ra);
    D_a = D W (+ e V)."""

    name = "linear"

    def forward(self, site, x, values, env):
        if x.dim() != 2:
            raise site.unsupported(f"gets input of shape {tuple(x.shape)}; the engine takes "
                                   "Linear layers on (batch, features) inputs")
        site.cache["a"] = x
        return F.linear(x, site.params["weight"], site.params.get("bias"))

    def tangent(self, site, inputs, overwritable, p):
        B, k, c, node = site.batch, p.k, site.cache, site.node
        t = inputs[0]
        V = p.direction(node.params["weight"])   # (k, out, in)
        out = (c["a"] @ V.reshape(-1, V.shape[-1]).t()).view(B, k, -1)
        if t is not None:
            out.add_((t.reshape(B * k, -1) @ site.params["weight"].t()).view(B, k, -1))
        if "bias" in node.params:
            out.add_(p.direction(node.params["bias"]))
        return out, True

    def backward(self, site, d, t_in, needs, shared, p):
        B, k, c, node = site.batch, p.k, site.cache, site.node
        O = d.shape[-1]
        e = c.get("e") if p.exact else None
        if p.out is not None:
            gw = (d.reshape(B, k * O).t() @ c["a"]).view(k, O, -1)
            if e is not None and t_in is not None:
                gw = gw + (e.t() @ t_in.reshape(B, -1)).view(O, k, -1).transpose(0, 1)
            p.write(node.params["weight"], gw)
            if "bias" in node.params:
                p.write(node.params["bias"], d.sum(0))
        if not needs[0]:
            return []
        din = (d.reshape(B * k, O) @ site.params["weight"]).view(B, k, -1)
        if e is not None:
            V = p.direction(node.params["weight"])
            din = din + (e @ V.transpose(0, 1).reshape(O, -1)).view(B, k, -1)
        return [(0, din, False)]


class Conv(_Weighted):
    """Convolutions (1-D, 2-D): the Linear rule with conv in place of the product.
    Grouped convolutions stack the k directions' channels (group, direction, channel) so
    that each direction stays inside its group; 1x1 convolutions without padding or groups
    run as batched GEMMs over the pixels they read."""

    name = "conv"

    def forward(self, site, x, values, env):
        m, cache = site.node.module, site.cache
        if x.dim() != m.weight.dim() or x.shape[1] != m.in_channels:
            raise site.unsupported(
                f"gets input of shape {tuple(x.shape)}; it takes (batch, {m.in_channels}, "
                f"{', '.join('...' for _ in m.kernel_size)})")
        cache["conv"] = conv = _conv_params(m)
        # 1x1 convolutions without padding or groups are GEMMs over the (subsampled)
        # pixels: oneDNN's strided 1x1 backward is slower than the forward it mirrors
        cache["pointwise"] = (all(s == 1 for s in m.kernel_size) and conv["groups"] == 1
                              and all(q == 0 for q in conv["padding"]))
        cache["a"] = x
        if cache["pointwise"]:  # (B, I, pixels the 1x1 kernel visits)
            cache["a_sub"] = _subsample(x, conv["stride"]).reshape(x.shape[0], x.shape[1], -1)
        return torch.ops.aten.convolution(x, site.params["weight"], site.params.get("bias"),
                                          conv["stride"], conv["padding"], conv["dilation"],
                                          False, [0] * len(conv["stride"]), conv["groups"])

    def tangent(self, site, inputs, overwritable, p):
        B, k, c, node, shape = site.batch, p.k, site.cache, site.node, site.shape
        t = inputs[0]
        if c["pointwise"]:
            V = p.direction(node.params["weight"])   # (k, O, I, 1...)
            O, I, spatial = V.shape[1], V.shape[2], shape[1:]
            out = torch.matmul(V.reshape(k * O, I), c["a_sub"]).view(B, k, O, *spatial)
            if t is not None:
                t_sub = _subsample(t, c["conv"]["stride"]).reshape(B * k, I, -1)
                out.add_(torch.matmul(site.params["weight"].reshape(O, I), t_sub).view(
                    B, k, O, *spatial))
            return self._add_bias(out, node, p), True
        conv = c["conv"]
        g = conv["groups"]
        V = p.direction(node.params["weight"])   # (k, O, I/g, ...)
        O, rest = V.shape[1], V.shape[2:]
        # stacked output channels ordered (group, direction, channel)
        Vs = V.reshape(k, g, O // g, *rest).transpose(0, 1).reshape(k * O, *rest)
        out = _conv(c["a"], Vs, conv)                             # (B, g*k*O/g, ...)
        spatial = out.shape[2:]
        out = out.view(B, g, k, O // g, *spatial).transpose(1, 2).reshape(B, k, O, *spatial)
        if t is not None:
            out.add_(_conv(t.reshape(B * k, *t.shape[2:]), site.params["weight"],
                           conv).view(B, k, O, *spatial))
        return self._add_bias(out, node, p), True

    @staticmethod
    def _add_bias(out, node, p):
        """out (B, k, O, ...) plus each direction's bias rows, per channel."""
        if "bias" in node.params:
            rows = p.direction(node.params["bias"])               # (k, O)
            out.add_(rows.view(1, *rows.shape, *([1] * (out.dim() - 3))))
        return out

    def backward(self, site, d, t_in, needs, shared, p):
        if site.cache["pointwise"]:
            return self._backward_pointwise(site, d, t_in, needs, p)
        B, k, c, node = site.batch, p.k, site.cache, site.node
        conv = c["conv"]
        g = conv["groups"]
        O, spatial = d.shape[2], d.shape[3:]
        a, W = c["a"], site.params["weight"]
        rest, in_shape = W.shape[1:], a.shape[1:]
        e = c.get("e") if p.exact else None
        has_bias = "bias" in node.params
        needs_input = needs[0]
        din = gw = None
        # (oneDNN's float32 bias gradient sums naively; torch.sum sums pairwise)
        gb = d.sum(dim=(0, *range(3, d.dim()))) if has_bias and p.out is not None else None
        if k == 1:
            # one call for the weight and input gradients at this delta
            gi, gw = _conv_backward(d.view(B, O, *spatial), a, W, conv, needs_input,
                                    p.out is not None)
            if p.out is not None:
                gw = gw.unsqueeze(0)
            if needs_input:
                din = gi.view(B, 1, *in_shape)
        else:
            if p.out is not None:
                # stacked as in the forward: output channels (group, direction, channel)
                ds = d.view(B, k, g, O // g, *spatial).transpose(1, 2).reshape(
                    B, k * O, *spatial)
                gw = _conv_backward(ds, a, (k * O, *rest), conv, False, True)[1]
                gw = gw.view(g, k, O // g, *rest).transpose(0, 1).reshape(k, O, *rest)
            if needs_input:
                din = _conv_backward(d.reshape(B * k, O, *spatial), (B * k, *in_shape),
                                     W, conv, True, False)[0].view(B, k, *in_shape)
        if p.out is not None:
            if e is not None and t_in is not None:
                I_g = rest[0]
                # input channels (group, direction, channel), weight (O, k*I/g, ...)
                ts = t_in.view(B, k, g, I_g, *t_in.shape[3:]).transpose(1, 2).reshape(
                    B, g * k * I_g, *t_in.shape[3:])
                he = _conv_backward(e, ts, (O, k * I_g, *rest[1:]), conv, False, True)[1]
                kernel_dims = range(4, 3 + len(rest))
                gw = gw + he.view(g, O // g, k, I_g, *rest[1:]).permute(
                    2, 0, 1, 3, *kernel_dims).reshape(k, O, *rest)
            p.write(node.params["weight"], gw)
            if has_bias:
                p.write(node.params["bias"], gb)
        if not needs_input:
            return []
        if e is not None:
            V = p.direction(node.params["weight"])
            I_g, kernel = V.shape[2], V.shape[3:]
            # e through conv(., V_j) for every j: a weight (O, k*I/g, ...) whose input
            # channels are ordered (group, direction, channel)
            Vt = V.reshape(k, g, O // g, I_g, *kernel).permute(
                1, 2, 0, 3, *range(4, 4 + len(kernel))).reshape(O, k * I_g, *kernel)
            he = _conv_backward(e, (B, g * k * I_g, *in_shape[1:]), Vt, conv, True, False)[0]
            din.add_(he.view(B, g, k, I_g, *in_shape[1:]).transpose(1, 2).reshape(
                B, k, *in_shape))
        return [(0, din, False)]

    def _backward_pointwise(self, site, d, t_in, needs, p):
        B, k, c, node = site.batch, p.k, site.cache, site.node
        a_sub, W, stride = c["a_sub"], site.params["weight"], c["conv"]["stride"]
        O, I, S = d.shape[2], a_sub.shape[1], a_sub.shape[2]
        ones = W.shape[2:]
        e = c.get("e") if p.exact else None
        if p.out is not None:
            # sum over the batch of per-sample GEMMs: a fixed-order reduction
            gw = torch.matmul(d.reshape(B, k * O, S), a_sub.transpose(1, 2)).sum(0)
            gw = gw.view(k, O, I)
            if e is not None and t_in is not None:
                t_sub = _subsample(t_in, stride).reshape(B, k * I, S)
                he = torch.matmul(e.reshape(B, O, S), t_sub.transpose(1, 2)).sum(0)
                gw = gw + he.view(O, k, I).transpose(0, 1)
            p.write(node.params["weight"], gw.reshape(k, O, I, *ones))
            if "bias" in node.params:
                p.write(node.params["bias"], d.sum(dim=(0, *range(3, d.dim()))))
        if not needs[0]:
            return []
        sub = torch.matmul(W.reshape(O, I).t(), d.reshape(B * k, O, S))
        if e is not None:
            V = p.direction(node.params["weight"]).reshape(k, O, I)
            sub = sub.view(B, k * I, S).add_(torch.matmul(
                V.transpose(1, 2).reshape(k * I, O), e.reshape(B, O, S)))
        in_shape = c["a"].shape[1:]
        return [(0, _upsample(sub.view(B * k, I, S), in_shape, stride).view(B, k, *in_shape),
                 False)]


class Activation(Rule):
    """a = s(z).  Ra = s' Rz;  D_z = s' D (+ s'' e_a Rz)."""

    name = "activation"

    def _curved(self, site) -> bool:
        return site.exact and site.node.activation[0] in CURVED

    def forward(self, site, x, values, env):
        name, p0, p1 = site.node.activation
        curved = self._curved(site)
        value, first, second = ops.activation_forward(x, name, p0, p1, with_second=curved)
        site.cache["first"] = first
        if curved:
            site.cache["second"] = second
        return value

    def reads_input_tangent(self, site):
        return self._curved(site)

    def keep_second_order(self, site, e):
        second = site.cache.pop("second", None)
        if second is not None and e is not None:
            site.cache["curvature"] = (second * e).contiguous()

    def tangent(self, site, inputs, overwritable, p):
        t, first = inputs[0], site.cache["first"]
        if overwritable[0]:  # s' * t over t itself
            return ops.activation_delta_(t, first), True
        return ops.activation_tangent(first, t), True

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        # in place below: copy a delta held elsewhere, or kept as a result
        delta = (d.clone(memory_format=torch.contiguous_format)
                 if shared or p.out is None else d.contiguous())
        curvature = site.cache.get("curvature") if p.exact else None
        ops.activation_delta_(delta, site.cache["first"], curvature,
                              t_in if curvature is not None else None)
        return [(0, delta, False)]


# functional pooling -> (module type, its positional parameters after the input)
FUNCTION_POOLS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}


class _Pooling(Rule):
    """Pooling as a module, or as a function whose module is built on the prepared
    forward (its sizes may be traced values)."""

    def module(self, site, env) -> nn.Module:
        if site.node.module is not None:
            site.cache["module"] = site.node.module
            return site.node.module
        n = site.node.fx_node
        module_type, names = FUNCTION_POOLS[n.target]
        args = fx.node.map_arg(n.args[1:], lambda a: env[a])
        kwargs = fx.node.map_arg(dict(n.kwargs), lambda a: env[a])
        bound = dict(zip(names, args), **kwargs)
        if bound.pop("return_indices", False):
            raise UnsupportedModel(f"{site.caller}: unsupported {site.node.label}: "
                                   "return_indices=True", site.node.label)
        try:
            m = module_type(**bound)
        except TypeError as err:
            raise UnsupportedModel(f"{site.caller}: unsupported {site.node.label}: {err}",
                                   site.node.label) from None
        site.cache["module"] = m
        return m


class MaxPool(_Pooling):
    """Tangents gathered at the forward's argmax, deltas routed back to it."""

    name = "maxpool"

    def forward(self, site, x, values, env):
        m = self.module(site, env)
        if x.dim() != 4:
            raise site.unsupported(f"gets input of shape {tuple(x.shape)}; the engine takes "
                                   "(B, C, H, W)")
        out, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                ceil_mode=m.ceil_mode, return_indices=True)
        site.cache["indices"] = idx
        site.cache["in_shape"] = tuple(x.shape[1:])
        return out

    def tangent(self, site, inputs, overwritable, p):
        B, k, c, t = site.batch, p.k, site.cache, inputs[0]
        idx = c["indices"]
        C, H, W = c["in_shape"]
        flat = idx.view(B, 1, C, -1).expand(B, k, C, idx.shape[-2] * idx.shape[-1])
        return t.reshape(B, k, C, H * W).gather(3, flat).view(B, k, *site.shape), True

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        B, k, c = site.batch, p.k, site.cache
        C, H, W = c["in_shape"]
        idx = c["indices"]
        Ho, Wo = idx.shape[-2:]
        m = c["module"]
        grad_in = torch.ops.aten.max_pool2d_with_indices_backward(
            d.reshape(B, k * C, Ho, Wo), d.new_empty((B, k * C, H, W)),
            _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation),
            m.ceil_mode, idx.unsqueeze(1).expand(B, k, C, Ho, Wo).reshape(B, k * C, Ho, Wo))
        return [(0, grad_in.view(B, k, C, H, W), False)]


class AvgPool(_Pooling):
    """A linear map: the pooling itself on tangents, its adjoint on deltas."""

    name = "avgpool"

    def forward(self, site, x, values, env):
        m = self.module(site, env)
        site.cache["in_shape"] = tuple(x.shape[1:])
        return m(x)

    def tangent(self, site, inputs, overwritable, p):
        t = inputs[0]
        return site.cache["module"](t.reshape(site.batch, -1, *t.shape[-2:])).view(
            site.batch, p.k, *site.shape), True

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        B, k, c = site.batch, p.k, site.cache
        C, H, W = c["in_shape"]
        m = c["module"]
        grad_in = torch.ops.aten.avg_pool2d_backward(
            d.reshape(B, k * C, *d.shape[-2:]), d.new_empty((B, k * C, H, W)),
            _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), m.ceil_mode,
            m.count_include_pad, m.divisor_override)
        return [(0, grad_in.view(B, k, C, H, W), False)]


class AdaptiveAvgPool(_Pooling):
    """Separable averaging matrices along H and W: rows @ t @ cols^T, and the adjoint."""

    name = "adaptive_avgpool"

    def forward(self, site, x, values, env):
        out = self.module(site, env)(x)
        site.cache["rows"] = _pool_matrix(x.shape[-2], out.shape[-2], x)
        site.cache["cols"] = _pool_matrix(x.shape[-1], out.shape[-1], x)
        return out

    def tangent(self, site, inputs, overwritable, p):
        return site.cache["rows"] @ inputs[0] @ site.cache["cols"].t(), True

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        return [(0, site.cache["rows"].t() @ d @ site.cache["cols"], False)]


class BatchNorm(_Weighted):
    """Eval mode: y = g xhat + beta, xhat = (x - mean) / sd with running statistics.
    Ry = g/sd Rx + Rg xhat + Rbeta;  grad Rg = D xhat (+ e Rx / sd);
    D_x = g/sd D (+ e Rg / sd)."""

    name = "batchnorm"

    def forward(self, site, x, values, env):
        m, p, cache = site.node.module, site.params, site.cache
        if x.dim() < 2 or x.shape[1] != m.num_features:
            raise site.unsupported(f"gets input of shape {tuple(x.shape)}")
        bshape = (1, -1) + (1,) * (x.dim() - 2)
        sd = torch.sqrt(m.running_var.to(x.dtype) + m.eps)
        xhat = (x - m.running_mean.to(x.dtype).view(bshape)) / sd.view(bshape)
        gain = p["weight"] if "weight" in p else torch.ones_like(sd)
        cache.update(xhat=xhat, inv_sd=1.0 / sd, scale=gain / sd)
        # the value as the module computes it, so that kinks downstream (ReLU, max
        # pooling) switch exactly where autograd's do in this dtype
        return F.batch_norm(x, m.running_mean, m.running_var, p.get("weight"),
                            p.get("bias"), False, 0.0, m.eps)

    def reads_input_tangent(self, site):
        return "weight" in site.node.params  # e Rx / sd enters the gain's rows alone

    def tangent(self, site, inputs, overwritable, p):
        B, k, c, node, shape = site.batch, p.k, site.cache, site.node, site.shape
        t = inputs[0]
        C = shape[0]
        per_channel = (1, k, C) + (1,) * (len(shape) - 1)
        scale = c["scale"].view(1, 1, C, *per_channel[3:])
        if t is None:
            out = torch.zeros((B, k, *shape), dtype=p.directions.dtype,
                              device=p.directions.device)
        else:
            out = t.mul_(scale) if overwritable[0] else t * scale
        if "weight" in node.params:
            Rg = p.direction(node.params["weight"])
            out.addcmul_(c["xhat"].unsqueeze(1), Rg.view(per_channel))
        if "bias" in node.params:
            out.add_(p.direction(node.params["bias"]).view(per_channel))
        return out, True

    def backward(self, site, d, t_in, needs, shared, p):
        k, c, node = p.k, site.cache, site.node
        C = d.shape[2]
        bshape = (1, 1, C) + (1,) * (d.dim() - 3)
        reduce = (0, *range(3, d.dim()))
        e = c.get("e") if p.exact else None
        Rg = None
        if "weight" in node.params and e is not None:
            Rg = p.direction(node.params["weight"])
        if p.out is not None:
            if "weight" in node.params:
                gg = (d * c["xhat"].unsqueeze(1)).sum(dim=reduce)
                if e is not None and t_in is not None:
                    gg = gg + (e.unsqueeze(1) * t_in).sum(dim=reduce) * c["inv_sd"]
                p.write(node.params["weight"], gg)
            if "bias" in node.params:
                p.write(node.params["bias"], d.sum(dim=reduce))
        if not needs[0]:
            return []
        # over d itself where no one else holds it (a product, not the prepare)
        owned = p.out is not None and not shared and d.is_contiguous()
        din = d.mul_(c["scale"].view(bshape)) if owned else d * c["scale"].view(bshape)
        if Rg is not None:
            din.addcmul_(e.unsqueeze(1), (Rg * c["inv_sd"]).view(1, k, C, *bshape[3:]))
        return [(0, din, False)]


class Reshape(Rule):
    """Flatten, view, reshape keeping the batch axis: the module or method itself on the
    primal (its output shape is the rule), the same reshape of (B, k, ...) otherwise."""

    name = "reshape"

    def forward(self, site, x, values, env):
        m = site.node.module
        return m(x) if m is not None else run_fx_node(site.node.fx_node, env)

    def tangent(self, site, inputs, overwritable, p):
        return inputs[0].reshape(site.batch, p.k, *site.shape), False

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        return [(0, d.reshape(site.batch, p.k, *site.input_shape()), shared)]


class Add(Rule):
    """a + b: tangents add; the delta goes to both inputs."""

    name = "add"

    def forward(self, site, x, values, env):
        a, b = site.node.inputs
        return values[a] + values[b]

    def tangent(self, site, inputs, overwritable, p):
        ta, tb = inputs
        if ta is None or tb is None:
            return (tb if ta is None else ta), False
        if overwritable[0]:
            return ta.add_(tb), True
        if overwritable[1]:
            return tb.add_(ta), True
        return ta + tb, True

    def backward(self, site, d, t_in, needs, shared, p):
        return [(0, d, True), (1, d, True)]


class Identity(Rule):
    """Identity, Dropout in eval mode, .contiguous(): values, tangents and deltas pass."""

    name = "identity"

    def forward(self, site, x, values, env):
        return x

    def tangent(self, site, inputs, overwritable, p):
        return inputs[0], False

    def backward(self, site, d, t_in, needs, shared, p):
        return [(0, d, shared)] if needs[0] else []


class Affine(Rule):
    """x + c, c - x, x * c, x / c, -x with c a number: the value is the traced call
    itself, on the primal; tangents and deltas are scaled by its slope."""

    name = "affine"

    def forward(self, site, x, values, env):
        return run_fx_node(site.node.fx_node, env)

    def tangent(self, site, inputs, overwritable, p):
        t, factor = inputs[0], site.node.factor
        if factor == 1.0:
            return t, False
        return (t.mul_(factor) if overwritable[0] else t * factor), True

    def backward(self, site, d, t_in, needs, shared, p):
        if not needs[0]:
            return []
        if site.node.factor == 1.0:
            return [(0, d, shared)]
        return [(0, d * site.node.factor, False)]


RULES = {rule.name: rule for rule in (Input(), Linear(), Conv(), Activation(), MaxPool(),
                                      AvgPool(), AdaptiveAvgPool(), BatchNorm(), Reshape(),
                                      Add(), Identity(), Affine())}

_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)


def _check_conv(caller: str, path: str, module: nn.Module) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode '{module.padding_mode}' (only 'zeros')"
    if isinstance(module.padding, str) and module.padding == "same" and any(
            d * (s - 1) % 2 for d, s in zip(module.dilation, module.kernel_size)):
        return "padding='same' with an even receptive field pads unevenly"
    return None


def _check_batchnorm(caller: str, path: str, module: nn.Module) -> str | None:
    if module.running_mean is None:
        return ("track_running_stats=False normalises with batch statistics even in eval "
                "mode; the engine takes running statistics")
    if module.training:
        raise TypeError(f"{caller}: {type(module).__name__} at '{path}' is in training mode; "
                        "curvature is measured in eval mode: call model.eval() first")
    return None


def _check_pass(caller: str, path: str, module: nn.Module) -> str | None:
    if module.training and getattr(module, "p", 0) > 0:
        raise TypeError(f"{caller}: {type(module).__name__} at '{path}' is in training mode, "
                        "so every product would draw a new mask; call model.eval() first")
    return None


@dataclass(frozen=True)
class ModuleRule:
    """A module type's rule, the check that refuses configurations it does not compute
    (returns why, or None), and what the node reads from the module (the activation)."""

    rule: Rule
    check: Callable[[str, str, nn.Module], str | None] | None = None
    activation: Callable[[nn.Module], tuple[str, float, float]] | None = None


#: module type -> its rule
MODULE_RULES: dict[type, ModuleRule] = {
    nn.Linear: ModuleRule(RULES["linear"]),
    nn.Conv1d: ModuleRule(RULES["conv"], _check_conv),
    nn.Conv2d: ModuleRule(RULES["conv"], _check_conv),
    nn.MaxPool2d: ModuleRule(RULES["maxpool"]),
    nn.AvgPool2d: ModuleRule(RULES["avgpool"]),
    nn.AdaptiveAvgPool2d: ModuleRule(RULES["adaptive_avgpool"]),
    nn.BatchNorm1d: ModuleRule(RULES["batchnorm"], _check_batchnorm),
    nn.BatchNorm2d: ModuleRule(RULES["batchnorm"], _check_batchnorm),
    nn.Flatten: ModuleRule(RULES["reshape"]),
    **{t: ModuleRule(RULES["identity"], _check_pass) for t in _PASS_MODULES},
    **{t: ModuleRule(RULES["activation"], activation=reader)
       for t, reader in MODULE_READERS.items()},
}

#: pooling functions -> their rule (the module is built on the prepared forward)
POOL_FUNCTION_RULES: dict[Callable, Rule] = {
    F.max_pool2d: RULES["maxpool"], F.avg_pool2d: RULES["avgpool"],
    F.adaptive_avg_pool2d: RULES["adaptive_avgpool"],
}
