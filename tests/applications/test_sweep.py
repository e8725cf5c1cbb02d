"""The benchmark sweep behind `pyflat bench`, small: every method checked, then timed."""
import json

import pytest
import torch

from pyflat.applications import sweep
from pyflat.applications.usage import UsageError


def test_sweep_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.sweep(out, models=["mlp128", "cnn"], batches=[32], ks=[1, 3],
                       seconds=0.01) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    cases = {(r["model"], r["k"], r["product"], r["method"]) for r in rows}
    assert ("cnn", 3, "hessian", "torch.func") in cases
    assert ("mlp128", 1, "hessian", "double backward") in cases
    assert all(r["rel_error"] < sweep.CHECK_TOL and r["products_per_s"] > 0 for r in rows)
    assert (out / "sweep.png").stat().st_size > 0
    assert "| cnn | 32 | 3 | ggn | pyflat |" in (out / "sweep.md").read_text()
    assert f"wrote {out / 'sweep.png'}" in capsys.readouterr().out


def test_batches_past_the_data_set_repeat_the_digits():
    X, y = sweep.batch_of(2000, "image", torch.device("cpu"))
    assert X.shape == (2000, 1, 8, 8) and X.dtype == torch.float32
    assert torch.equal(X[1797:], X[:203]) and torch.equal(y[1797:], y[:203])


def test_quick_and_full_cases():
    assert set(sweep.QUICK["models"]) <= set(sweep.MODELS) == set(sweep.FULL["models"])
    assert len(sweep.QUICK["batches"]) == 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"models": ["resnet"]}, ValueError, "models must be among mlp128, mlp512, cnn"),
    ({"models": []}, ValueError, "models must be among"),
    ({"batches": [0]}, ValueError, "batches must be integers >= 1, got \\[0\\]"),
    ({"ks": [1, 2.5]}, ValueError, "ks must be integers >= 1, got \\[1, 2.5\\]"),
    ({"device": "meta"}, UsageError, "--device meta holds shapes but no values"),
])
def test_sweep_refuses_before_timing(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        sweep.sweep(tmp_path / "sweep", **kwargs)
    assert not (tmp_path / "sweep").exists()
