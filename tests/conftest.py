"""pytest fixtures shared by the tests; the builders they use live in helpers.py."""
from __future__ import annotations

import pytest
import torch

from pyflat.applications.digits import load_digits
from pyflat.applications.training import train

from helpers import make_mlp


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def digits_mlp():
    """A 64-16-10 tanh MLP trained (float64, 300 full-batch Adam steps at lr 0.02, fixed
    seed; in eval mode) on the first 300 of scikit-learn's bundled handwritten digits (file
    order): a real network near a minimum, small enough for dense eigendecompositions
    (1,210 parameters)."""
    data = load_digits(300, dtype=torch.float64)
    model = train(make_mlp([64, 16, 10], "tanh", seed=0), data, steps=300, lr=0.02)
    return model, data
