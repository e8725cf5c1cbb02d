"""Functional ops of the engine: tensors in, tensors out.

Typed wrappers over ``torch.ops.pyflat.*`` (schemas in csrc/registration.cpp) with fake
implementations, so the ops work under torch.compile / FakeTensor and pass
``torch.library.opcheck``. Most users want the operators in :mod:`pyflat.curvature`.

Layout conventions:

* A network is L linear layers: ``weights[l]`` is (out_l, in_l), ``biases[l]`` is (out_l,)
  or None, ``activations[l]`` names the elementwise function applied after layer l
  (``"identity"`` for none; the last layer's output are the logits).
* A block of k directions is a (k, P) tensor: each row is one direction with the
  parameters flattened layer by layer, weight (row-major) then bias.
* The per-layer ops (``activation_*``, ``softmax_*``), which the graph engine for convnets
  and residual networks calls, take primal tensors as (B, features...) and tangents or
  deltas of k directions as (B, k, features...).
* Tensors are float32 or float64, all of one call in the dtype and on the device of its
  first tensor; targets are int64 class indices.

The math: each layer maps its input a to z = a W^T + b and then s(z) (the first layer's
input is ``input``, the last layer's output the (B, C) logits f). The GGN product
G v = J^T H_loss J v (Schraudolph 2002; Martens 2010) runs Pearlmutter's R-forward
(Pearlmutter 1994) for the tangent J v, the cross-entropy Hessian H_loss = diag(p) - p p^T
per sample (over B for ``"mean"``), and the backward for J^T. The exact Hessian adds the
network's second-order terms, read from the gradient deltas e = dloss/dz of the prepared
batch: s''(z) * dloss/ds times the tangent of z, and the cross terms of a weight's
direction with the tangent of the layer's input.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import activations

__all__ = [
    "ACTIVATIONS",
    "CURVED_ACTIVATIONS",
    "PreparedBatch",
    "mlp_forward",
    "mlp_ggn_matmat",
    "mlp_hessian_matmat",
    "activation_forward",
    "activation_tangent",
    "activation_delta_",
    "softmax_cross_entropy",
    "softmax_hessian",
    "transpose",
]

#: Activation names the kernels know (pyflat.activations, the one registry);
#: ``activation_params`` holds two numbers per layer: leaky_relu (negative_slope, 0),
#: softplus (beta, threshold), elu (alpha, 0), else (0, 0).
ACTIVATIONS = tuple(activations.KERNELS)
#: Activations with a non-zero second derivative (they add a term to the exact Hessian).
CURVED_ACTIVATIONS = activations.CURVED


class PreparedBatch(NamedTuple):
    """What :func:`mlp_forward` prepares for the products of one batch.

    Attributes:
        loss: scalar cross-entropy (mean or sum, as asked).
        probs: (B, C) softmax probabilities.
        hidden: activations a_1..a_{L-1}, each (B, out_l).
        first_derivs: s'(z_l) of every layer whose activation is not the identity.
        deltas: gradient deltas e_2..e_L (w.r.t. z_l), only with Hessian terms.
        curvatures: s''(z_l) * dloss/da_l of every layer with a curved activation,
            only with Hessian terms.
    """

    loss: torch.Tensor
    probs: torch.Tensor
    hidden: list[torch.Tensor]
    first_derivs: list[torch.Tensor]
    deltas: list[torch.Tensor]
    curvatures: list[torch.Tensor]


def mlp_forward(input: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Sequence[torch.Tensor | None], activations: Sequence[str],
                activation_params: Sequence[float], reduction: str = "mean",
                with_hessian_terms: bool = True) -> PreparedBatch:
    """Runs the forward pass (and, for exact Hessians, the backward) once for a batch.

    Args:
        input: (B, d_0) float32 or float64 features.
        target: (B,) int64 class indices in [0, C).
        weights, biases, activations, activation_params: the network (module docstring).
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        with_hessian_terms: also prepare the gradient terms the exact Hessian needs.

    Returns:
        A :class:`PreparedBatch` in the input's dtype and on its device.
    """
    out = torch.ops.pyflat.mlp_forward.default(
        input, target, list(weights), list(biases), list(activations),
        [float(x) for x in activation_params], reduction, with_hessian_terms)
    return PreparedBatch(*out)


def mlp_ggn_matmat(input: torch.Tensor, weights: Sequence[torch.Tensor],
                   biases: Sequence[torch.Tensor | None], activations: Sequence[str],
                   prepared: PreparedBatch, directions: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """GGN products G V = J^T H_loss J V for a (k, P) block of directions; returns (k, P).

    J is the (B*C, P) Jacobian of the logits, H_loss the block-diagonal cross-entropy
    Hessian diag(p_b) - p_b p_b^T (divided by B for ``"mean"``). Each row of
    ``directions`` is one direction in the layout of the module docstring, in the input's
    dtype and on its device; ``prepared`` comes from :func:`mlp_forward` on the same
    network and input (any ``with_hessian_terms``).
    """
    return torch.ops.pyflat.mlp_ggn_matmat.default(
        input, list(weights), list(biases), list(activations), prepared.probs,
        prepared.hidden, prepared.first_derivs, directions, reduction)


def mlp_hessian_matmat(input: torch.Tensor, weights: Sequence[torch.Tensor],
                       biases: Sequence[torch.Tensor | None], activations: Sequence[str],
                       prepared: PreparedBatch, directions: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Exact Hessian products H V for a (k, P) block of directions; returns (k, P).

    H = J^T H_loss J + sum_{b,c} (dloss/df_{bc}) d^2 f_{bc} / dtheta^2: the GGN product of
    :func:`mlp_ggn_matmat` plus the network's own curvature weighted by the loss
    gradient. ``prepared`` must come from :func:`mlp_forward` with
    ``with_hessian_terms=True``; directions as :func:`mlp_ggn_matmat`.
    """
    return torch.ops.pyflat.mlp_hessian_matmat.default(
        input, list(weights), list(biases), list(activations), prepared.probs,
        prepared.hidden, prepared.first_derivs, prepared.deltas, prepared.curvatures,
        directions, reduction)


