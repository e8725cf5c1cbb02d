"""validate: the fused engine against autograd on a user's model and batch."""
import pytest
import torch

import pyflat

from helpers import ResidualMLP, make_batch, make_mlp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_validate_reports_small_errors_on_a_supported_model(dtype):
    model = make_mlp([6, 9, 4], "silu", dtype=dtype)
    X, y = make_batch(20, 6, 4, dtype=dtype)
    report = pyflat.validate(model, (X, y), k=3)
    assert report.supported and report.ok, str(report)
    assert [r["product"] for r in report.rows] == ["ggn", "hessian"]
    limit = 1e-12 if dtype == torch.float64 else 1e-5
    assert all(r["fused_error"] < limit for r in report.rows)
    assert "hessian" in str(report)


def test_validate_says_when_the_fused_engine_is_not_used():
    report = pyflat.validate(ResidualMLP().double(), make_batch(8, 5, 3))
    assert not report.supported and not report.ok
    assert "unsupported module LayerNorm at 'block.0'" in report.reason
