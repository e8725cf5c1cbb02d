"""The one trainer: full-batch Adam on cross-entropy plus mu/2 |theta|^2, and accuracy.

The L2 term is written into the loss (not Adam's ``weight_decay``), so the trained model
sits near a minimum of exactly the objective whose curvature the demo measures:
CE + mu/2 |theta|^2, whose Hessian is the cross-entropy's plus mu I.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["accuracy", "train"]


def _batch(data, name: str = "data"):
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        got = type(data).__name__
        if isinstance(data, (tuple, list)):
            got += f" of {len(data)} ({', '.join(type(t).__name__ for t in data[:4])})"
        raise TypeError(f"{name} must be one batch (X, y) of tensors, got a {got}")
    return data


def _number(value, name: str, inclusive: bool) -> None:
    """value must be a finite real number >= 0 (> 0 unless inclusive)."""
    bound = ">= 0" if inclusive else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number {bound}, got "
                        f"{type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not inclusive):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def train(model: nn.Module, data, *, steps: int, lr: float,
          weight_decay: float = 0.0) -> nn.Module:
    """Trains ``model`` in place from its current weights by full-batch Adam on
    ``cross_entropy(model(X), y) + weight_decay / 2 * |theta|^2`` and returns it in eval
    mode, ready to be measured.

    Deterministic: the model's initialisation (seed it when building it) and the data
    decide the result; the same model and data give the same weights bit for bit.
    ``weight_decay`` 0 leaves the term out of the loss altogether.

    Args:
        model: any module whose output on X is (N, C) logits; trained in train mode.
        data: one batch (X, y), all the training data.
        steps: Adam steps (0: the model is returned as it came, in eval mode).
        lr: Adam's learning rate, > 0.
        weight_decay: mu >= 0 of the L2 term mu/2 |theta|^2.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    X, y = _batch(data)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an integer >= 0, got {type(steps).__name__} {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    _number(lr, "lr", inclusive=False)
    _number(weight_decay, "weight_decay", inclusive=True)
    params = list(model.parameters())
    model.train()
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, data) -> float:
    """The fraction of the batch (X, y) whose largest logit is at the label."""
    X, y = _batch(data)
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())
