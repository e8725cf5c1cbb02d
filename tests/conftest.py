"""pytest fixtures shared by the tests; the builders they use live in helpers.py."""
from __future__ import annotations

import pytest
import torch

from helpers import make_mlp


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def digits_mlp():
    """A 64-16-10 tanh MLP trained (float64, Adam, fixed seed) on 300 of scikit-learn's
    bundled handwritten digits: a real network near a minimum, small enough for dense
    eigendecompositions (1,210 parameters)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data[:300], dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target[:300], dtype=torch.long)
    model = make_mlp([64, 16, 10], "tanh", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model, (X, y)
