"""tcpade.calibrate: the schedule search on a trained zoo model, a tiny pipeline and a bare
transformer; the JSON round trip; the command line.

Short runs (T = 4 to 7, one input) keep this to a few seconds: the search's cost grows
with T^2 (exact greedy) or about T (lazy), not with anything these tests would gain from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tcpade
from tcpade import metrics, schedules, zoo
from tcpade.config import TCPadeConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry():
    schedules.clear(shipped=False)
    yield
    schedules.clear()


@pytest.fixture(scope="module")
def flux():
    return zoo.load("flux-digits")


@pytest.mark.parametrize("method", ["lazy", "greedy"])
def test_greedy_removal_returns_nested_schedules_with_the_requested_passes(flux, method):
    cal = tcpade.calibrate(flux, [(5, 3)], passes=3, steps=6, method=method, progress=False)
    assert cal.passes == 3 and len(cal.schedule()) == 3 and cal.schedule()[:2] == (0, 1)
    assert sorted(cal.schedules) == list(range(3, 7))
    for p in range(3, 6):  # each pass count drops one step of the one above it
        assert set(cal.schedules[p]) < set(cal.schedules[p + 1]) and len(cal.schedules[p]) == p
    assert cal.curve()[0] == (6, metrics.PSNR_CAP)
    # cost: one full run, then (exact greedy) every candidate every round; lazy measures fewer
    if method == "greedy":
        assert cal.runs == 1 + 4 + 3 + 2
    else:
        assert 1 + 4 <= cal.runs <= 1 + 4 + 3 + 2


def test_refine_returns_the_requested_pass_counts_and_their_measured_psnr(flux):
    cal = tcpade.calibrate(flux, [(5, 3)], passes=[4, 3], steps=7, progress=False)
    assert cal.method == "refine" and cal.passes == 3 and sorted(cal.schedules) == [3, 4]
    ref = flux.sample([5], [3], steps=7)
    for p in (3, 4):
        assert len(cal.schedules[p]) == p and cal.schedules[p][:2] == (0, 1)
        # the reported calibration PSNR is what the schedule gives when run again (deterministic),
        # and no worse than the spaced rule's, where the search starts
        out, summ = flux.sample([5], [3], steps=7, config=cal.config(p), return_summary=True)
        assert summ.computed("cond") == list(cal.schedules[p])
        assert float(metrics.psnr(out, ref).mean()) == pytest.approx(cal.psnr[p], abs=1e-9)
        spaced = flux.sample([5], [3], steps=7, config=TCPadeConfig.budget(passes=p, use_calibrated=False))
        assert cal.psnr[p] >= float(metrics.psnr(spaced, ref).mean())
    assert cal.model == schedules.model_key(flux.transformer) and cal.name == "flux-digits"
    assert cal.runs > 1 and cal.calls > 7


def test_speedup_and_bad_arguments(flux):
    cal = tcpade.calibrate(flux, [0], speedup=2.0, steps=4, progress=False)
    assert cal.passes == 2 and cal.schedule() == (0, 1)
    with pytest.raises(ValueError, match="exactly one"):
        tcpade.calibrate(flux, [0], steps=6)
    with pytest.raises(ValueError, match="passes"):
        tcpade.calibrate(flux, [0], passes=1, steps=6)
    with pytest.raises(ValueError, match="method"):
        tcpade.calibrate(flux, [0], passes=3, steps=6, method="dp")
    with pytest.raises(ValueError, match="sequence of ints"):
        tcpade.calibrate(flux, [0], passes=[3, 2.5], steps=6)
    with pytest.raises(ValueError, match="start"):
        tcpade.calibrate(flux, [0], passes=3, steps=6, method="lazy", start=(1, 2, 3))
    with pytest.raises(ValueError, match="at least one"):
        tcpade.calibrate(flux, [], passes=3, steps=6)
    with pytest.raises(TypeError, match="zoo model, a diffusers pipeline or a transformer"):
        tcpade.calibrate(object(), [0], passes=3, steps=6)


def test_save_load_round_trip_reproduces_the_decisions(flux, tmp_path, registry):
    cal = tcpade.calibrate(flux, [(1, 2)], passes=[4, 3], steps=6, progress=False)
    path = tmp_path / "s.json"
    cal.save(str(path))
    doc = json.loads(path.read_text())
    assert doc["format"] == "tcpade-schedules" and doc["entries"][0]["model"] == cal.model
    # merge: another T for the same model is added, the same T replaced
    cal5 = tcpade.calibrate.Calibration(model=cal.model, predictor="rational", steps=5, schedules={3: (0, 1, 3)},
                                        psnr={3: 30.0}, passes=3)  # fmt: skip
    tcpade.calibrate.save(str(path), cal5, cal)
    assert sorted(e["steps"] for e in json.loads(path.read_text())["entries"]) == [5, 6]

    schedules.clear(shipped=False)
    _, before = flux.sample([3], [1], steps=6, config=TCPadeConfig.budget(passes=3), return_summary=True)
    assert before.computed("cond") == list(schedules.spaced(6, 3)) and "spaced rule" in str(before)
    loaded6, loaded5 = sorted(tcpade.calibrate.load(str(path)), key=lambda c: -c.steps)
    assert loaded6.schedules == cal.schedules and loaded6.psnr == pytest.approx(cal.psnr, abs=1e-3)
    assert loaded5.schedules == cal5.schedules
    for T, c in ((6, cal), (5, cal5)):
        for p in c.schedules:
            _, summ = flux.sample([3], [1], steps=T, config=TCPadeConfig.budget(passes=p), return_summary=True)
            assert summ.computed("cond") == list(c.schedules[p]), (T, p)
            assert "schedule: calibrated" in str(summ)
    with pytest.raises(ValueError, match="tcpade schedules file"):
        (tmp_path / "bad.json").write_text("{}")
        tcpade.calibrate.load(str(tmp_path / "bad.json"))


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()  # fmt: skip


def test_calibrate_pipeline_and_bare_transformer_with_cfg(registry):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=1, sample_size=8)  # fmt: skip
    pipe = DiTPipeline(transformer=_tiny_dit(), vae=vae, scheduler=DDIMScheduler())
    cal = tcpade.calibrate(pipe, [dict(class_labels=[1], seed=0, guidance_scale=1.0)], passes=3, steps=5,
                           progress=False)  # fmt: skip
    assert len(cal.schedule()) == 3 and cal.extra["branches"] == 1
    assert not hasattr(pipe.transformer, "_tcpade_runtime")  # removed again after every run

    # bare transformer, CFG as two calls: two branches, each with the schedule's passes
    tr = _tiny_dit()
    g = torch.Generator().manual_seed(3)
    inp = dict(latents=torch.randn(1, 4, 8, 8, generator=g), cond=dict(class_labels=torch.tensor([2])),
               uncond=dict(class_labels=torch.tensor([9])), guidance_scale=3.0)  # fmt: skip
    cal = tcpade.calibrate(tr, [inp], passes=3, steps=5, noise_scheduler=DDIMScheduler(), progress=False)
    assert cal.extra["branches"] == 2 and len(cal.schedule()) == 3
    _, summ = tcpade.sample(tr, DDIMScheduler(), steps=5, config=cal.config(), return_summary=True, **inp)
    assert summ.computed("cond") == summ.computed("uncond") == list(cal.schedule())
    with pytest.raises(TypeError, match="noise_scheduler"):
        tcpade.calibrate(tr, [inp], passes=3, steps=5)


def test_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, "-m", "tcpade.calibrate", "flux-digits", "--steps", "5", "--passes", "4,3",
                           "--seeds", "0", "--out", str(out), "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 passes" in proc.stdout and "RuntimeWarning" not in proc.stderr
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["name"] == "flux-digits" and entry["steps"] == 5 and entry["method"] == "refine"
    assert sorted(entry["schedules"]) == ["3", "4"] and len(entry["schedules"]["3"]) == 3
    bad = subprocess.run([sys.executable, "-m", "tcpade.calibrate", "no-such-model", "--passes", "3"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "neither a zoo model" in bad.stderr


def test_add_cli_registers_a_subcommand():
    import argparse

    from tcpade import calibrate as cal_module

    p = argparse.ArgumentParser()
    cal_module.add_cli(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["calibrate", "flux-digits", "--passes", "7", "--steps", "20"])
    assert args.func is cal_module.run_cli and args.passes == "7" and args.speedup is None
    assert cal_module.run_cli(p.parse_args(["calibrate", "flux-digits", "--passes", "7,x"])) == 2


def _cal(model, predictor, psnr, steps=6):
    reuse = predictor == "reuse"  # (reuse needs only step 0 computed before its first skip)
    sched = {3: (0, 2, 4) if reuse else (0, 1, 4), 4: (0, 2, 3, 5) if reuse else (0, 1, 3, 5)}
    return tcpade.calibrate.Calibration(model=model, predictor=predictor, steps=steps, schedules=sched,
                                        psnr={3: psnr[0], 4: psnr[1]}, passes=3)  # fmt: skip


def test_calibrated_predictor_takes_the_best_scored_predictor(flux, registry):
    """``calibrated_predictor`` (set by slow() / fast()): the predictor whose calibrations of this
    model have the higher mean calibration PSNR over the (T, passes) they share replaces the
    config's; an explicit predictor, or a model calibrated for one predictor only, keeps it."""
    key = schedules.model_key(flux.transformer)
    _cal(key, "rational", (30.0, 35.0)).register()
    assert schedules.best_predictor(flux.transformer) is None  # one predictor: nothing to choose
    _cal(key, "reuse", (33.0, 34.0)).register()  # mean 33.5 > 32.5
    _cal(key, "linear", (20.0, 40.0), steps=7).register()  # no (T, passes) shared with the others
    _cal(key, "linear", (31.0, 33.0)).register()  # mean 32.0
    assert schedules.best_predictor(flux.transformer) == "reuse"
    cfg = TCPadeConfig.budget(passes=3, calibrated_predictor=True)
    resolved = schedules.resolve(cfg, flux.transformer)
    assert resolved.predictor == "reuse" and (6, (0, 2, 4)) in resolved.calibrated
    _, summ = flux.sample([3], [1], steps=6, config=cfg, return_summary=True)
    assert summ.computed("cond") == [0, 2, 4] and str(summ).startswith("tcpade: predictor=reuse ")
    assert TCPadeConfig.fast().calibrated_predictor and TCPadeConfig.slow().calibrated_predictor
    assert not TCPadeConfig.fast(predictor="linear").calibrated_predictor  # the user's predictor stays
    assert schedules.resolve(TCPadeConfig.fast(predictor="linear"), flux.transformer).predictor == "linear"
    assert schedules.resolve(TCPadeConfig.budget(passes=3), flux.transformer).predictor == "rational"
    # the scores come back from a saved file
    schedules.clear(shipped=False)
    assert schedules.best_predictor(flux.transformer) is None


def test_calibrated_predictor_scores_survive_save_and_load(flux, registry, tmp_path):
    key = schedules.model_key(flux.transformer)
    path = str(tmp_path / "s.json")
    tcpade.calibrate.save(path, _cal(key, "rational", (30.0, 35.0)), _cal(key, "linear", (31.0, 36.0)))
    tcpade.calibrate.load(path)
    assert schedules.best_predictor(flux.transformer) == "linear"
