"""The sharpness report against dense eigendecompositions of a trained digits MLP."""
import json
import re

import pytest
import torch

import pyflat
from pyflat import reference


@pytest.fixture(scope="module")
def dense(digits_mlp):
    model, data = digits_mlp
    return {"hessian": torch.linalg.eigvalsh(reference.hessian_dense(model, data)),
            "ggn": torch.linalg.eigvalsh(reference.ggn_dense(model, data))}


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_report_matches_dense_spectrum(digits_mlp, dense, curvature):
    model, data = digits_mlp
    report = pyflat.sharpness(model, data, curvature=curvature, seed=0)
    ev = dense[curvature]
    torch.testing.assert_close(torch.tensor(report.top_eigenvalues, dtype=torch.float64), ev[-5:],
                               rtol=1e-8,
                               atol=1e-12)
    assert report.spectral_norm == pytest.approx(float(ev.abs().max()), rel=1e-8)
    if curvature == "hessian":
        assert report.min_eigenvalue == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-12)
    else:
        assert report.min_eigenvalue is None
    assert abs(report.trace - float(ev.sum())) < 4 * report.trace_stderr
    assert abs(report.frobenius - float(ev.pow(2).sum().sqrt())) < 4 * report.frobenius_stderr
    exact = int((ev.abs() > 1e-3 * ev.abs().max()).sum())
    assert report.rank["resolved"]
    assert abs(report.rank["rank"] - exact) < 4 * report.rank["stderr"] + 1
    P = report.num_params
    assert report.scaled["trace"] == pytest.approx(report.trace * report.param_norm ** 2 / P)
    assert report.accuracy == pytest.approx(
        float((model(data[0]).argmax(1) == data[1]).double().mean()))
    assert report.loss == pytest.approx(reference.loss(model, data).item(), rel=1e-12)


def test_per_layer_blocks_match_dense_blocks(digits_mlp):
    model, data = digits_mlp
    report = pyflat.sharpness(model, data, curvature="ggn", seed=1)
    G = reference.ggn_dense(model, data)
    first = 64 * 16 + 16
    blocks = {"0": G[:first, :first], "2": G[first:, first:]}
    assert [layer["name"] for layer in report.per_layer] == ["0", "2"]
    for layer in report.per_layer:
        block = blocks[layer["name"]]
        assert layer["params"] == block.shape[0]
        assert layer["top_eigenvalue"] == pytest.approx(
            float(torch.linalg.eigvalsh(block)[-1]), rel=1e-8)
        assert abs(layer["trace"] - float(torch.trace(block))) < 4 * layer["trace_stderr"]


def test_with_l2_shifts_every_eigenvalue_by_mu(digits_mlp, dense):
    model, data = digits_mlp
    mu = 1e-2
    plain = pyflat.sharpness(model, data, curvature="hessian", seed=2, per_layer=False)
    shifted = pyflat.sharpness(model, data, curvature="hessian", weight_decay=mu,
                               with_l2=True, seed=2, per_layer=False)
    torch.testing.assert_close(torch.tensor(shifted.top_eigenvalues, dtype=torch.float64),
                               torch.tensor(plain.top_eigenvalues, dtype=torch.float64) + mu,
                               rtol=1e-8, atol=1e-12)
    assert shifted.objective == pytest.approx(plain.loss + mu / 2 * plain.param_norm ** 2)
    # rank is a property of the cross-entropy part, whichever view is measured
    assert shifted.rank["rank"] == pytest.approx(plain.rank["rank"])


def test_report_is_reproducible_and_serializable(digits_mlp, tmp_path):
    model, data = digits_mlp
    a = pyflat.sharpness(model, data, curvature="ggn", seed=3, per_layer=False)
    b = pyflat.sharpness(model, data, curvature="ggn", seed=3, per_layer=False)
    assert a.to_dict() == b.to_dict()
    path = tmp_path / "report.json"
    a.to_json(path)
    loaded = json.loads(path.read_text())
    assert loaded["settings"]["seed"] == 3 and loaded["settings"]["slq_probes"] == 10
    assert loaded["curvature"] == "ggn" and loaded["rank"]["rtol"] == 1e-3
    assert "GGN (cross-entropy only" in str(a)


def test_sharpness_errors(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn', got 'fisher'"):
        pyflat.sharpness(model, data, curvature="fisher")
    with pytest.raises(ValueError, match="with_l2=True needs weight_decay > 0"):
        pyflat.sharpness(model, data, with_l2=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be an int >= 1, got 0"),
    ({"trace_products": 2}, "trace_products must be an int >= 6, got 2"),
    ({"frobenius_probes": 1}, "frobenius_probes must be an int >= 2, got 1"),
    ({"slq_probes": True}, "slq_probes must be an int >= 1, got True"),
    ({"slq_steps": 0}, "slq_steps must be an int >= 1, got 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
])
def test_sharpness_checks_its_counts_before_any_product(kwargs, message):
    # data=None would be refused by the operator: the count must be named first
    with pytest.raises(ValueError, match="pyflat.sharpness: " + re.escape(message)):
        pyflat.sharpness(torch.nn.Linear(4, 3).double(), None, **kwargs)
