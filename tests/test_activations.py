"""The one activation registry (pyflat/activations.py) against the one C++ list
(PYFLAT_FOR_EACH_ACTIVATION), and every reader against the module or function it reads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyflat
from pyflat import activations, ops


def test_the_python_registry_is_the_cpp_list():
    assert tuple(activations.KERNELS.items()) == pyflat._C.activations
    assert ops.ACTIVATIONS == tuple(name for name, _ in pyflat._C.activations)
    assert ops.CURVED_ACTIVATIONS == tuple(name for name, curved in pyflat._C.activations
                                           if curved)


def test_every_kernel_activation_is_reachable_and_every_reader_names_a_kernel_one():
    read = {reader(module_type())[0] for module_type, reader in
            activations.MODULE_READERS.items()}
    read |= {"gelu_tanh"}  # nn.GELU(approximate="tanh"), read below
    read |= {reader((), {})[0] for reader in activations.FUNCTION_READERS.values()}
    read |= set(activations.METHOD_NAMES.values())
    assert read <= set(activations.KERNELS)
    assert set(activations.KERNELS) - read == {"identity"}  # nn.Identity passes through


MODULES = [nn.ReLU(), nn.LeakyReLU(0.3), nn.Tanh(), nn.Sigmoid(), nn.GELU(),
           nn.GELU(approximate="tanh"), nn.Softplus(beta=2.0, threshold=5.0), nn.ELU(0.7),
           nn.SiLU()]


def test_the_module_list_covers_every_reader():
    assert {type(m) for m in MODULES} == set(activations.MODULE_READERS)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: repr(m))
def test_each_module_reading_computes_the_modules_function(module):
    """value, s' and s'' of the kernels at the reading equal the module's own, by autograd
    in float64 away from kinks; the curvature flag says whether s'' is ever non-zero."""
    name, p0, p1 = activations.MODULE_READERS[type(module)](module)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, dtype=torch.float64, generator=gen) * 4
    z = z[z.abs() > 1e-3]  # away from the kinks at 0
    value, first, second = ops.activation_forward(z.view(-1, 1), name, p0, p1,
                                                  with_second=True)
    zz = z.clone().requires_grad_(True)
    out = module(zz)
    (d1,) = torch.autograd.grad(out.sum(), zz, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), zz)[0] if d1.requires_grad else torch.zeros_like(z)
    torch.testing.assert_close(value.view(-1), out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.view(-1), d1.detach(), rtol=1e-10, atol=1e-12)
    if activations.KERNELS[name]:
        torch.testing.assert_close(second.view(-1), d2, rtol=1e-8, atol=1e-10)
    assert bool((d2 != 0).any()) == activations.KERNELS[name]


@pytest.mark.parametrize("function, kwargs, module", [
    (F.relu, {}, nn.ReLU()), (torch.relu, {}, nn.ReLU()), (torch.tanh, {}, nn.Tanh()),
    (torch.sigmoid, {}, nn.Sigmoid()), (F.silu, {}, nn.SiLU()), (F.gelu, {}, nn.GELU()),
    (F.gelu, {"approximate": "tanh"}, nn.GELU(approximate="tanh")),
], ids=lambda v: getattr(v, "__name__", repr(v)))
def test_each_function_reading_is_the_modules(function, kwargs, module):
    assert activations.FUNCTION_READERS[function]((), kwargs) == \
        activations.MODULE_READERS[type(module)](module)


def test_the_function_list_covers_every_reader():
    assert {F.relu, torch.relu, torch.tanh, torch.sigmoid, F.silu, F.gelu} == \
        set(activations.FUNCTION_READERS)
