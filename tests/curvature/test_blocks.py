"""Blocks of directions: one product call per chunk the memory policy allows, and block
sizes that follow static sizes, so results do not move with the memory free at run time."""
import math

import pytest
import torch
from torch import nn

import pyflat
from pyflat import ops
from pyflat.curvature import batch as batch_module
from pyflat.engines.graph import GraphEngine

from helpers import make_batch, make_mlp, random_block


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 16, 3)).double()


def _count(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
def test_a_block_is_one_mlp_call_per_chunk(monkeypatch, exact, chunk):
    model = make_mlp([6, 7, 3])
    op = (pyflat.Hessian if exact else pyflat.GGN)(model, make_batch(10, 6, 3))
    batch = op.backend_operator
    if chunk is not None:
        monkeypatch.setattr(batch, "block_memory_bytes", batch._bytes_per_direction * chunk)
    calls = _count(monkeypatch, ops, "mlp_hessian_matmat" if exact else "mlp_ggn_matmat")
    V = random_block(op.shape[0], 16)
    op @ V
    widths = [args[5].shape[0] for args in calls]  # the (k, P) directions of each call
    assert widths == ([16] if chunk is None else [5, 5, 5, 1])
    assert op.block_size() == (batch.block_memory_bytes // batch._bytes_per_direction)


@pytest.mark.parametrize("exact", [False, True])
def test_a_block_is_one_graph_engine_call(monkeypatch, exact):
    model = _convnet()
    X, y = make_batch(6, 16, 3)
    op = (pyflat.Hessian if exact else pyflat.GGN)(model, (X.view(6, 1, 4, 4), y))
    assert op.engine == "graph"
    calls = _count(monkeypatch, GraphEngine, "matmat")
    losses = _count(monkeypatch, ops, "softmax_hessian")
    op @ random_block(op.shape[0], 16)
    assert [args[1].shape[0] for args in calls] == [16]
    assert len(losses) == 1  # the loss Hessian ran once on all 16 tangents


def test_block_size_follows_static_sizes_only(monkeypatch):
    """Two models of one shape on batches of one size get one block size, whatever the
    memory free: the data-set cache budget (which reads free memory) plays no part."""
    first = pyflat.GGN(make_mlp([6, 7, 3], seed=0), make_batch(10, 6, 3, seed=1))
    second = pyflat.GGN(make_mlp([6, 7, 3], seed=5), make_batch(10, 6, 3, seed=6))
    assert first.block_size() == second.block_size() >= 1
    monkeypatch.setattr(batch_module._FusedBatch, "block_memory_bytes",
                        first.backend_operator._bytes_per_direction * 3)
    X, y = make_batch(40, 6, 3)
    sizes = set()
    for budget in (0, 1 << 40):  # nothing cached, everything cached
        sizes.add(pyflat.GGN(make_mlp([6, 7, 3]), (X, y), batch_size=10,
                             cache_bytes=budget).block_size())
    assert sizes == {3}
    assert pyflat.GGN(make_mlp([6, 7, 3]), (X, y), backend="reference").block_size() is None
    G = pyflat.GGN(make_mlp([6, 7, 3]), (X[:10], y[:10]))
    H = pyflat.Hessian(make_mlp([6, 7, 3]), (X[:10], y[:10]))
    combined = G - 0.5 * H  # every product runs both: the tighter bound holds
    assert combined.block_size() == min(G.block_size(), H.block_size()) < G.block_size()
    assert combined.restrict([0]).block_size() == combined.block_size()


def test_estimators_send_blocks_of_the_operators_size(monkeypatch):
    op = pyflat.GGN(make_mlp([6, 7, 3]), make_batch(10, 6, 3))
    monkeypatch.setattr(op.backend_operator, "block_memory_bytes",
                        op.backend_operator._bytes_per_direction * 7)
    widths = []
    original = type(op)._matmat
    monkeypatch.setattr(type(op), "_matmat",
                        lambda self, V: widths.append(V.shape[1]) or original(self, V))
    pyflat.hutchinson_trace(op, 20, seed=0)
    assert widths == [7, 7, 6]
    widths.clear()
    pyflat.slq(op, 10, 4, seed=0)
    assert widths == [7] * 4 + [3] * 4  # two groups of probes, 4 steps each


def test_a_column_alone_and_in_a_block_agree_to_rounding_and_estimates_are_reproducible():
    """A product's last bits depend on the block a direction travels in (GEMM shapes set
    the order of sums): a column alone and inside a block of 16 agree to rounding, not
    bitwise. So estimates use the operator's static block size, and the same call gives
    the same bits; other block sizes give the same estimate to rounding."""
    model = make_mlp([6, 9, 3], "tanh")
    op = pyflat.Hessian(model, make_batch(30, 6, 3))
    V = random_block(op.shape[0], 16)
    block = op @ V
    alone = torch.stack([op @ V[:, j] for j in range(16)], dim=1)
    gap = float((alone - block).abs().max() / block.abs().max())
    assert gap < 1e-14
    default = pyflat.hutchinson_trace(op, 32, seed=3)
    again = pyflat.hutchinson_trace(op, 32, seed=3, block_size=op.block_size())
    assert default.value == again.value and torch.equal(default.samples, again.samples)
    for size in (1, 4, 16):
        other = pyflat.hutchinson_trace(op, 32, seed=3, block_size=size)
        assert math.isclose(other.value, default.value, rel_tol=1e-13)
