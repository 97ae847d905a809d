"""The benchmark scripts keep running (their quick/dry modes, on tiny shapes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_cpu_quick():
    from tcpade import ops

    if not ops.native_available():
        pytest.skip("C++ extension not built")
    out = _run(["bench/bench_cpu.py", "--quick"])
    assert "| float32 | update |" in out and "| bfloat16 | predict paper |" in out


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = _run(["bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert "| bf16 | rational |" in out and (tmp_path / "gpu_check.json").exists()
