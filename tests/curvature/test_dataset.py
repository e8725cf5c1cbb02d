"""Operators over a whole data set: sample-weighted batches, caching and determinism."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyflat
from pyflat import reference

from helpers import make_batch, make_mlp, num_params, random_block, relative_error


@pytest.fixture
def setup():
    model = make_mlp([5, 9, 4], "tanh", seed=2)
    X, y = make_batch(103, 5, 4, seed=3)  # 103 = 4 batches of 25 and a short one of 3
    return model, X, y


@pytest.mark.parametrize("operator, ref_fn", [(pyflat.GGN, reference.ggn_matmat),
                                              (pyflat.Hessian, reference.hessian_matmat)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loader_equals_the_concatenated_batch(setup, operator, ref_fn, reduction):
    model, X, y = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=25, shuffle=False)
    op = operator(model, loader, reduction=reduction, weight_decay=0.01)
    assert op.num_batches == 5 and op.num_samples == 103
    V = random_block(num_params(model), 3)
    expected = ref_fn(model, (X, y), V, reduction=reduction, weight_decay=0.01)
    assert relative_error(op @ V, expected) < 1e-12
    assert op.loss == pytest.approx(reference.loss(model, (X, y), reduction).item(), rel=1e-12)


def test_tensor_pair_with_batch_size_and_list_of_batches(setup):
    model, X, y = setup
    whole = pyflat.GGN(model, (X, y))
    V = random_block(num_params(model), 2)
    split = pyflat.GGN(model, (X, y), batch_size=40)
    listed = pyflat.GGN(model, list(zip(X.split(10), y.split(10))))
    assert split.num_batches == 3 and listed.num_batches == 11
    assert relative_error(split @ V, whole @ V) < 1e-12
    assert relative_error(listed @ V, whole @ V) < 1e-12


def test_batches_past_the_budget_are_prepared_again(setup):
    model, X, y = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=25)
    cached = pyflat.Hessian(model, loader)
    partial = pyflat.Hessian(model, loader, cache_bytes=1)
    assert cached.cache_report["cached_batches"] == 5
    assert cached.cache_report["path"] == "all batches cached"
    assert partial.cache_report["cached_batches"] == 0 and partial.cache_report["bytes_held"] == 0
    V = random_block(num_params(model), 2)
    torch.testing.assert_close(partial @ V, cached @ V, rtol=0, atol=0)


def test_batches_move_to_the_model_dtype(setup):
    model, X, y = setup
    loader = DataLoader(TensorDataset(X.float(), y), batch_size=50)
    op = pyflat.GGN(model, loader)  # float32 batches, float64 model
    assert op.dtype == torch.float64
    V = random_block(num_params(model), 1)
    assert relative_error(op @ V, pyflat.GGN(model, (X.float().double(), y)) @ V) < 1e-12


class NoisyBatches:
    """A data source that augments afresh every pass, as random transforms do."""

    def __init__(self, X, y):
        self.X, self.y, self.gen = X, y, torch.Generator().manual_seed(0)

    def __iter__(self):
        noise = 0.1 * torch.randn(self.X.shape, generator=self.gen, dtype=self.X.dtype)
        yield self.X + noise, self.y


def test_a_changing_data_source_is_refused(setup):
    model, X, y = setup
    # cached batches are reused as prepared; batches prepared again each product must be
    # the same samples, which a freshly augmenting source is not: refused at construction
    # (the determinism check) and, without it, at the first product
    with pytest.raises(ValueError, match=r"the batches read again differ from those read "
                                         r"at construction"):
        pyflat.GGN(model, NoisyBatches(X, y), cache_bytes=1)
    op = pyflat.GGN(model, NoisyBatches(X, y), cache_bytes=1, check_determinism=False)
    assert op.num_batches == 1
    with pytest.raises(ValueError, match="no random augmentation"):
        op @ torch.ones(op.shape[0], dtype=op.dtype)


def test_a_shuffling_loader_passes_over_the_whole_data_set(setup):
    """The data-set curvature is a sum over samples: shuffling changes only rounding."""
    model, X, y = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    op = pyflat.GGN(model, loader, cache_bytes=1)
    V = random_block(num_params(model), 1)
    assert relative_error(op @ V, pyflat.GGN(model, (X, y)) @ V) < 1e-12


def test_dataset_errors(setup):
    model, X, y = setup
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        pyflat.GGN(model, (X, y), batch_size=0)
    with pytest.raises(TypeError, match="data is an iterator, which can be read only once"):
        pyflat.GGN(model, iter([(X, y)]))
    with pytest.raises(ValueError, match="the data yielded no batch"):
        pyflat.GGN(model, [])
    with pytest.raises(TypeError, match=r"every batch must be a pair \(X, y\), got Tensor"):
        pyflat.GGN(model, [X])


def test_sharpness_over_a_loader_matches_the_whole_batch(setup):
    model, X, y = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=30)
    a = pyflat.sharpness(model, loader, curvature="ggn", seed=0, per_layer=False)
    b = pyflat.sharpness(model, (X, y), curvature="ggn", seed=0, per_layer=False)
    assert a.num_samples == b.num_samples == 103
    assert a.accuracy == b.accuracy and a.loss == pytest.approx(b.loss, rel=1e-12)
    assert a.top_eigenvalues == pytest.approx(b.top_eigenvalues, rel=1e-9)
    assert a.trace == pytest.approx(b.trace, rel=1e-9)
