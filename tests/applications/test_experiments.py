"""The paper's further experiments (pyflat.applications.experiments) at a small size."""
import subprocess
import sys
from pathlib import Path

import torch

from pyflat.applications import experiments
from pyflat.applications.digits import load_digits


def digits(samples):
    return load_digits(samples, shuffle=True, seed=0)


def test_last_layer_scaling_keeps_predictions_and_lowers_curvature():
    data = digits(150)
    model = experiments.trained_mlp(data, width=8, steps=600)
    result = experiments.last_layer_scaling(data, alphas=(1, 2, 4), model=model)
    assert result["all_correct"]  # the claim's condition: every training point classified
    rows = result["rows"]
    assert all(r["same_predictions"] for r in rows)
    for key in ("loss", "ggn_top", "ggn_trace", "hessian_top", "hessian_trace"):
        values = [r[key] for r in rows]
        assert values[0] > values[1] > values[2] > 0, (key, values)


def test_logistic_regression_rank_gap_at_the_predicted_rank():
    result = experiments.logistic_regression_rank(digits(120), steps=20)
    assert result["predicted"] == (result["classes"] - 1) * result["rank_design"]
    assert result["predicted"] < result["parameters"]
    # nonzero eigenvalues up to the predicted rank, round-off past it
    assert result["relative_eigenvalue_at_predicted"] > 1e3 * result["relative_eigenvalue_after"]
    assert result["relative_eigenvalue_after"] < 1e-13
    assert max(result["rank_at"].values()) <= result["predicted"]


def test_outliers_reports_the_top_of_the_spectrum():
    data = digits(200)
    model = experiments.trained_mlp(data, width=8, steps=200, weight_decay=0.01)
    result = experiments.outliers(data, k=12, model=model)
    assert len(result["top"]) == 12 and result["top"] == sorted(result["top"], reverse=True)
    assert 1 <= result["largest_gap_after"] < 12 and result["gap_ratio"] > 1


def test_trained_mlp_is_a_seeded_tanh_mlp_in_eval_mode():
    data = digits(60)
    a = experiments.trained_mlp(data, width=4, steps=5, seed=3)
    b = experiments.trained_mlp(data, width=4, steps=5, seed=3)
    assert not a.training and a[0].weight.dtype == torch.float64
    assert [tuple(p.shape) for p in a.parameters()] == [(4, 64), (4,), (10, 4), (10,)]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_pytest_benchmark_suite_collects_every_case():
    root = Path(__file__).resolve().parents[2]
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "bench/test_benchmarks.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    cases = [line for line in listing.splitlines() if "::test_single_product[" in line]
    assert len(cases) == 3 * 6, listing  # 3 models x 6 (product, method) pairs
