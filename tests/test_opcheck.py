"""torch.library.opcheck on every op: schema, fake (meta) implementation, dispatch."""
import pytest
import torch

import pyflat
from pyflat import ops

from conftest import make_batch, make_mlp


def network(model):
    spec = pyflat._model.parse_mlp(model, "test")
    return spec.weights, spec.biases, spec.activations, spec.activation_params


CASES = {
    "tanh-f64": (lambda: make_mlp([5, 7, 4], "tanh"), torch.float64),
    "relu-nobias-f32": (lambda: make_mlp([5, 7, 6, 3], "relu", dtype=torch.float32, bias=False),
                        torch.float32),
    "linear-f32": (lambda: torch.nn.Sequential(torch.nn.Linear(5, 3)), torch.float32),
    "softplus-gelu-f64": (lambda: torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Softplus(), torch.nn.Linear(6, 4), torch.nn.GELU(),
        torch.nn.Linear(4, 3)).double(), torch.float64),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_hessian_terms", [False, True])
def test_opcheck_forward(case, with_hessian_terms):
    build, dtype = CASES[case]
    weights, biases, acts, params = network(build())
    X, y = make_batch(6, 5, 3, dtype=dtype)
    torch.library.opcheck(torch.ops.pyflat.mlp_forward.default,
                          (X, y, weights, biases, acts, params, "mean", with_hessian_terms))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opcheck_products(case, reduction):
    build, dtype = CASES[case]
    model = build()
    weights, biases, acts, params = network(model)
    X, y = make_batch(6, 5, 3, dtype=dtype)
    prepared = ops.mlp_forward(X, y, weights, biases, acts, params, reduction, True)
    P = sum(p.numel() for p in model.parameters())
    directions = torch.randn(3, P, dtype=dtype)
    torch.library.opcheck(torch.ops.pyflat.mlp_ggn_matmat.default,
                          (X, weights, biases, acts, prepared.probs, prepared.hidden,
                           prepared.first_derivs, directions, reduction))
    torch.library.opcheck(torch.ops.pyflat.mlp_hessian_matmat.default,
                          (X, weights, biases, acts, prepared.probs, prepared.hidden,
                           prepared.first_derivs, prepared.deltas, prepared.curvatures,
                           directions, reduction))


def test_fake_shapes_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = CASES["softplus-gelu-f64"][0]()
    weights, biases, acts, params = network(model)
    X, y = make_batch(6, 5, 3)
    real = ops.mlp_forward(X, y, weights, biases, acts, params, "mean", True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.mlp_forward(mode.from_tensor(X), mode.from_tensor(y),
                               [mode.from_tensor(w) for w in weights],
                               [None if b is None else mode.from_tensor(b) for b in biases],
                               acts, params, "mean", True)
    for r, f in zip(real, fake):
        if isinstance(r, list):
            assert [t.shape for t in r] == [t.shape for t in f]
        else:
            assert r.shape == f.shape and r.dtype == f.dtype
