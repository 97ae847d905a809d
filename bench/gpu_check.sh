#!/usr/bin/env bash
# The one prepared call for a lent GPU, about 6 minutes on an H100:
#   bash bench/gpu_check.sh                    # on the GPU machine, from the repository root
# It installs what the machine lacks (diffusers and its one missing need, carried as wheels in
# the git-ignored .whl/, see below), installs tcpade without the C++ extension (the GPU path is
# Triton), then runs bench/gpu_check.py: CUDA correctness of every op, the kernel
# microbenchmarks, full-size FLUX.1-dev / Wan2.1-1.3B / DiT-XL/2 end-to-end timings and the
# targets, met or not; its short summary is printed last. Logs, gpu_check.json and
# gpu_check.md go to $OUT (or /tmp/tcpade_gpu).
#
# Environment: TCPADE_GPU_TESTS=1 also runs the CUDA cases of the test suite first (adds a
# few minutes, bench/RESULTS.md); GPU_CHECK_ARGS passes options to
# gpu_check.py (e.g. "--full" or "--skip e2e").
#
# Wheels, fetched on a machine with network access (the GPU machine has none), then named in
# the device call's carry list (".whl"):
#   bash bench/gpu_check.sh --fetch-wheels
set -u -o pipefail
if [ "${1:-}" = "--fetch-wheels" ]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
fi
OUT=${OUT:-/tmp/tcpade_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/install.log" 2>&1 || echo "wheel install failed (install.log)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "diffusers is missing and there is no .whl/ (bash bench/gpu_check.sh --fetch-wheels, then carry .whl):" \
      "the end-to-end section will report an error"
  fi
fi
# The C++ extension is for CPUs; skipping its build saves ~30 s of the budget.
export TCPADE_NO_NATIVE=1
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/install.log" 2>&1; then
  echo "pip install -e . failed (install.log); running from the source tree"
  ln -sfn ../kernels/tcpade_kernels tcpade/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${TCPADE_GPU_TESTS:-0}" = "1" ]; then
  python3 -m pytest tests -q -p no:cacheprovider --maxfail=25 -k cuda 2>&1 | tee "$OUT/pytest.log" | tail -n 15
fi
# shellcheck disable=SC2086
python3 bench/gpu_check.py --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log" | tail -n 120
