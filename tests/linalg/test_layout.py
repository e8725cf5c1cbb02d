"""ParameterLayout: the one description of the flat parameter vector."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyflat
from pyflat.linalg import ParameterLayout

from helpers import make_batch, make_mlp


def _model():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4), nn.Linear(4, 2, bias=False)
    return nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(2, 2)).double()


def test_the_layout_is_model_parameters_in_order():
    model = _model()
    layout = ParameterLayout.of(model)
    named = list(model.named_parameters())
    assert layout.names == [n for n, _ in named]
    assert layout.shapes == [p.shape for _, p in named]
    assert layout.size == sum(p.numel() for _, p in named) == 12 + 4 + 8 + 4 + 2
    assert layout.offsets == [0, 12, 16, 24, 28, 30]
    assert [layout.position(p) for _, p in named] == list(range(len(named)))
    assert layout.position(torch.zeros(3)) is None
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    assert all(a.data_ptr() == flat[layout.span(i)].data_ptr()
               for i, a in enumerate(layout.split(flat)))  # views, not copies
    torch.testing.assert_close(layout.concatenate(layout.split(flat)), flat, rtol=0, atol=0)


def test_a_tied_parameter_appears_once():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    layout = ParameterLayout.of(nn.Sequential(first, second))
    assert layout.names == ["0.weight", "0.bias", "1.bias"]


def test_rows_write_rows_indices_and_select():
    layout = ParameterLayout.of(_model())
    k = 3
    block = torch.arange(k * layout.size, dtype=torch.float64).view(k, layout.size)
    rows = layout.rows(block, 2)
    assert rows.shape == (k, 2, 4)
    torch.testing.assert_close(rows.reshape(k, -1), block[:, 16:24], rtol=0, atol=0)
    out = torch.zeros_like(block)
    for i in range(len(layout)):
        layout.write_rows(out, i, layout.rows(block, i))
    torch.testing.assert_close(out, block, rtol=0, atol=0)
    assert layout.indices([1, 3]).tolist() == list(range(12, 16)) + list(range(24, 28))
    sub = layout.select([1, 3])
    assert sub.names == ["0.bias", "4.weight"] and sub.size == 8
    assert sub.parameters[0] is layout.parameters[1]


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="shapes, names and parameters must have the same length"):
        ParameterLayout([torch.Size([2])], ["a", "b"])


def test_operators_share_their_layout():
    model, data = make_mlp([4, 5, 3]), make_batch(6, 4, 3)
    ggn = pyflat.GGN(model, data)
    assert ggn.layout.names == [n for n, _ in model.named_parameters()]
    assert ggn.parameters == list(model.parameters())
    both = ggn + pyflat.Hessian(model, data)
    assert both.layout is ggn.layout
    restricted = ggn.restrict([model[2].weight])
    assert restricted.layout.names == ["2.weight"] and restricted.shape == (15, 15)
