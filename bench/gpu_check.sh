#!/usr/bin/env bash
# The one prepared call for a lent GPU (see ../shared/gpu.md): install, the whole test
# suite (CUDA cases included), then the full-size kernel check and timings. Logs and
# gpu_check.json go to $OUT; a short table is printed last.
set -u -o pipefail
OUT=${OUT:-/tmp/tcpade_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  echo "pip install -e . failed (install.log); running from the source tree"
  ln -sfn ../kernels tcpade/kernels
  python3 setup.py -q build_ext --inplace >>"$OUT/install.log" 2>&1 || echo "C++ extension not built"
  export PYTHONPATH=$PWD
fi
python3 -m pytest tests -q -p no:cacheprovider --maxfail=25 2>&1 | tee "$OUT/pytest.log" | tail -n 30
python3 bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -n 40
