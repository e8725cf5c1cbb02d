"""Any model: the autograd reference backend, chosen or fallen back to, and its checks."""
import warnings

import pytest
import torch
from torch import nn

import pyflat
from pyflat import reference

from helpers import ResidualMLP, make_batch, make_mlp, num_params, random_block, relative_error


@pytest.mark.parametrize("operator, ref_fn", [(pyflat.GGN, reference.ggn_matmat),
                                              (pyflat.Hessian, reference.hessian_matmat)])
def test_auto_falls_back_once_with_the_reason(operator, ref_fn):
    model = ResidualMLP().double()
    data = make_batch(11, 5, 3)
    with pytest.warns(UserWarning, match=r"unsupported module LayerNorm at 'block.0'.*"
                                         r"Falling back to the autograd reference backend"):
        op = operator(model, data, weight_decay=0.1)
    assert op.backend == "reference"
    V = random_block(num_params(model), 3)
    torch.testing.assert_close(op @ V, ref_fn(model, data, V, weight_decay=0.1), rtol=1e-12,
                               atol=1e-14)
    assert op.loss == pytest.approx(reference.loss(model, data).item(), rel=1e-12)
    # the algorithms take it like any operator
    assert pyflat.eigsh(op, k=2, seed=0).converged


def test_fused_refuses_and_reference_needs_no_warning():
    model = ResidualMLP().double()
    data = make_batch(11, 5, 3)
    with pytest.raises(TypeError, match="unsupported module LayerNorm at 'block.0'"):
        pyflat.GGN(model, data, backend="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pyflat.GGN(model, data, backend="reference").backend == "reference"


def test_reference_backend_equals_fused_on_a_supported_model():
    model = make_mlp([4, 7, 3], "gelu")
    data = make_batch(9, 4, 3)
    V = random_block(num_params(model), 4)
    for operator in (pyflat.GGN, pyflat.Hessian):
        fused = operator(model, data)
        assert fused.backend == "fused"
        ref = operator(model, data, backend="reference")
        assert relative_error(ref @ V, fused @ V) < 1e-12


def test_reference_backend_is_a_snapshot_too():
    model = ResidualMLP().double()
    data = make_batch(6, 5, 3)
    op = pyflat.Hessian(model, data, backend="reference")
    V = random_block(num_params(model), 2)
    before = op @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(op @ V, before, rtol=0, atol=0)


def test_training_mode_is_refused_with_a_clear_message():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"BatchNorm1d at '1' is in training mode; curvature "
                                         r"is measured in eval mode: call model.eval\(\) first"):
        pyflat.GGN(model, make_batch(8, 4, 3), backend="reference")
    model.eval()
    assert pyflat.GGN(model, make_batch(8, 4, 3), backend="reference").backend == "reference"


def test_reference_backend_checks_labels_and_logits():
    model = ResidualMLP().double()
    X, y = make_batch(8, 5, 3)
    y[2] = 3
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\), got 3"):
        pyflat.GGN(model, (X, y), backend="reference")
