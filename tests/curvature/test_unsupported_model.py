"""UnsupportedModel, and only it, sends backend='auto' to the autograd backend.

Each refusal names the module (its path) and says the fused engines cannot take the model;
any other error raised inside an engine, a TypeError from a bug included, propagates instead
of becoming a silent slow fallback with a warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pyflat
import pyflat.curvature.batch
import pyflat.engines.rules
from pyflat import reference

from helpers import make_batch, make_mlp

CANNOT = "the fused engines cannot take this model"


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4)).double().eval()


def _images(batch=5):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 6, 6, dtype=torch.float64, generator=gen),
            torch.randint(0, 4, (batch,), generator=gen))


class _Branchy(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)


def _hooked():
    model = make_mlp([4, 5, 3])
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    return model


def _shared_convnet():
    torch.manual_seed(0)
    shared = nn.Linear(48, 48)  # the same Linear twice: shared parameters
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), shared, nn.Tanh(),
                         shared).double()


# (name, model factory, data factory, the path the refusal names or None)
UNSUPPORTED = [
    ("an unsupported module", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2),
                                                    nn.Flatten(), nn.Linear(32, 4)).double(),
     _images, "1"),
    ("a forward hook", _hooked, lambda: make_batch(6, 4, 3), "0"),
    ("an untraceable forward", lambda: _Branchy().double(), lambda: make_batch(6, 4, 3), None),
    ("shared parameters", _shared_convnet, _images, "3"),
    ("integer inputs", lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(),
                                             nn.Linear(12, 3)).double(),
     lambda: (torch.randint(0, 7, (6, 3)), torch.randint(0, 3, (6,))), None),
]


@pytest.mark.parametrize("name, make_model, make_data, path", UNSUPPORTED,
                         ids=[case[0] for case in UNSUPPORTED])
def test_each_refusal_is_unsupported_model_and_auto_falls_back(name, make_model, make_data,
                                                               path):
    model, data = make_model().eval(), make_data()
    with pytest.raises(pyflat.UnsupportedModel, match=CANNOT) as refused:
        pyflat.GGN(model, data, backend="fused")
    assert isinstance(refused.value, TypeError)  # code that caught TypeError keeps working
    if path is not None:
        assert refused.value.path == path
        assert f"'{path}'" in str(refused.value)
    with pytest.warns(UserWarning, match=CANNOT + r"\. Falling back to the autograd"):
        op = pyflat.GGN(model, data)
    assert op.backend == "reference"
    V = torch.randn(op.shape[0], 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op @ V, reference.ggn_matmat(model, data, V), rtol=1e-10,
                               atol=1e-12)
    report = pyflat.validate(model, data)
    assert not report.supported and CANNOT in report.reason


def _raise_type_error(*args, **kwargs):
    raise TypeError("an engine bug")


@pytest.mark.parametrize("engine", ["graph", "mlp"])
@pytest.mark.parametrize("operator", [pyflat.GGN, pyflat.Hessian])
def test_a_type_error_inside_an_engine_propagates(monkeypatch, engine, operator):
    if engine == "graph":  # inside one layer rule's prepared forward
        monkeypatch.setattr(pyflat.engines.rules.Conv, "forward", _raise_type_error)
        model, data = _convnet(), _images()
    else:  # inside the fused op's call
        monkeypatch.setattr(pyflat.curvature.batch.ops, "mlp_forward", _raise_type_error)
        model, data = make_mlp([4, 5, 3]), make_batch(6, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(TypeError, match="an engine bug") as raised:
            operator(model, data)
    assert not isinstance(raised.value, pyflat.UnsupportedModel)
    with pytest.raises(TypeError, match="an engine bug"):
        pyflat.validate(model, data)


def test_a_type_error_while_reading_the_chain_is_not_taken_for_a_non_chain(monkeypatch):
    """parse_mlp refusing a model sends it to the graph engine; parse_mlp failing must not."""
    monkeypatch.setattr(pyflat.curvature.batch, "parse_mlp", _raise_type_error)
    with pytest.raises(TypeError, match="an engine bug"):
        pyflat.GGN(make_mlp([4, 5, 3]), make_batch(6, 4, 3))


def test_user_errors_are_not_refusals():
    model, (X, y) = make_mlp([4, 5, 3]), make_batch(6, 4, 3)
    for data, error in (((X.float(), y), TypeError), ((X, y.double()), TypeError),
                        ((X[:, :3], y), ValueError)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(error) as raised:
                pyflat.GGN(model, data)
        assert not isinstance(raised.value, pyflat.UnsupportedModel), str(raised.value)
