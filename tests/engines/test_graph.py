"""The graph engine traces with the real batch: shapes are numbers while it traces.

Forwards that slice a buffer by the input's length, assert on a shape or branch on one
(which plain torch.fx symbolic tracing cannot trace) run on the fused engine, exact in
float64; buffers and slices of them are constants; tracing writes to nothing.
"""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import pyflat
from pyflat import reference
from pyflat.engines import graph as _graph


class PositionalSum(nn.Module):
    """x (B, T, D) plus a positional table sliced to T, as transformers add theirs."""

    def __init__(self, max_len=12, T=5, D=4, classes=3):
        super().__init__()
        self.register_buffer("pe", torch.randn(1, max_len, D))
        self.fc = nn.Linear(T * D, classes)

    def forward(self, x):
        T = x.shape[1]
        assert T <= self.pe.shape[1], "sequence longer than the positional table"
        h = torch.tanh(x + self.pe[:, :T])
        return self.fc(h.flatten(1))


class Masked(nn.Module):
    """x (B, T, T) minus a causal mask sliced to T, then a convolution."""

    def __init__(self, max_len=8, classes=3, T=6):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len)))
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * (T - 2) ** 2, classes)

    def forward(self, x):
        T = x.size(1)
        h = self.mask[:T, :T] - x
        h = torch.relu(self.conv(h.view(h.size(0), 1, T, T)))
        return self.fc(h.flatten(1))


class ByLength(nn.Module):
    """A branch on the input's width: the layer the batch takes is the one traced."""

    def __init__(self):
        super().__init__()
        self.short = nn.Linear(4, 3)
        self.long = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[1] > 4:
            return self.long(torch.tanh(x))
        return self.short(x)


CASES = [("positional table", PositionalSum, (5, 4)), ("causal mask", Masked, (6, 6)),
         ("branch on a shape", ByLength, (6,))]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("operator", [pyflat.GGN, pyflat.Hessian])
def test_shape_dependent_forwards_run_on_the_graph_engine(name, make, shape, operator):
    torch.manual_seed(0)
    model = make().double().eval()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(7, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (7,), generator=gen)
    with pytest.raises((fx.proxy.TraceError, RuntimeError, TypeError)):  # plain tracing fails
        fx.symbolic_trace(model)
    op = operator(model, (X, y), backend="fused")
    assert op.engine == "graph"
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
    product = reference.hessian_matmat if operator is pyflat.Hessian else reference.ggn_matmat
    torch.testing.assert_close(op @ V, product(model, (X, y), V), rtol=1e-10, atol=1e-12)


def test_tracing_leaves_the_model_and_the_batch_as_they_were():
    """fx stores the tensors a forward creates (the slice of the table) as attributes of
    the module it traces: a copy's, not the user's model's."""
    torch.manual_seed(0)
    model = PositionalSum().double().eval()
    names = set(vars(model)) | {n for n, _ in model.named_buffers()}
    X = torch.randn(5, 5, 4, dtype=torch.float64)
    before = X.clone()
    graph = _graph.capture(model, X, "test")
    _graph.GraphEngine(graph, X, "mean", True, "test")
    assert set(vars(model)) | {n for n, _ in model.named_buffers()} == names
    assert not any(name.startswith("_tensor_constant") for name in dir(model))
    assert torch.equal(X, before)


class Broadcasts(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 5, 4))
        self.fc = nn.Linear(20, 3)

    def forward(self, x):  # x (B, 1, 4) grows to (B, 5, 4)
        return self.fc((x + self.table).flatten(1))


def test_a_constant_that_broadcasts_the_tensor_is_refused_and_falls_back():
    model = Broadcasts().double().eval()
    data = (torch.randn(6, 1, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    with pytest.raises(pyflat.UnsupportedModel, match="broadcasts the model's tensor"):
        pyflat.GGN(model, data, backend="fused")
    with pytest.warns(UserWarning, match="Falling back"):
        op = pyflat.GGN(model, data)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(op @ V, reference.ggn_matmat(model, data, V), rtol=1e-10,
                               atol=1e-12)


def test_the_models_own_shape_assertion_still_fires():
    """The forward runs on the real batch while it is traced: an assertion the batch
    breaks fires, named in the refusal."""
    torch.manual_seed(0)
    model = PositionalSum(max_len=4, T=5).double().eval()
    data = (torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))
    with pytest.raises(pyflat.UnsupportedModel, match="sequence longer than the positional"):
        pyflat.GGN(model, data, backend="fused")
