#!/usr/bin/env bash
# Sets up a virtual environment in .venv and builds pyflat into it, from nothing.
#
#   bash scripts/setup.sh              # CPU torch 2.13.0, extension built in place
#   PYFLAT_TORCH=torch==2.14.1 VENV=.venv-cuda bash scripts/setup.sh   # a CUDA build of torch
#
# Environment: VENV (default .venv), PYTHON (default python3), PYFLAT_TORCH (the torch
# requirement, default torch==2.13.0), and the build switches of setup.py (PYFLAT_CUDA,
# PYFLAT_CUDA_ARCHS, PYFLAT_CXX_STD).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_REQ=${PYFLAT_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
# scikit-learn ships the handwritten digits used by the benchmark and examples;
# scipy gives eigsh for to_scipy(); matplotlib draws density plots; tqdm shows progress of
# long runs; pytest-benchmark times bench/.
python -m pip install -q "$TORCH_REQ" numpy scipy scikit-learn matplotlib tqdm ninja pytest \
    pytest-benchmark
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import pyflat, torch; print('pyflat', pyflat.__version__, 'built against torch', torch.__version__)"
