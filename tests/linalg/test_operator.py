"""Operator algebra (sums, differences, multiples) and restriction to parameter subsets."""
import pytest
import torch

import pyflat
from pyflat import reference

from helpers import make_batch, make_mlp, num_params, random_block


def setup():
    model = make_mlp([4, 6, 3], "tanh", seed=3)
    data = make_batch(10, 4, 3)
    return model, data


def test_hessian_minus_ggn_is_the_residual():
    model, data = setup()
    H, G = pyflat.Hessian(model, data), pyflat.GGN(model, data)
    V = random_block(num_params(model), 3)
    residual = H - G
    torch.testing.assert_close(residual @ V, H @ V - G @ V, rtol=1e-13, atol=1e-15)
    dense = reference.hessian_dense(model, data) - reference.ggn_dense(model, data)
    torch.testing.assert_close(residual.to_dense(), dense, rtol=1e-10, atol=1e-13)


def test_linear_combinations_flatten_and_scale():
    model, data = setup()
    H, G = pyflat.Hessian(model, data), pyflat.GGN(model, data)
    V = random_block(num_params(model), 2)
    combo = 2.0 * H - 0.5 * G + (-H)
    assert len(combo.terms) == 3
    torch.testing.assert_close(combo @ V, (H @ V) - 0.5 * (G @ V), rtol=1e-12, atol=1e-14)
    assert torch.equal((H * 3) @ V, 3 * (H @ V))


def test_algebra_accepts_reference_operators_and_feeds_eigsh():
    model, data = setup()
    mixed = pyflat.Hessian(model, data) - reference.ReferenceGGN(model, data)
    dense = reference.hessian_dense(model, data) - reference.ggn_dense(model, data)
    res = pyflat.eigsh(mixed, k=2, which="BE", seed=0)
    eig = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(res.eigenvalues, torch.stack([eig[0], eig[-1]]), rtol=0,
                               atol=1e-10)


def test_algebra_refuses_mismatched_operators():
    model, data = setup()
    other = make_mlp([4, 5, 3], "tanh")
    with pytest.raises(ValueError, match="operators over the same parameters"):
        pyflat.GGN(model, data) + pyflat.GGN(other, data)
    with pytest.raises(ValueError, match="one dtype and device"):
        pyflat.GGN(model, data) + pyflat.GGN(make_mlp([4, 6, 3], "tanh", dtype=torch.float32),
                                           (data[0].float(), data[1]))
    with pytest.raises(TypeError, match="operator algebra takes pyflat operators"):
        pyflat.GGN(model, data) + torch.eye(num_params(model))


def test_restriction_is_the_principal_submatrix():
    model, data = setup()
    H = pyflat.Hessian(model, data)
    dense = H.to_dense()
    layer = H.restrict([model[2].weight, model[2].bias])
    rows = torch.arange(4 * 6 + 6, num_params(model))
    torch.testing.assert_close(layer.to_dense(), dense[rows][:, rows], rtol=0, atol=1e-15)
    assert layer.param_shapes == [model[2].weight.shape, model[2].bias.shape]
    by_position = H.restrict([1])
    torch.testing.assert_close(by_position.to_dense(), dense[24:30, 24:30], rtol=0, atol=1e-15)
    as_list = layer.matvec([torch.ones_like(model[2].weight), torch.ones_like(model[2].bias)])
    assert [t.shape for t in as_list] == [model[2].weight.shape, model[2].bias.shape]


def test_restriction_errors():
    model, data = setup()
    H = pyflat.Hessian(model, data)
    with pytest.raises(ValueError, match="is not one of the operator's parameters"):
        H.restrict([torch.zeros(3)])
    with pytest.raises(ValueError, match=r"by position in \[0, 4\) or as tensors, got 7"):
        H.restrict([7])
    with pytest.raises(ValueError, match="a parameter is named twice"):
        H.restrict([0, model[0].weight])
    with pytest.raises(TypeError, match=r"which holds parameter positions \(ints\) or the "
                                        r"parameter tensors, got bool True"):
        H.restrict([True])
    with pytest.raises(TypeError, match="got str '0'"):
        H.restrict(["0"])
    with pytest.raises(ValueError, match="which must name at least one parameter"):
        H.restrict([])


def test_restriction_to_one_parameter_given_alone():
    model, data = setup()
    H = pyflat.Hessian(model, data)
    assert H.restrict(model[2].weight).param_shapes == H.restrict([2]).param_shapes
    assert H.restrict(2).param_shapes == [model[2].weight.shape]
