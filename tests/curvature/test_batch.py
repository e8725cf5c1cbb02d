"""The back end is chosen once, at construction, and every product goes to its operator."""
import warnings

import pytest
import torch
from torch import nn

import pyflat
from pyflat import reference
from pyflat.curvature.batch import GraphBatch, MLPBatch, ReferenceBatch
from pyflat.curvature.dataset import DatasetCurvature

from helpers import make_batch, make_mlp, random_block, relative_error


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()


class _Doubled(nn.Module):
    """A forward the fused engines refuse (a Python-level branch on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3).double()

    def forward(self, x):
        return self.linear(x) * (2.0 if bool(x.sum() > 0) else 1.0)


@pytest.mark.parametrize("kind", ["mlp", "graph", "reference"])
@pytest.mark.parametrize("Operator", [pyflat.GGN, pyflat.Hessian])
def test_one_backend_operator_per_model_kind(kind, Operator):
    if kind == "graph":
        model, (X, y) = _convnet(), make_batch(5, 6, 3)
        X = X.view(5, 1, 6)
    elif kind == "mlp":
        model, (X, y) = make_mlp([6, 5, 3]), make_batch(5, 6, 3)
    else:
        model, (X, y) = _Doubled(), make_batch(5, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = Operator(model, (X, y), weight_decay=0.25)
    expected_type = {"mlp": MLPBatch, "graph": GraphBatch, "reference": ReferenceBatch}[kind]
    assert type(op.backend_operator) is expected_type
    assert (op.backend, op.engine) == (op.backend_operator.backend, op.backend_operator.engine)
    V = random_block(op.shape[0], 3)
    dense = (reference.hessian_dense if Operator is pyflat.Hessian else reference.ggn_dense)(
        model, (X, y))
    # the front door adds mu I once to the back end's cross-entropy products
    assert relative_error(op @ V, dense @ V + 0.25 * V) < 1e-12
    assert relative_error(op.backend_operator @ V, dense @ V) < 1e-12


def test_a_data_set_prepares_every_batch_with_the_backend_chosen_first():
    model = make_mlp([6, 5, 3])
    X, y = make_batch(12, 6, 3)
    op = pyflat.GGN(model, (X, y), batch_size=4, cache_bytes=0, weight_decay=0.5)
    dataset = op.backend_operator
    assert isinstance(dataset, DatasetCurvature) and op.backend == "fused"
    made = []
    make = dataset._make
    dataset._make = lambda *args, **kwargs: made.append(make(*args, **kwargs)) or made[-1]
    V = random_block(op.shape[0], 2)
    expected = reference.ggn_dense(model, (X, y)) @ V + 0.5 * V
    assert relative_error(op @ V, expected) < 1e-12
    assert [type(m) for m in made] == [MLPBatch] * 3
