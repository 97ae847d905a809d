"""The benchmark scripts: their math is the library's math, and their CPU / dry modes run.

* the "same math" contenders (eager and torch.compile) of bench/_bench_common.py equal
  tcpade.core.reference, and the published code's unfused sequence computes the paper predictor
  and TSI that the reference does (on finite data), so the timings compare like with like;
* the hidden-state shapes come out of the real configs as the README states them;
* bench_predict.py's CPU mode, bench_cpu.py --quick and gpu_check.py --dry (every section:
  correctness, microbenchmarks, end to end through tcpade.apply on tiny FLUX/Wan/DiT) run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import _bench_common as B  # noqa: E402

from tcpade import coef as K  # noqa: E402  # noqa: E402
from tcpade import reference  # noqa: E402  # noqa: E402


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_shapes_from_the_real_configs():
    # FLUX 1024^2: 64x64 packed latent tokens x 3072; 512^2: 32x32; Wan 480p 81 frames: latent
    # 21 x 60 x 104, patches 1x2x2 -> 21*30*52 tokens x 1536; DiT 256^2: 16x16 patches x 1152, CFG batch 2.
    assert B.SHAPES == {
        "flux1024": (1, 4096, 3072),
        "flux512": (1, 1024, 3072),
        "wan480p81f": (1, 32760, 1536),
        "dit256cfg2": (2, 256, 1152),
    }
    assert B.wan_latent(81, 480, 832) == (21, 60, 104)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_math_equals_reference(dtype):
    """Eager/compiled contenders vs tcpade.core.reference (both fp32 arithmetic): the same math,
    so equal to fp32 rounding (1e-5 relative: a few roundings of O(1) values)."""
    shape = (2, 5, 33)
    for case in B.ALL_CASES.values():
        for stage in K.STAGES:
            x = B.make_inputs(case, shape, dtype, "cpu", seed=3)
            y = B.make_inputs(case, shape, dtype, "cpu", seed=3)
            if case.op == "update":
                for probe in (False, True):
                    got = B.math_update(x.h_in, x.h_out, x.ring, B.SLOTS, probe)
                    want = reference.update(y.h_in, y.h_out, y.ring, torch.tensor(B.SLOTS), None, probe)
                    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(x.ring, y.ring, rtol=0, atol=0)
                continue
            cf = K.build_coef(case.variant, stage, B.TIMES, B.T_TARGET, 3, 3, gamma=case.gamma, kappa=0.5)
            out, sums = B.math_predict(x.h_in, x.ring, B.SLOTS, tuple(cf), x.h_prev, case.variant, case.store)
            ref_out, ref_sums = reference.predict(
                y.h_in, y.ring, torch.tensor(B.SLOTS), torch.tensor(cf), y.h_prev, case.variant, case.store, True
            )
            tol = 1e-5 if dtype == torch.float32 else 2.0**-8
            torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(sums.float(), ref_sums.float(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(x.ring.float(), y.ring.float(), rtol=tol, atol=tol)


def test_published_sequence_computes_the_paper_math():
    """The published-style sequence (list history, host-side checks) predicts what
    tcpade.core.reference's paper variant predicts with the paper's store + input correction,
    and its TSI is tsi_from_sums of the update sums."""
    shape = (1, 16, 48)
    case = B.ALL_CASES["paper+"]
    for stage in K.STAGES:
        x = B.make_inputs(case, shape, torch.float32, "cpu", seed=5)
        y = B.make_inputs(case, shape, torch.float32, "cpu", seed=5)
        out = B.published_predict(x.h_in, x.h_prev, x.hist, stage)
        cf = K.build_coef("paper", stage, B.TIMES, B.T_TARGET, 3, 3, gamma=K.PAPER_GAMMA)
        ref_out, _ = reference.predict(y.h_in, y.ring, torch.tensor(B.SLOTS), torch.tensor(cf), y.h_prev, "paper", True,
                                       True, torch.float64)  # fmt: skip
        torch.testing.assert_close(out.double(), ref_out.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.hist[-1].double(), y.ring[B.SLOTS[-1]].double(), rtol=1e-5, atol=1e-5)
    x = B.make_inputs(B.ALL_CASES["update"], shape, torch.float32, "cpu", seed=6)
    ring64 = x.ring.double()
    sums = reference.update(x.h_in.double(), x.h_out.double(), ring64, torch.tensor(B.SLOTS), None, False,
                            torch.float64)  # fmt: skip
    tsi = B.published_update(x.h_in, x.h_out, x.hist)
    # reference d1 = R1 - R2 (old), d2 = R_new - R1; the published code's u1, u2 are the same pair.
    assert abs(tsi - reference.tsi_from_sums(sums.tolist())) < 1e-5


def test_bench_predict_cpu_mode(capsys):
    import bench_predict

    args = ["--device", "cpu", "--quick", "--dtypes", "bf16", "--providers", "tcpade,eager,published"]
    assert bench_predict.main(args + ["--variants", "paper+,rational", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | small | paper+ |" in out and "| bf16 | odd | rational |" in out


def test_bench_cpu_quick():
    from tcpade import ops

    if not ops.native_available():
        pytest.skip("C++ extension not built")
    out = _run(["bench/bench_cpu.py", "--quick"])
    assert "| float32 | update |" in out and "| bfloat16 | predict paper |" in out


def test_gpu_check_dry_run(tmp_path):
    """gpu_check.py --dry: every section of the GPU script on CPU, tiny shapes and models."""
    pytest.importorskip("diffusers")
    out = _run(["bench/gpu_check.py", "--dry", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["correctness"]["checks"] > 500 and not res["correctness"]["failed"]
    cases = {r["case"] for r in res["micro"]}
    assert cases == set(B.ALL_CASES)
    assert any("compiled" in r for r in res["micro"]) and any("published" in r for r in res["micro"])
    models = {m["model"]: m for m in res["e2e"]}
    assert len(models) == 3 and not any("error" in m for m in models.values()), out[-3000:]
    for m in models.values():
        # The presets' budgets at 20 steps: slow 8, fast 7 computed passes per branch.
        assert set(m["slow"]["computed"].values()) == {8} and set(m["fast"]["computed"].values()) == {7}
        assert m["fast"]["h_in_shape_ok"] and not m["fast"]["nonfinite"]
    assert "| target | measured | wanted |" in out


def _row(group, label, steps, speedup, psnr):
    return dict(model="m", steps=steps, group=group, label=label, knobs="", passes="", share=1 / speedup,
                speedup=speedup, wall_speedup=speedup, psnr=psnr, ssim=1.0, acc=1.0, fd=0.0)  # fmt: skip


def test_quality_preset_margins():
    """The margins table judges presets only (a better tcpade sweep point does not count), takes the best
    peer of any group at each level, and lists every miss: a level no preset reaches, a margin under 2 dB."""
    import quality

    rows = [
        _row("full", "full", 20, 1.0, 100.0),
        _row(quality.PRESET_GROUP, "slow", 20, 2.22, 45.0),
        _row(quality.PRESET_GROUP, "fast", 20, 20 / 7, 40.0),
        _row("tcpade rational/tsi", "sweep", 20, 20 / 7, 60.0),
        _row("TaylorSeer (lite)", "ts", 20, 2.5, 41.0),
        _row("cache-dit mask", "mask", 20, 2.0, 43.5),
        _row("MagCache", "mag", 20, 1.5, 70.0),  # reaches no level
    ]
    lines, misses = quality.preset_margins(rows, "m", 20)
    assert len(lines) == 3
    # 2x: slow 45.0 vs mask 43.5 (the ts point at 2.5x is lower) -> +1.50 dB, a miss
    assert "| 2x | 45.00 (slow, x2.22) | 43.50 (mask, x2.00) | +1.50 dB | **miss** |" in lines[0]
    # 2.5x: only fast reaches it among the presets: 40.0 vs ts 41.0
    assert "40.00 (fast" in lines[1] and "41.00 (ts" in lines[1] and "-1.00 dB" in lines[1]
    # 2.9x (20/7, read back rounded): fast against no peer
    assert "met (no peer)" in lines[2]
    assert len(misses) == 2 and all(m.startswith("MISS m 20 steps") for m in misses)
    rows.append(_row("TaylorSeer (lite)", "ts3", 20, 3.0, 30.0))
    lines, misses = quality.preset_margins(rows, "m", 20)
    assert "+10.00 dB | met |" in lines[2] and len(misses) == 2
    # 50 steps: five levels; no preset at 4x is a miss
    rows50 = [_row(quality.PRESET_GROUP, "fast", 50, 3.3, 50.0), _row("FirstBlockCache", "f", 50, 4.2, 20.0)]
    lines, misses = quality.preset_margins(rows50, "m", 50)
    assert [ln.split(" | ")[2] for ln in lines] == ["2x", "2.5x", "2.9x", "3x", "4x"]
    assert "no preset reaches it" in lines[4] and misses[-1] == "MISS m 50 steps 4x: no preset reaches 4x"


def test_quality_report_and_eval_set(tmp_path):
    import quality

    rows = {"flux-digits": [_row("full", "full", 20, 1.0, 100.0), _row(quality.PRESET_GROUP, "fast", 20, 2.9, 40.0),
                            _row("cache-dit mask+DMD", "mask 7/20 w=3 DMD6", 20, 2.9, 39.0)]}  # fmt: skip
    for r in rows["flux-digits"]:
        r["model"] = "flux-digits"
    meta = dict(machine="cpu", threads=1, torch="t", tcpade="v", date="d", commands=["python bench/quality.py x"],
                samples={"flux-digits": {"20": 10}}, judges={"flux-digits": 1.0}, note="Reduced run.")  # fmt: skip
    path, _ = quality.write_report(str(tmp_path), "", meta, rows)
    text = open(path).read()
    assert "Reduced run." in text and "10 at 20 steps samples per method" in text
    assert "## The presets against the best peer" in text and "Misses (marked in the table): 3 of 3." in text
    assert "| flux-digits | 20 | 2x | 40.00 (fast, x2.90) | 39.00 (mask 7/20 w=3 DMD6, x2.90) | +1.00 dB | **miss** |" in text
    assert "All runs" not in text  # every run is in the CSV, not repeated in the markdown
    summary = quality.render_summary(str(tmp_path), "", meta, rows)
    assert "| flux-digits | 20 | **+1.00 (fast) miss** | **+1.00 (fast) miss** | **+1.00 (fast) miss** |" in summary
    assert "Goal met at 0 of 3 points; 3 misses." in summary and "1. `python bench/quality.py x`" in summary
    assert "![flux-digits: PSNR against speedup](pareto_flux-digits.png)" in summary
    seeds, labels = quality.eval_set("flux-digits", False, samples=7)
    assert labels == list(range(7)) and len(seeds) == 7  # classes in turn
    assert quality.eval_set("dit-faces", False)[1][:4] == [0, 1, 0, 1]
    assert [label for label, _ in quality.PRESETS] == ["slow", "fast", "paper", "adaptive", "slow(speedup=2)",
                                                        "fast(passes=16)", "fast(passes=12)"]  # fmt: skip
    assert quality.PRESET_STEPS == {"fast(passes=16)": (50,), "fast(passes=12)": (50,)}


def test_quality_summary_reproduces_the_committed_page(tmp_path):
    """bench/results/SUMMARY.md and quality.md are generated from the committed CSVs (and quality_meta.json,
    and the machine / command lines of calibration.md and predictors.md): ``--summary-only`` and the report
    writer reproduce them byte for byte, so neither page can drift from the data; the summary's counts agree
    with the reports it summarises, and every miss is in it."""
    import re
    import shutil

    import quality

    res = ROOT / "bench" / "results"
    names = [p.name for p in res.glob("quality_*.csv")] + ["quality_meta.json", "calibration.csv", "calibration.md",
                                                            "predictors.csv", "predictors.md", "defaults.csv",
                                                            "self_calibration.csv"]  # fmt: skip
    for name in names:
        shutil.copy(res / name, tmp_path / name)
    quality.main(["--summary-only", "--out", str(tmp_path)])
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert summary == (res / "SUMMARY.md").read_text(), "run: python bench/quality.py --summary-only"
    meta = json.loads((res / "quality_meta.json").read_text())
    results = {n: quality.read_csv(str(res / f"quality_{n}.csv")) for n in quality.zoo.names()
               if (res / f"quality_{n}.csv").exists()}  # fmt: skip
    quality.write_report(str(tmp_path), "", meta, results)
    report = (tmp_path / "quality.md").read_text()
    assert report == (res / "quality.md").read_text(), "run: python bench/quality.py --report-only"
    # every miss of quality.md's margins table is a bold miss cell of the summary
    n_miss, n_all = map(int, re.search(r"Misses \(marked in the table\): (\d+) of (\d+)\.", report).groups())
    cells = [c for line in summary.split("## Pareto")[0].splitlines() if line.startswith("| ") and "|---" not in line
             for c in line.strip("|").split("|")[2:]]  # fmt: skip
    assert sum("miss" in c or "no preset" in c for c in cells) == n_miss
    assert f"Goal met at {n_all - n_miss} of {n_all} points; {n_miss} misses." in summary
    cal = re.search(r"Met at (\d+) of (\d+) points\.", (res / "calibration.md").read_text()).groups()
    assert "Goal met at {} of {} points.".format(*cal) in summary
    pred = re.search(r"on (\d+) of (\d+) schedules", (res / "predictors.md").read_text()).groups()
    assert "Within 0.5 dB on {} of {} schedules.".format(*pred) in summary
    for png in re.findall(r"\]\((pareto_[^)]+\.png)\)", summary):
        assert (res / png).exists(), png


def test_self_calibration_report_reproduces_the_committed_page(tmp_path):
    """bench/results/self_calibration.md is generated from its CSV (and meta): ``--report-only``
    reproduces it byte for byte; its count of points at the goal is the one SUMMARY.md quotes, and
    every row's margin is its PSNR minus the best peer's."""
    import csv
    import re
    import shutil

    import self_calibration as SC

    res = ROOT / "bench" / "results"
    for name in ("self_calibration.csv", "self_calibration_meta.json"):
        shutil.copy(res / name, tmp_path / name)
    SC.main(["--report-only", "--out", str(tmp_path)])
    page = (tmp_path / "self_calibration.md").read_text()
    assert page == (res / "self_calibration.md").read_text(), "run: python bench/self_calibration.py --report-only"
    met, total = map(int, re.search(r"Goal met at (\d+) of (\d+) points", page).groups())
    assert f"Goal met at {met} of {total} points" in (res / "SUMMARY.md").read_text()
    rows = list(csv.DictReader(open(res / "self_calibration.csv")))
    assert total == len(rows) and met == sum(float(r["margin"]) >= SC.GOAL_DB for r in rows)
    for r in rows:
        assert abs(float(r["psnr"]) - float(r["peer"]) - float(r["margin"])) < 1e-3, r
        assert len(r["schedule"].split()) == int(r["passes"]), r
        if r["verdict"] != "calibrated":  # a search that lost its held-out check leaves the spaced rule
            assert r["psnr"] == r["psnr_spaced"], r


def test_self_calibration_runs_as_a_user_would(tmp_path):
    """One real point of bench/self_calibration.py (flux-digits, 10 steps): the trace search on the
    user's inputs, cal.register(), the presets as a user takes them (the script checks that each
    ran the schedule the calibration gives at the level's pass count), the zoo's shipped schedules
    out of it and back afterwards. Where the run chose the committed schedule, its PSNR matches the
    committed row to 0.05 dB (16 samples; matmul order differs across CPUs and thread counts by
    ~1e-6 relative, far below that; a different held-out decision changes the schedule and is
    only compared by shape)."""
    import csv

    import self_calibration as SC

    from tcpade.policy import schedules as S

    threads = torch.get_num_threads()
    try:
        SC.main(["--models", "flux-digits", "--steps", "10", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # (the script runs on 1 thread, as the benchmark did)
    rows = list(csv.DictReader(open(tmp_path / "self_calibration.csv")))
    assert [r["tag"] for r in rows] == ["2x", "2.5x", "2.9x"]
    assert [r["preset"] for r in rows] == ["slow(speedup=2)", "slow", "fast"]
    assert [int(r["passes"]) for r in rows] == [5, 4, 3]
    committed = {(r["model"], r["steps"], r["tag"]): r for r in csv.DictReader(open(ROOT / "bench" / "results" /
                                                                                     "self_calibration.csv"))}  # fmt: skip
    for r in rows:
        assert r["verdict"] in ("calibrated", "spaced rule"), r
        c = committed[(r["model"], r["steps"], r["tag"])]
        if r["schedule"] == c["schedule"]:
            assert abs(float(r["psnr"]) - float(c["psnr"])) < 0.05, (r, c)
    assert (tmp_path / "self_calibration.md").exists() and (tmp_path / "self_calibration_meta.json").exists()
    assert S.lookup(__import__("tcpade").zoo.load("flux-digits").transformer, "linear")  # the shipped ones are back
    with pytest.raises(SystemExit):
        SC.main(["--inputs", "1", "--out", str(tmp_path)])
