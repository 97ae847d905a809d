"""The newcomer's main job and the quality benchmark's CI mode run end to end on CPU."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_demo_runs_in_under_a_minute(tmp_path):
    out, cpu = _run(["-m", "tcpade", "demo", "--out", "demo", "--repeats", "1", "--progress"], tmp_path, timeout=600)
    # the progress bar (its carriage returns read as newlines here): warm-up + 4 methods
    assert "tcpade demo: flux-digits [####" in out and "] 5/5 " in out
    # The bar for a newcomer's first command. The demo runs on one thread, so its CPU
    # time is its wall time on an idle machine (~8 s here, imports included); CPU time, unlike
    # wall time, does not grow when other jobs share the machine.
    assert cpu < 60, f"demo used {cpu:.1f} CPU seconds"
    lines = {
        ln.split()[0]: ln.split()
        for ln in out.splitlines()
        if ln.split()[:1] in (["full"], ["adaptive"], ["slow"], ["fast"])
    }
    assert lines["full"][1] == "20/20" and lines["slow"][1] == "8/20" and lines["fast"][1] == "7/20"
    assert 1 < 20 / int(lines["adaptive"][1].split("/")[0]) < 3
    for name in ("adaptive", "slow", "fast"):
        assert float(lines[name][4]) > 25.0, out  # PSNR against the full run, dB
        assert 0.9 < float(lines[name][5]) <= 1.0, out  # SSIM
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "tsi_fast.png").stat().st_size > 1000


def test_demo_cli_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tcpade", "demo", "--steps", "1"], cwd=tmp_path, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 2 and "--steps must be >= 2" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tcpade", "demo", "--model", "wan-digits"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "the demo draws images; 'wan-digits' makes clips" in proc.stderr


def test_quality_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("cache_dit")
    out, _ = _run([str(ROOT / "bench" / "quality.py"), "--quick", "--out", str(tmp_path)], tmp_path, timeout=600)
    report = (tmp_path / "quality_quick.md").read_text()
    assert "flux-digits" in report and "Pareto front" in report
    rows = (tmp_path / "quality_flux-digits_quick.csv").read_text().splitlines()
    groups = {r.split(",")[2] for r in rows[1:]}
    for g in ("full", "tcpade presets", "tcpade rational/tsi", "tcpade paper/error", "FirstBlockCache", "MagCache"):
        assert g in groups, (g, groups)
    assert any(g.startswith("TaylorSeer") for g in groups) and any(g.startswith("cache-dit") for g in groups)
    assert (tmp_path / "pareto_flux-digits_quick.png").stat().st_size > 1000
