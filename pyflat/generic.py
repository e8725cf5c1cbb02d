"""The engine's recurrences written as plain ATen calls from Python, on any device.

A second, independent implementation of the GGN and exact Hessian products with the
forward pass cached: the derivatives s', s'' of each activation come from autograd on the
activation module itself (not from pyflat's own formulas), and every term is a torch
op in the (B, k, d) tangent layout. It is the cross-check of the fused engine in the
tests and the "plain ATen, forward cached" baseline of the benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from .curvature.checks import check_batch
from .engines.mlp import parse_mlp
from .linalg import CurvatureOperator, ParameterLayout

__all__ = ["GenericGGN", "GenericHessian"]


def _derivatives(module: nn.Module, z: torch.Tensor):
    """(s(z), s'(z), s''(z)) of an elementwise activation, by reverse-mode autograd
    (elementwise, so the gradient of sum(s(z)) is s'(z))."""
    first_fn = grad(lambda t: module(t).sum())
    second = grad(lambda t: first_fn(t).sum())(z)
    return module(z), first_fn(z), second


class _GenericMLPCurvature(CurvatureOperator):
    _exact = False

    def __init__(self, model: nn.Module, data, *, reduction: str = "mean",
                 weight_decay: float = 0.0):
        caller = f"pyflat.generic.{type(self).__name__}"
        spec = parse_mlp(model, caller)
        dtype, device = spec.weights[0].dtype, spec.weights[0].device
        X, y = check_batch(data, dtype, device, spec.num_classes, caller)
        super().__init__(ParameterLayout.of(model), dtype, device)
        self.weight_decay = float(weight_decay)
        self._weights = [w.clone() for w in spec.weights]
        self._biases = [None if b is None else b.clone() for b in spec.biases]
        a = spec.transform_input(X)
        self._inputs, self._firsts, self._seconds = [], [], []
        with torch.no_grad():
            for W, b, act in zip(self._weights, self._biases, spec.activation_modules):
                self._inputs.append(a)
                z = F.linear(a, W, b)
                if act is None:
                    a, first, second = z, None, None
                else:
                    a, first, second = _derivatives(act, z)
                self._firsts.append(first)
                self._seconds.append(second)
            self.probs = torch.softmax(a, dim=1)
            self._scale = 1.0 / X.shape[0] if reduction == "mean" else 1.0
            # gradient w.r.t. each layer's output a_l, then e_l = s' * g_l
            self._grads_out, self._deltas = [None] * len(self._weights), [None] * len(self._weights)
            if self._exact:
                g = (self.probs - F.one_hot(y, spec.num_classes).to(dtype)) * self._scale
                for l in reversed(range(len(self._weights))):
                    self._grads_out[l] = g
                    e = g if self._firsts[l] is None else self._firsts[l] * g
                    self._deltas[l] = e
                    g = e @ self._weights[l]

    def _split(self, V: torch.Tensor):
        """(P, k) -> per layer (V_l as (k, out, in), c_l as (k, out) or None)."""
        rows, position = V.t(), 0  # the layout is weight, bias (if any), per layer
        layers = []
        for b in self._biases:
            Vl = self.layout.rows(rows, position)
            cl = None if b is None else self.layout.rows(rows, position + 1)
            position += 1 if b is None else 2
            layers.append((Vl, cl))
        return layers

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        B = self._inputs[0].shape[0]
        dirs = self._split(V)
        tangent_in, pre = [], []
        Ra = None
        for l, (W, (Vl, cl)) in enumerate(zip(self._weights, dirs)):
            a = self._inputs[l]
            Rz = (a @ Vl.reshape(-1, W.shape[1]).t()).view(B, k, W.shape[0])
            if Ra is not None:
                Rz = Rz + Ra @ W.t()
            if cl is not None:
                Rz = Rz + cl
            tangent_in.append(Ra)
            pre.append(Rz)
            Ra = Rz if self._firsts[l] is None else Rz * self._firsts[l].unsqueeze(1)
        p = self.probs.unsqueeze(1)
        delta = (p * Ra - p * (p * Ra).sum(-1, keepdim=True)) * self._scale
        grads = []
        for l in reversed(range(len(self._weights))):
            W, (Vl, cl) = self._weights[l], dirs[l]
            if self._firsts[l] is not None:
                delta = delta * self._firsts[l].unsqueeze(1)
            if self._exact and self._seconds[l] is not None:
                delta = delta + (self._seconds[l] * self._grads_out[l]).unsqueeze(1) * pre[l]
            gW = torch.einsum("nko,ni->koi", delta, self._inputs[l])
            if self._exact and tangent_in[l] is not None:
                gW = gW + torch.einsum("no,nki->koi", self._deltas[l], tangent_in[l])
            part = [gW.reshape(k, -1).t()]
            if cl is not None:
                part.append(delta.sum(0).t())
            grads.append(torch.cat(part))
            if l > 0:
                nxt = delta @ W
                if self._exact:
                    nxt = nxt + torch.einsum("no,koi->nki", self._deltas[l], Vl)
                delta = nxt
        out = torch.cat(grads[::-1])
        return out + self.weight_decay * V if self.weight_decay else out


class GenericGGN(_GenericMLPCurvature):
    """GGN (+ mu I) by plain ATen calls with the forward cached; arguments as pyflat.GGN."""

    _exact = False


class GenericHessian(_GenericMLPCurvature):
    """Exact Hessian (+ mu I) by plain ATen calls with the forward cached."""

    _exact = True
