"""Dense matrices of tiny models: structure of the GGN and the Hessian, and agreement
with the dense autograd matrices."""
import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import pyflat
from pyflat import reference

from helpers import ACTIVATION_MODULES, make_batch, make_mlp

CURVED = ["tanh", "sigmoid", "gelu", "gelu_tanh", "softplus", "elu", "silu"]


@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
def test_dense_matrices_match_autograd(activation):
    model = make_mlp([3, 4, 3], activation, seed=5)
    data = make_batch(6, 3, 3)
    G = pyflat.GGN(model, data).to_dense()
    H = pyflat.Hessian(model, data).to_dense()
    torch.testing.assert_close(G, reference.ggn_dense(model, data), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(H, reference.hessian_dense(model, data), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
def test_symmetric_and_ggn_positive_semidefinite(activation):
    model = make_mlp([3, 5, 4, 3], activation, seed=6)
    data = make_batch(7, 3, 3)
    G = pyflat.GGN(model, data).to_dense()
    H = pyflat.Hessian(model, data).to_dense()
    scale = G.abs().max()
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-14 * scale)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-13 * H.abs().max())
    assert torch.linalg.eigvalsh(G).min() >= -1e-13 * scale


def test_hessian_equals_ggn_for_a_single_linear_layer():
    model = torch.nn.Linear(5, 4).double()
    data = make_batch(9, 5, 4)
    G = pyflat.GGN(model, data).to_dense()
    H = pyflat.Hessian(model, data).to_dense()
    torch.testing.assert_close(H, G, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_piecewise_linear_nets_have_equal_trace_but_different_hessian(activation):
    model = make_mlp([4, 6, 5, 3], activation, seed=7)
    data = make_batch(10, 4, 3)
    G = pyflat.GGN(model, data).to_dense()
    H = pyflat.Hessian(model, data).to_dense()
    assert abs(torch.trace(H) - torch.trace(G)) <= 1e-12 * torch.trace(G).abs()
    assert (H - G).abs().max() > 1e-3 * G.abs().max()


@pytest.mark.parametrize("activation", CURVED)
def test_weight_decay_shifts_the_spectrum(activation):
    model = make_mlp([3, 4, 3], activation, seed=8)
    data = make_batch(6, 3, 3)
    plain = torch.linalg.eigvalsh(pyflat.Hessian(model, data).to_dense())
    shifted = torch.linalg.eigvalsh(pyflat.Hessian(model, data, weight_decay=0.3).to_dense())
    torch.testing.assert_close(shifted, plain + 0.3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("operator", [pyflat.GGN, pyflat.Hessian])
def test_scipy_eigsh_on_to_scipy_agrees_with_eigvalsh(operator):
    model = make_mlp([6, 10, 4], "tanh", seed=9)
    data = make_batch(20, 6, 4)
    op = operator(model, data)
    top = scipy.sparse.linalg.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False,
                                    tol=1e-12)
    exact = torch.linalg.eigvalsh(op.to_dense()).numpy()[-3:]
    np.testing.assert_allclose(np.sort(top), exact, rtol=1e-9, atol=1e-12)


def test_to_scipy_float32_matvec_and_matmat():
    model = make_mlp([4, 6, 3], "relu", dtype=torch.float32)
    data = make_batch(8, 4, 3, dtype=torch.float32)
    op = pyflat.GGN(model, data)
    lin = op.to_scipy()
    assert lin.shape == op.shape and lin.dtype == np.float32
    V = np.random.default_rng(0).standard_normal((op.shape[0], 2)).astype(np.float32)
    expected = (op @ torch.from_numpy(V)).numpy()
    np.testing.assert_allclose(lin.matmat(V), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lin.matvec(V[:, 0]), expected[:, 0], rtol=1e-6, atol=1e-7)