def activation_forward(z: torch.Tensor, activation: str, param0: float = 0.0,
                       param1: float = 0.0, with_second: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(s(z), s'(z), s''(z) or None) of an activation named as in :data:`ACTIVATIONS`.

    ``z`` is (B, features...); each result has its shape and dtype. ``param0``,
    ``param1`` are the activation's two parameters (see :data:`ACTIVATIONS`); s'' is
    computed only ``with_second``.
    """
    value, first, second = torch.ops.pyflat.activation_forward.default(
        z, activation, float(param0), float(param1), with_second)
    return value, first, second if with_second else None


def activation_tangent(first: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """s' * tangent: first (B, f...), tangent (B, k, f...) -> (B, k, f...)."""
    return torch.ops.pyflat.activation_tangent.default(first, tangent)


def activation_delta_(delta: torch.Tensor, first: torch.Tensor | None,
                      curvature: torch.Tensor | None = None,
                      tangent_in: torch.Tensor | None = None) -> torch.Tensor:
    """In place on a contiguous delta (B, k, f...): delta = s' * delta + curvature *
    tangent_in (the second term for exact Hessians, curvature = s'' * dloss/ds).

    ``first`` and ``curvature`` are (B, f...) and broadcast over the k directions;
    ``first`` None means s' = 1 (the identity); ``tangent_in`` (B, k, f...) is the
    tangent of z and is required with ``curvature``. Returns ``delta``.
    """
    torch.ops.pyflat.activation_delta_.default(delta, first, curvature, tangent_in)
    return delta


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, probs, dloss/dlogits) of the cross-entropy; logits (B, C), target (B,).

    loss is a 0-dim tensor, (1/B) sum_b -log p_{b,y_b} for ``"mean"`` (the sum for
    ``"sum"``); probs = softmax(logits) and dloss/dlogits = p - onehot(y) (over B for
    ``"mean"``) are (B, C). Computed per row in float64 without forming 1 - p_y, so
    they keep their digits when the model is confident. ``target`` is int64 in [0, C).
    """
    return torch.ops.pyflat.softmax_cross_entropy.default(logits, target, reduction)


def softmax_hessian(probs: torch.Tensor, tangent: torch.Tensor, reduction: str = "mean"
                    ) -> torch.Tensor:
    """The cross-entropy's Hessian w.r.t. the logits on k tangents: (B, k, C) -> (B, k, C).

    Per sample b and direction j: (diag(p_b) - p_b p_b^T) u = p_b * (u - p_b . u), divided
    by B for ``"mean"``, with ``probs`` (B, C) from :func:`softmax_cross_entropy`. It is
    evaluated as p_b * (w - p_b . w) with w = u - u_m (m the most probable class), which
    is equal and avoids the cancellation of terms near p_m ~ 1.
    """
    return torch.ops.pyflat.softmax_hessian.default(probs, tangent, reduction)


def _num_params(weights, biases):
    total = 0
    for w, b in zip(weights, biases):
        total = total + w.shape[0] * w.shape[1]
        if b is not None:
            total = total + b.shape[0]
    return total


@torch.library.register_fake("pyflat::mlp_forward")
def _mlp_forward_fake(input, target, weights, biases, activations, activation_params,
                      reduction, with_hessian_terms):
    batch = input.shape[0]
    layers = len(weights)
    widths = [w.shape[0] for w in weights]
    loss = input.new_empty(())
    probs = input.new_empty((batch, widths[-1]))
    hidden = [input.new_empty((batch, widths[l])) for l in range(layers - 1)]
    firsts = [input.new_empty((batch, widths[l])) for l in range(layers)
              if activations[l] != "identity"]
    deltas, curvatures = [], []
    if with_hessian_terms:
        deltas = [input.new_empty((batch, widths[l])) for l in range(1, layers)]
        curvatures = [input.new_empty((batch, widths[l])) for l in range(layers)
                      if activations[l] in CURVED_ACTIVATIONS]
    return loss, probs, hidden, firsts, deltas, curvatures


@torch.library.register_fake("pyflat::mlp_ggn_matmat")
def _mlp_ggn_matmat_fake(input, weights, biases, activations, probs, hidden, first_derivs,
                         directions, reduction):
    return directions.new_empty((directions.shape[0], _num_params(weights, biases)))


@torch.library.register_fake("pyflat::mlp_hessian_matmat")
def _mlp_hessian_matmat_fake(input, weights, biases, activations, probs, hidden,
                             first_derivs, deltas, curvatures, directions, reduction):
    return directions.new_empty((directions.shape[0], _num_params(weights, biases)))


@torch.library.register_fake("pyflat::activation_forward")
def _activation_forward_fake(z, activation, param0, param1, with_second):
    second = torch.empty_like(z) if with_second else z.new_empty((0,))
    return torch.empty_like(z), torch.empty_like(z), second


@torch.library.register_fake("pyflat::activation_tangent")
def _activation_tangent_fake(first, tangent):
    return torch.empty_like(tangent, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyflat::activation_delta_")
def _activation_delta_fake(delta, first, curvature, tangent_in):
    return None


@torch.library.register_fake("pyflat::softmax_cross_entropy")
def _softmax_cross_entropy_fake(logits, target, reduction):
    return (logits.new_empty(()), torch.empty_like(logits, memory_format=torch.contiguous_format),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


def transpose(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.t()`` as a new row-major tensor, (m, n) -> (n, m): how the operators move
    blocks of directions between their (P, k) layout and the products' (k, P) one (on CPU
    a tiled loop, several times faster than a strided copy for such skinny matrices)."""
    return torch.ops.pyflat.transpose.default(matrix)


@torch.library.register_fake("pyflat::softmax_hessian")
def _softmax_hessian_fake(probs, tangent, reduction):
    return torch.empty_like(tangent, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyflat::transpose")
def _transpose_fake(matrix):
    return matrix.new_empty((matrix.shape[1], matrix.shape[0]))
