"""torch.library.opcheck on every op: schema, fake (meta) implementation, dispatch."""
import pytest
import torch

import pyflat
from pyflat import ops

from helpers import make_batch, make_mlp


def network(model):
    spec = pyflat.engines.mlp.parse_mlp(model, "test")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_layer_ops(dtype):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 5, generator=gen, dtype=dtype)
    for activation in ("relu", "tanh", "gelu", "softplus"):
        param0, param1 = (1.5, 20.0) if activation == "softplus" else (0.0, 0.0)
        for with_second in (False, True):
            torch.library.opcheck(torch.ops.pyflat.activation_forward.default,
                                  (z, activation, param0, param1, with_second))
    _, first, second = ops.activation_forward(z, "tanh", with_second=True)
    tangent = torch.randn(4, 2, 3, 5, generator=gen, dtype=dtype)
    torch.library.opcheck(torch.ops.pyflat.activation_tangent.default, (first, tangent))
    delta = torch.randn(4, 2, 3, 5, generator=gen, dtype=dtype)
    torch.library.opcheck(torch.ops.pyflat.activation_delta_.default,
                          (delta, first, second, tangent))
    torch.library.opcheck(torch.ops.pyflat.activation_delta_.default, (delta, first, None, None))
    logits = torch.randn(6, 4, generator=gen, dtype=dtype)
    target = torch.randint(0, 4, (6,), generator=gen)
    for reduction in ("mean", "sum"):
        torch.library.opcheck(torch.ops.pyflat.softmax_cross_entropy.default,
                              (logits, target, reduction))
        _, probs, _ = ops.softmax_cross_entropy(logits, target, reduction)
        torch.library.opcheck(torch.ops.pyflat.softmax_hessian.default,
                              (probs, torch.randn(6, 3, 4, generator=gen, dtype=dtype), reduction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (70, 3), (33, 65), (16, 1000)])
def test_transpose_matches_aten_and_passes_opcheck(shape, dtype):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    for source in (matrix, matrix.t().contiguous().t(), matrix[:, ::1]):
        out = ops.transpose(source)
        assert out.is_contiguous() and torch.equal(out, matrix.t())
        assert out.data_ptr() != source.data_ptr()  # never a view of its input
    torch.library.opcheck(torch.ops.pyflat.transpose.default, (matrix,))
    torch.library.opcheck(torch.ops.pyflat.transpose.default, (matrix.t().contiguous().t(),))


def test_transpose_refuses_other_shapes_and_dtypes():
    with pytest.raises(RuntimeError, match=r"transpose: matrix must be 2-D, got \[2, 3, 4\]"):
        ops.transpose(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError,
                       match="transpose: matrix must be float32 or float64, got Long"):
        ops.transpose(torch.zeros(2, 3, dtype=torch.long))
