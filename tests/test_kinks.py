"""Activations at their kinks: the engine's s, s', s'' must be autograd's, there and in the
products of models whose pre-activations sit exactly on a kink.

At a kink the one-sided derivatives differ and autograd picks one by its own branch
conditions (ELU: s' from the z <= 0 branch but s'' from z < 0; Softplus: s' from the log
branch at beta z == threshold but s'' only for beta z < threshold). Pre-activations land
there exactly when a Linear or Conv layer has zero weights and a bias on the kink.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad, jvp

import pyflat
from pyflat import ops, reference

from helpers import make_batch, num_params, random_block, relative_error

TOL = 1e-10  # float64 products against torch.func / double backward

# name -> (module constructor, engine name, param0, param1, the kink z)
# Softplus kinks are threshold / beta, exactly representable in float32 and float64.
KINKS = {
    "relu": (nn.ReLU, "relu", 0.0, 0.0, 0.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2, 0.0, 0.0),
    "leaky_relu_negative_slope": (lambda: nn.LeakyReLU(-0.3), "leaky_relu", -0.3, 0.0, 0.0),
    "elu": (nn.ELU, "elu", 1.0, 0.0, 0.0),
    "elu_alpha_0.7": (lambda: nn.ELU(alpha=0.7), "elu", 0.7, 0.0, 0.0),
    "elu_alpha_2.5": (lambda: nn.ELU(alpha=2.5), "elu", 2.5, 0.0, 0.0),
    "softplus": (nn.Softplus, "softplus", 1.0, 20.0, 20.0),
    "softplus_beta_2_threshold_1": (lambda: nn.Softplus(2.0, 1.0), "softplus", 2.0, 1.0, 0.5),
    "softplus_beta_0.5_threshold_3": (lambda: nn.Softplus(0.5, 3.0), "softplus", 0.5, 3.0,
                                      6.0),
    "softplus_beta_1.5_threshold_3": (lambda: nn.Softplus(1.5, 3.0), "softplus", 1.5, 3.0,
                                      2.0),
    "softplus_threshold_0": (lambda: nn.Softplus(1.0, 0.0), "softplus", 1.0, 0.0, 0.0),
    # smooth at 0, included so every activation is checked where the others have kinks
    "tanh": (nn.Tanh, "tanh", 0.0, 0.0, 0.0),
    "sigmoid": (nn.Sigmoid, "sigmoid", 0.0, 0.0, 0.0),
    "gelu": (nn.GELU, "gelu", 0.0, 0.0, 0.0),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh", 0.0, 0.0, 0.0),
    "silu": (nn.SiLU, "silu", 0.0, 0.0, 0.0),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def points_around(kink: float, dtype: torch.dtype) -> torch.Tensor:
    """The kink (and -0.0 at 0), its floating-point neighbours, and ordinary points
    nearby on both sides."""
    k = torch.tensor(kink, dtype=dtype)
    up = torch.nextafter(k, torch.tensor(math.inf, dtype=dtype))
    down = torch.nextafter(k, torch.tensor(-math.inf, dtype=dtype))
    near = torch.tensor([kink - 0.3, kink - 1e-3, kink + 1e-3, kink + 0.3], dtype=dtype)
    extra = [torch.tensor(-0.0, dtype=dtype)] if kink == 0.0 else []
    return torch.stack([k, up, down, *extra, *near])


def autograd_derivatives(module: nn.Module, z: torch.Tensor):
    """(s, s', s'' by double backward, s'' by forward-over-reverse) of an elementwise
    module, elementwise."""
    leaf = z.clone().requires_grad_(True)
    value = module(leaf)
    first, = torch.autograd.grad(value.sum(), leaf, create_graph=True)
    second, = torch.autograd.grad(first.sum(), leaf)
    first_fn = grad(lambda t: module(t).sum())
    _, second_fwd = jvp(first_fn, (z,), (torch.ones_like(z),))
    return value.detach(), first.detach(), second, second_fwd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KINKS)
def test_activation_op_matches_autograd_at_kink(name, dtype):
    make, engine_name, p0, p1, kink = KINKS[name]
    dtype = DTYPES[dtype]
    z = points_around(kink, dtype)
    value, first, second, second_fwd = autograd_derivatives(make(), z)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    # the two autograd modes agree at every kink here (up to rounding elsewhere)
    torch.testing.assert_close(second_fwd, second, **tol)
    ours = ops.activation_forward(z, engine_name, p0, p1, with_second=True)
    for got, want, what in zip(ours, (value, first, second), ("s", "s'", "s''")):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what} of {name}: {m}")


def kink_linear(d_in: int, d_out: int, kink: float, gen: torch.Generator,
                in_scale: float = 1.0) -> nn.Linear:
    """A Linear whose first half of outputs is exactly `kink` for every input (zero weights,
    bias on the kink); the rest ordinary for inputs of magnitude about `in_scale`."""
    lin = nn.Linear(d_in, d_out)
    half = d_out // 2
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) / (d_in ** 0.5 * in_scale))
        lin.bias.copy_(kink + 0.5 * torch.randn(d_out, generator=gen))
        lin.weight[:half] = 0.0
        lin.bias[:half] = kink
    return lin


def head(d_in: int, d_out: int, in_scale: float, gen: torch.Generator) -> nn.Linear:
    """The last Linear, scaled so that hidden values about `in_scale` (Softplus at a
    threshold of 20) give moderate logits: saturated ones would leave a GGN that is all
    cancellation."""
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) / (d_in ** 0.5 * in_scale))
        lin.bias.copy_(0.5 * torch.randn(d_out, generator=gen))
    return lin


def kink_mlp(name: str, seed: int = 0) -> nn.Sequential:
    """Two hidden layers with half their units on the kink: the first sees the input's
    tangents only, the second also those of the layer before."""
    make, _, _, _, kink = KINKS[name]
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 + abs(kink)
    return nn.Sequential(kink_linear(5, 6, kink, gen), make(),
                         kink_linear(6, 7, kink, gen, scale), make(),
                         head(7, 4, scale, gen)).double()


class KinkConvNet(nn.Module):
    """Conv (half the channels on the kink) -> activation -> Linear (half the units on the
    kink) -> activation -> Linear, with a custom forward for the graph engine."""

    def __init__(self, name: str, seed: int = 0):
        super().__init__()
        make, _, _, _, kink = KINKS[name]
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 2, 3, 3, generator=gen) / 18 ** 0.5)
            self.conv.bias.copy_(kink + 0.5 * torch.randn(4, generator=gen))
            self.conv.weight[:2] = 0.0
            self.conv.bias[:2] = kink
        self.act1 = make()
        scale = 1.0 + abs(kink)
        self.fc = kink_linear(4 * 3 * 3, 6, kink, gen, scale)
        self.act2 = make()
        self.head = head(6, 3, scale, gen)

    def forward(self, x):
        x = self.act1(self.conv(x))
        x = self.act2(self.fc(x.flatten(1)))
        return self.head(x)


def check_products(model: nn.Module, data, engine: str):
    V = random_block(num_params(model), 3)
    ggn = pyflat.GGN(model, data)
    hessian = pyflat.Hessian(model, data)
    assert (ggn.engine, hessian.engine) == (engine, engine)
    assert relative_error(ggn @ V, reference.ggn_matmat(model, data, V)) < TOL
    HV = hessian @ V
    assert relative_error(HV, reference.hessian_matmat(model, data, V)) < TOL
    assert relative_error(HV, reference.hessian_matmat_double_backward(model, data, V)) < TOL


@pytest.mark.parametrize("name", KINKS)
def test_mlp_engine_products_with_units_on_kink(name):
    model = kink_mlp(name)
    check_products(model, make_batch(9, 5, 4), "mlp")


@pytest.mark.parametrize("name", KINKS)
def test_graph_engine_products_with_units_on_kink(name):
    model = KinkConvNet(name).double().eval()
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(7, 2, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    check_products(model, (X, y), "graph")
