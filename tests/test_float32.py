"""float32 products, judged against float32 autograd's own error w.r.t. float64.

For each case both pyflat and torch.func run in float32 and are compared with the float64
reference; pyflat may not be worse than a small multiple of autograd's error.
"""
import pytest
import torch

import pyflat
from pyflat import reference

from helpers import (
    assert_within_float32_autograd,
    make_batch,
    make_mlp,
    num_params,
    random_block,
    relative_error,
)

PRODUCTS = {"ggn": (pyflat.GGN, reference.ggn_matmat),
            "hessian": (pyflat.Hessian, reference.hessian_matmat)}


def errors(model64, data64, product, k=4, weight_decay=0.0):
    operator, ref_fn = PRODUCTS[product]
    model32 = _to32(model64)
    data32 = (data64[0].float(), data64[1])
    V64 = random_block(num_params(model64), k)
    exact = ref_fn(model64, data64, V64, weight_decay=weight_decay)
    ours = operator(model32, data32, weight_decay=weight_decay) @ V64.float()
    autograd32 = ref_fn(model32, data32, V64.float(), weight_decay=weight_decay)
    return relative_error(ours.double(), exact), relative_error(autograd32.double(), exact)


def _to32(model):
    import copy
    return copy.deepcopy(model).float()


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus", "silu", "sigmoid"])
def test_float32_within_autograd_error(product, activation):
    model = make_mlp([20, 64, 48, 10], activation, seed=11)
    ours, autograd = errors(model, make_batch(128, 20, 10), product)
    assert_within_float32_autograd(ours, autograd)


@pytest.mark.parametrize("product", PRODUCTS)
def test_float32_confident_model_keeps_its_digits(product):
    """A model that fits its batch with margin: softmax probabilities near 1, loss-Hessian
    terms of size 1 - p_y. The shifted form keeps float32 accuracy where the textbook
    p*u - p (p.u) loses digits; pyflat must be at least as accurate as autograd here."""
    model = make_mlp([10, 32, 5], "tanh", seed=12)
    X, _ = make_batch(64, 10, 5, seed=13)
    with torch.no_grad():
        model[-1].weight.mul_(40.0)
        model[-1].bias.zero_()
        p = torch.softmax(model(X), 1)
    keep = (1 - p.max(1).values) < 1e-4  # confident samples: the regime the paper studies
    X, y = X[keep], p[keep].argmax(1)
    assert len(y) >= 16
    ours, autograd = errors(model, (X, y), product)
    eps = torch.finfo(torch.float32).eps
    assert ours <= 2 * max(autograd, 8 * eps), (ours, autograd)
    assert ours < 1e-5, ours  # float32 autograd loses ~3 digits here (~1e-3)


@pytest.mark.parametrize("name, module", [("tanh", torch.nn.Tanh()),
                                          ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
def test_float32_activation_derivatives_keep_their_digits_near_saturation(name, module):
    # 1 - t*t in float32 keeps eps / (1 - t^2) of its digits (1e-4 relative at |u| = 4), and
    # 1 + t as little near t = -1; the engines use sigma(2u) and 4 sigma'(2u) instead
    from pyflat import ops
    z64 = torch.linspace(2.0, 5.0, 301, dtype=torch.float64)
    z64 = torch.cat([-z64, z64]).float().double()  # points float32 holds exactly
    z = z64.clone().requires_grad_(True)
    first, = torch.autograd.grad(module(z).sum(), z, create_graph=True)
    second, = torch.autograd.grad(first.sum(), z)
    _, ours_first, ours_second = ops.activation_forward(z64.float()[:, None], name, 0.0, 0.0,
                                                        True)
    # each derivative against the size of its terms: s'' of GELU crosses zero here
    if name == "tanh":
        u, du, z_scale = z64, torch.ones_like(z64), torch.zeros_like(z64)
    else:
        u = 0.7978845608028654 * (z64 + 0.044715 * z64 ** 3)
        du, z_scale = 0.7978845608028654 * (1 + 3 * 0.044715 * z64 ** 2), z64.abs()
    sech2 = 1 / torch.cosh(u) ** 2
    scales = (first.abs() + z_scale * sech2 * du, sech2 * du * (1 + z_scale * du))
    eps = torch.finfo(torch.float32).eps
    for ours, exact, scale in zip((ours_first[:, 0], ours_second[:, 0]), (first, second),
                                  scales):
        error = ((ours.double() - exact).abs() / scale).max().item()
        assert error <= 32 * eps, (name, error / eps)
