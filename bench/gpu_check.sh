#!/usr/bin/env bash
# The GPU check, for a fresh GPU machine with no network (torch, numpy, scipy,
# scikit-learn, matplotlib, pytest and pytest-benchmark installed):
#
#   bash bench/gpu_check.sh OUTPUT_DIR
#
# builds pyflat with its CUDA kernels for sm_90 (+PTX), runs the CUDA tests (fused vs
# generic vs reference vs CPU, float32 and float64, odd sizes, k = 1 and 16; convnets
# through the graph engine) and the GPU
# benchmark, and writes logs, JUnit XML, JSON and markdown into OUTPUT_DIR.
# Budget: about 4 minutes on a 16-core H200 machine.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTPUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
status=0

{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo "== build"
  time PYFLAT_CUDA=1 PYFLAT_CUDA_ARCHS="9.0+PTX" \
      python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
} > "$OUT/build.log" 2>&1 || status=1
python -c "import torch, pyflat; assert torch._C._dispatch_has_kernel_for_dispatch_key('pyflat::mlp_forward', 'CUDA'); print('pyflat CUDA kernels registered')" \
    >> "$OUT/build.log" 2>&1 || { echo "build or import failed: see $OUT/build.log"; exit 1; }

timeout 150 python -m pytest -q -m cuda tests/test_cuda.py --junitxml "$OUT/cuda-tests.xml" \
    > "$OUT/cuda-tests.log" 2>&1 || status=1
tail -n 3 "$OUT/cuda-tests.log"

timeout 90 python -m bench.gpu --out "$OUT" > "$OUT/gpu-bench.log" 2>&1 || status=1
cat "$OUT/gpu.md" 2>/dev/null || tail -n 20 "$OUT/gpu-bench.log"
exit $status
