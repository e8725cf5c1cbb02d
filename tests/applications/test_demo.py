"""The demo end to end at a small size: its tables, demo.json, the plots, and the L2 view."""
import json
from types import SimpleNamespace

import pytest

from pyflat.applications.demo import demo, with_l2
from pyflat.applications.usage import UsageError

SMALL = {"weight_decays": [0.0, 0.01], "steps": 60, "width": 8, "train_size": 300,
         "trace_products": 30, "frobenius_probes": 10, "slq_probes": 4, "slq_steps": 30}


def test_demo_writes_tables_json_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo(out, **SMALL)
    text = capsys.readouterr().out
    assert "scikit-learn digits: 300 train / 1497 test images (8x8), float64" in text
    assert "logistic regression 64-10, 650 parameters" in text
    assert "MLP 64-8-10 (tanh), 610 parameters" in text and "CE+L2" in text
    result = json.loads((out / "demo.json").read_text())
    assert result == json.loads(json.dumps(summary))  # what it returns is what it writes
    assert result["data"] == {"name": "scikit-learn digits", "train": 300, "test": 1497}
    assert result["settings"]["weight_decays"] == [0.0, 0.01]
    assert [(r["model"], r["weight_decay"]) for r in result["runs"]] == [
        ("logreg", 0.0), ("logreg", 0.01), ("mlp", 0.0), ("mlp", 0.01)]
    for run in result["runs"]:
        assert (out / run["density_png"]).stat().st_size > 0
        for curvature in ("ggn", "hessian"):
            ce = run["curvature"][curvature]["cross_entropy"]
            l2 = run["curvature"][curvature]["with_l2"]
            P = ce["num_params"]
            # the L2 view is the CE operator shifted by mu
            assert l2["trace"] == pytest.approx(ce["trace"] + run["weight_decay"] * P)
            assert ce["spectral_norm"] > 0 and 0 <= ce["rank"]["rank"] <= P
        assert 0.5 < run["test_accuracy"] <= 1.0
    # the same initialisation for every weight decay: L2 keeps the weights smaller
    norms = {(r["model"], r["weight_decay"]): r["param_norm"] for r in result["runs"]}
    assert norms[("mlp", 0.01)] < norms[("mlp", 0.0)]


def test_demo_is_reproducible(tmp_path, capsys):
    small = {**SMALL, "weight_decays": [0.01], "steps": 10}
    first, second = demo(tmp_path / "a", **small), demo(tmp_path / "b", **small)
    for a, b in zip(first["runs"], second["runs"]):
        assert a["curvature"] == b["curvature"] and a["param_norm"] == b["param_norm"]


def test_demo_refuses_a_train_size_without_test_images_before_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(UsageError, match="--train-size must leave test images: at most 1796 "
                                         "of the 1,797 digits, got 1797"):
        demo(out, **{**SMALL, "train_size": 1797})
    assert not out.exists() and capsys.readouterr().out == ""


def test_with_l2_shifts_the_cross_entropy_measures_by_mu():
    report = SimpleNamespace(num_params=10, top_eigenvalues=[3.0, 2.0], min_eigenvalue=-5.0,
                             frobenius=6.0, trace=4.0, rank={"rank": 7.0})
    shifted = with_l2(report, 0.5)
    assert shifted["spectral_norm"] == 4.5  # |-5 + 0.5| beats 3 + 0.5
    assert shifted["trace"] == 4.0 + 0.5 * 10
    assert shifted["frobenius"] == pytest.approx((36 + 2 * 0.5 * 4 + 0.25 * 10) ** 0.5)
    assert shifted["rank"] == 10.0
    assert with_l2(report, 0.0)["rank"] == 7.0
