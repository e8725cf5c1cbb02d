"""The public API: every name users import, and the two module entry points."""
import subprocess
import sys

import pytest

import pyflat

PUBLIC = ["GGN", "Hessian", "CurvatureOperator", "LinearCombination", "Restricted", "eigsh",
          "lanczos", "slq", "SpectralDensity", "exact_rank", "hutchinson_trace",
          "hutchpp_trace", "adaptive_trace", "frobenius_norm", "Estimate", "sharpness",
          "SharpnessReport", "validate", "ValidationReport", "set_allow_tf32",
          "get_allow_tf32", "UnsupportedModel", "ops", "reference"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_exported(name):
    assert name in pyflat.__all__
    assert getattr(pyflat, name) is not None


def test_public_modules_import():
    from pyflat import generic, ops, reference
    assert callable(generic.GenericGGN) and callable(reference.ggn_matmat)
    assert callable(ops.mlp_ggn_matmat)
    assert isinstance(pyflat.__version__, str)


@pytest.mark.parametrize("module", ["pyflat", "pyflat.paper"])
def test_module_entry_points_run(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
