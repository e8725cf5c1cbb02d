"""GGN and exact Hessian products of the fused engine against autograd in float64."""
import pytest
import torch

import pyflat
from pyflat import reference
from pyflat.generic import GenericGGN, GenericHessian

from helpers import (
    ACTIVATION_MODULES,
    make_batch,
    make_mlp,
    num_params,
    random_block,
    relative_error,
)

TOL = 1e-10  # float64; observed errors are ~1e-15
PRODUCTS = {
    "ggn": (pyflat.GGN, reference.ggn_matmat, GenericGGN),
    "hessian": (pyflat.Hessian, reference.hessian_matmat, GenericHessian),
}


def check_against_reference(model, data, product, k, reduction="mean", weight_decay=0.0):
    operator, ref_fn, _ = PRODUCTS[product]
    V = random_block(num_params(model), k)
    op = operator(model, data, reduction=reduction, weight_decay=weight_decay)
    expected = ref_fn(model, data, V, reduction=reduction, weight_decay=weight_decay)
    assert relative_error(op @ V, expected) < TOL


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("width", [1, 7, 33])
@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
def test_every_activation_and_odd_widths(activation, width, product):
    model = make_mlp([5, width, 6, 4], activation, seed=width)
    check_against_reference(model, make_batch(9, 5, 4), product, k=3)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_depths(depth, product):
    widths = [6] + [8, 5, 7][: depth - 1] + [3]
    model = make_mlp(widths, "gelu", seed=depth)
    check_against_reference(model, make_batch(13, 6, 3), product, k=2)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("batch", [1, 257])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_batch_k_reduction_weight_decay(product, batch, k, reduction, weight_decay):
    model = make_mlp([7, 33, 10], "silu", seed=batch + k)
    data = make_batch(batch, 7, 10, seed=k)
    check_against_reference(model, data, product, k, reduction, weight_decay)


@pytest.mark.parametrize("product", PRODUCTS)
def test_layers_without_bias_and_activation_after_last_layer(product):
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6, bias=False), torch.nn.ELU(), torch.nn.Linear(6, 5),
        torch.nn.Linear(5, 3, bias=False), torch.nn.Tanh()).double()
    check_against_reference(model, make_batch(11, 4, 3), product, k=4)


@pytest.mark.parametrize("product", PRODUCTS)
def test_input_transforms_and_containers(product):
    """Flatten and an activation before the first Linear, nested Sequentials, an
    activation module used twice, Identity and eval-mode Dropout."""
    act = torch.nn.Softplus()
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Sigmoid(),
        torch.nn.Sequential(torch.nn.Linear(12, 9), act, torch.nn.Dropout(0.5)),
        torch.nn.Identity(), torch.nn.Linear(9, 8), act, torch.nn.Linear(8, 4)).double().eval()
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(10, 3, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=gen)
    check_against_reference(model, (X, y), product, k=3)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus"])
def test_generic_path_matches_reference(activation, product):
    """The plain-ATen path (benchmark baseline, cross-check) is itself exact."""
    _, ref_fn, generic = PRODUCTS[product]
    model = make_mlp([5, 7, 6, 4], activation, seed=4)
    data = make_batch(9, 5, 4)
    V = random_block(num_params(model), 3)
    assert relative_error(generic(model, data) @ V, ref_fn(model, data, V)) < TOL


@pytest.mark.parametrize("product", PRODUCTS)
def test_vector_block_and_parameter_list_forms_agree(product):
    model = make_mlp([4, 6, 3], "tanh")
    op = PRODUCTS[product][0](model, make_batch(8, 4, 3), weight_decay=0.1)
    V = random_block(num_params(model), 3)
    block = op @ V
    for j in range(3):
        torch.testing.assert_close(op @ V[:, j], block[:, j], rtol=1e-13, atol=1e-15)
    parts = [t.clone() for t in torch.split(V[:, 0], [p.numel() for p in model.parameters()])]
    as_list = op.matvec([t.view(p.shape) for t, p in zip(parts, model.parameters())])
    assert [t.shape for t in as_list] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in as_list]), block[:, 0],
                               rtol=1e-13, atol=1e-15)


def test_products_are_bitwise_reproducible():
    model = make_mlp([8, 16, 16, 5], "tanh", dtype=torch.float32)
    data = make_batch(64, 8, 5, dtype=torch.float32)
    V = random_block(num_params(model), 4, dtype=torch.float32)
    H = pyflat.Hessian(model, data)
    first = H @ V
    again = pyflat.Hessian(model, data) @ V
    assert torch.equal(first, H @ V) and torch.equal(first, again)


def test_forward_is_prepared_once(monkeypatch):
    calls = []
    original = pyflat.ops.mlp_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pyflat.ops, "mlp_forward", counting)
    model = make_mlp([4, 6, 3], "tanh")
    H = pyflat.Hessian(model, make_batch(8, 4, 3))
    for _ in range(3):
        H @ random_block(num_params(model), 2)
    assert len(calls) == 1


def test_operator_is_a_snapshot_of_the_model():
    model = make_mlp([4, 6, 3], "tanh")
    data = make_batch(8, 4, 3)
    V = random_block(num_params(model), 2)
    G = pyflat.GGN(model, data)
    before = G @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    torch.testing.assert_close(G @ V, before, rtol=0, atol=0)


def test_loss_matches_cross_entropy():
    model = make_mlp([4, 6, 3], "relu")
    data = make_batch(8, 4, 3)
    for reduction in ("mean", "sum"):
        G = pyflat.GGN(model, data, reduction=reduction)
        expected = reference.loss(model, data, reduction=reduction).item()
        assert abs(G.loss - expected) <= 1e-14 * abs(expected)


@pytest.mark.parametrize("product", PRODUCTS)
def test_wide_blocks_are_split_under_the_memory_bound(product, monkeypatch):
    model = make_mlp([5, 7, 6, 4], "tanh")
    op = PRODUCTS[product][0](model, make_batch(9, 5, 4), weight_decay=0.01)
    V = random_block(num_params(model), 7)
    whole = op @ V
    name = "mlp_ggn_matmat" if product == "ggn" else "mlp_hessian_matmat"
    original, calls = getattr(pyflat.ops, name), []

    def counting(*args):
        calls.append(args[5].shape[0])  # directions (k, P)
        return original(*args)

    monkeypatch.setattr(pyflat.ops, name, counting)
    # one direction per call
    monkeypatch.setattr(op.backend_operator, "block_memory_bytes", 1)
    torch.testing.assert_close(op @ V, whole, rtol=1e-14, atol=1e-16)
    assert calls == [1] * 7
