"""The one registry of activations on the Python side.

``KERNELS`` lists what the kernels compute, by the names the ops take, with whether each
has a second derivative (and so a term in the exact Hessian); it must equal the C++ list
(``PYFLAT_FOR_EACH_ACTIVATION`` in csrc/kernels/activation_math.h), which
``pyflat._C.activations`` exposes and tests/test_activations.py compares. The readers map
what a model writes (a module, a function, a tensor method) to ``(name, param0, param1)``;
both engines take activations from here alone. Parameters: leaky_relu (negative_slope, 0),
softplus (beta, threshold), elu (alpha, 0), the others (0, 0).

Adding an activation: one line in the C++ list and its math in activation_math.h, one
entry in ``KERNELS`` and the readers of the forms a model may write it in.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CURVED", "FUNCTION_READERS", "KERNELS", "METHOD_NAMES", "MODULE_READERS"]

#: name -> whether s'' is non-zero somewhere (a term of the exact Hessian); the C++ order
KERNELS: dict[str, bool] = {
    "identity": False, "relu": False, "leaky_relu": False, "tanh": True, "sigmoid": True,
    "gelu": True, "gelu_tanh": True, "softplus": True, "elu": True, "silu": True,
}
#: the names with a curvature term
CURVED: tuple[str, ...] = tuple(name for name, curved in KERNELS.items() if curved)

Reading = tuple[str, float, float]


def _gelu_name(approximate: str) -> str:
    return "gelu" if approximate == "none" else "gelu_tanh"


#: module type -> (name, param0, param1) read from the module
MODULE_READERS: dict[type, Callable[[nn.Module], Reading]] = {
    nn.ReLU: lambda m: ("relu", 0.0, 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope), 0.0),
    nn.Tanh: lambda m: ("tanh", 0.0, 0.0),
    nn.Sigmoid: lambda m: ("sigmoid", 0.0, 0.0),
    nn.GELU: lambda m: (_gelu_name(m.approximate), 0.0, 0.0),
    nn.Softplus: lambda m: ("softplus", float(m.beta), float(m.threshold)),
    nn.ELU: lambda m: ("elu", float(m.alpha), 0.0),
    nn.SiLU: lambda m: ("silu", 0.0, 0.0),
}

#: function (as torch.fx records it) -> reader of (args after the input, kwargs)
FUNCTION_READERS: dict[Callable, Callable[[tuple, dict[str, Any]], Reading]] = {
    F.relu: lambda args, kwargs: ("relu", 0.0, 0.0),
    torch.relu: lambda args, kwargs: ("relu", 0.0, 0.0),
    torch.tanh: lambda args, kwargs: ("tanh", 0.0, 0.0),
    torch.sigmoid: lambda args, kwargs: ("sigmoid", 0.0, 0.0),
    F.silu: lambda args, kwargs: ("silu", 0.0, 0.0),
    F.gelu: lambda args, kwargs: (_gelu_name(kwargs.get("approximate", "none")), 0.0, 0.0),
}

#: tensor method (x.relu()) -> name
METHOD_NAMES: dict[str, str] = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
