"""pytest-benchmark suite: pyflat against autograd, one product at a time.

    pytest bench/ --benchmark-only                       # timings, grouped per model and product
    pytest bench/ --benchmark-only --benchmark-json=out.json

Each case checks its result against the float64 reference before it is timed; groups
put pyflat beside torch.func and double backward (the graph rebuilt per product, and
kept across products) on the same model and product. Models:
logistic regression and a 64-256-256-10 MLP on a batch of 1,024 digits, and the digits
CNN on 1x8x8 images (float32, 2 threads).
"""
from __future__ import annotations

import copy

import pytest
import torch

import pyflat
from pyflat import reference
from pyflat.applications.digits import load_digits
from pyflat.applications.models import digits_cnn, mlp

MODELS = {
    "logreg": lambda: (mlp([64, 10]), load_digits(1024, dtype=torch.float32)),
    "mlp256": lambda: (mlp([64, 256, 256, 10]), load_digits(1024, dtype=torch.float32)),
    "cnn": lambda: (digits_cnn().eval(), load_digits(1024, dtype=torch.float32, images=True)),
}
METHODS = {
    # (product, method): builds fn(v) from (model, data)
    ("ggn", "pyflat"): lambda m, d: pyflat.GGN(m, d, backend="fused").matvec,
    ("ggn", "torch.func"): lambda m, d: reference.functions(m, d).ggn_vp,
    ("hessian", "pyflat"): lambda m, d: pyflat.Hessian(m, d, backend="fused").matvec,
    ("hessian", "torch.func"): lambda m, d: reference.functions(m, d).hvp,
    ("hessian", "double backward"): lambda m, d: reference.functions(
        m, d).hvp_double_backward_rebuilt,
    # the gradient's graph built once and kept across products, as PyHessian runs them
    ("hessian", "double backward, graph kept"): lambda m, d: reference.functions(
        m, d).hvp_double_backward,
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(name):
        if name not in built:
            model, data = MODELS[name]()
            model64 = copy.deepcopy(model).double()
            data64 = (data[0].double(), data[1])
            P = sum(p.numel() for p in model.parameters())
            v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            expected = {"ggn": reference.ggn_matmat(model64, data64, v[:, None])[:, 0],
                        "hessian": reference.hessian_matmat(model64, data64, v[:, None])[:, 0]}
            built[name] = (model, data, v, expected)
        return built[name]

    return get


@pytest.mark.parametrize("product, method", list(METHODS),
                         ids=[f"{p}-{m.replace(' ', '_')}" for p, m in METHODS])
@pytest.mark.parametrize("name", list(MODELS))
def test_single_product(benchmark, cases, name, product, method):
    model, data, v, expected = cases(name)
    fn = METHODS[(product, method)](model, data)
    x = v.float()
    result = fn(x).double()
    error = float((result - expected[product]).abs().max() / expected[product].abs().max())
    assert error < 1e-3, f"{method} is off the float64 reference by {error:.1e}"
    benchmark.group = f"{name} {product}"
    benchmark.extra_info.update(rel_error=error, params=len(v))
    benchmark(fn, x)
