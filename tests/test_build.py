"""The build switches of setup.py: PYFLAT_CUDA=1 refuses a CPU torch with a clear message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_setup(**env):
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_cuda_demanded_on_cpu_torch_fails_clearly():
    result = run_setup(PYFLAT_CUDA="1")
    if torch.version.cuda is None:
        assert result.returncode != 0
        assert "PYFLAT_CUDA=1 but the installed torch" in result.stderr
        assert "is a CPU build" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "building with CUDA" in result.stderr


@pytest.mark.parametrize("value", ["yes", "2"])
def test_bad_cuda_switch_is_refused(value):
    result = run_setup(PYFLAT_CUDA=value)
    assert result.returncode != 0
    assert f"PYFLAT_CUDA must be unset, 0 or 1; got '{value}'" in result.stderr


def test_cuda_off_builds_cpu_only():
    result = run_setup(PYFLAT_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert "building with CUDA" not in result.stderr


@pytest.mark.skipif(sys.platform != "linux" or
                    "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch runs its CPU threads on OpenMP only in its Linux builds")
def test_extension_runs_its_loops_on_torchs_openmp_threads():
    # at::parallel_for is a header template: built without OpenMP, every CPU loop of the
    # extension would run on one thread; with it, the module imports OpenMP's entry point
    import pyflat._C

    assert b"GOMP_parallel" in Path(pyflat._C.__file__).read_bytes()
